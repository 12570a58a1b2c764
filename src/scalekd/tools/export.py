"""Exporting the distilled student: ``model.safetensors`` + timm's ``config.json``, or another toolkit's keys."""
import errno
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple, Union

import torch
import torch.nn as nn
from safetensors.torch import save_file
from timm.models._hub import save_config_for_hf

from ..engine.run_folder.checkpoint import created_mode, out_of_space, save_checkpoint
from ..engine.run_folder.files import check_output_path
from ..engine.inputs.weights import WeightsError
from .model_files import load_model
from .transfer import to_format

__all__ = ['export_student', 'export_checkpoint', 'cast_floats']


def cast_floats(state: Dict[str, torch.Tensor], dtype: str) -> Dict[str, torch.Tensor]:
    """The floating-point tensors of ``state`` in ``dtype`` (``float32``, ``float16``, ``bfloat16``)."""
    store = getattr(torch, dtype)
    return {k: v.to(store) if v.is_floating_point() else v for k, v in state.items()}


# what timm's config of a hub weight file says about that file, not about weights trained here
_HUB_FIELDS = ('hf_hub_id', 'url', 'file', 'origin_url', 'paper_ids', 'paper_name', 'license', 'notes')


def _not_from_the_hub(config_path: Path) -> None:
    """Tag the exported weights ``scalekd`` and drop the hub weights' provenance that timm copies over."""
    config = json.loads(config_path.read_text())
    pretrained = {k: v for k, v in config.get('pretrained_cfg', {}).items() if k not in _HUB_FIELDS}
    config['pretrained_cfg'] = dict(pretrained, tag='scalekd')
    config_path.write_text(json.dumps(config, indent=2))


def export_student(student: nn.Module, out_dir: Union[str, Path], data_config: Dict[str, Any],
                   dtype: str = 'float32') -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``out_dir``; returns the weights path.

    ``dtype`` (``float32``, ``float16``, ``bfloat16``) is the dtype the floating-point tensors are stored in.

    Load it back with ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path), ...)``
    or ``timm.create_model('local-dir:' + out_dir, pretrained=True)``.
    """
    out_dir = Path(out_dir)
    weights, config = out_dir / 'model.safetensors', out_dir / 'config.json'
    partial = [weights.with_name(weights.name + '.partial'), config.with_name(config.name + '.partial')]
    state = cast_floats({k: v.detach().contiguous().cpu() for k, v in student.state_dict().items()}, dtype)
    with _export_folder(out_dir):
        writing = weights
        try:  # both files or neither
            save_file(state, str(partial[0]), metadata={'format': 'pt'})
            os.chmod(partial[0], created_mode())  # safetensors writes owner-only files
            writing = config
            save_config_for_hf(student, str(partial[1]), data_config=data_config)
            _not_from_the_hub(partial[1])
        except BaseException as e:
            for path in partial:
                path.unlink(missing_ok=True)
            refusal = _write_refusal(e, writing)
            if refusal is None:
                raise
            raise refusal from None
    os.replace(partial[0], weights)
    os.replace(partial[1], config)
    return weights


@contextmanager
def _export_folder(out_dir: Path) -> Iterator[None]:
    """``out_dir`` created for the block, and removed again when the block fails and it was not there before."""
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WeightsError(f'export folder {out_dir} cannot be created: {e.strerror or e}') from None
    try:
        yield
    except BaseException:
        if created:
            out_dir.rmdir()
        raise


_OS_ERROR = re.compile(r'\(os error (\d+)\)')  # how safetensors' own error names the OS error under it


def _write_refusal(e: BaseException, path: Path) -> Optional[WeightsError]:
    """The one-line error of a write of ``path`` that the disk refused (full, not writable); ``None`` for
    any other failure. safetensors reports the OS error inside a ``SafetensorError`` of its own."""
    found = None if isinstance(e, OSError) else _OS_ERROR.search(str(e))
    number = e.errno if isinstance(e, OSError) else int(found[1]) if found else None
    if number in (errno.ENOSPC, errno.EDQUOT) or isinstance(e, RuntimeError) and out_of_space(e):
        return WeightsError(f'writing {path} failed: the disk is full; nothing was written')
    if number in (errno.EACCES, errno.EPERM, errno.EROFS):
        return WeightsError(f'export folder {path.parent} cannot be written: {os.strerror(number)}; nothing was '
                            f'written')
    return None


def export_checkpoint(path: Union[str, Path], out_dir: Union[str, Path], use_ema: bool = True,
                      dtype: str = 'float32', fmt: str = 'timm') -> Tuple[Path, bool]:
    """Export the student of a training checkpoint; returns (weights path, whether EMA weights were used).

    ``fmt='timm'`` writes ``model.safetensors`` + ``config.json``; another format of
    :data:`scalekd.tools.transfer.FORMATS` writes ``model.pth``, a state dict under that toolkit's key names.
    """
    out_dir = check_output_path(out_dir)  # before anything is read
    loaded = load_model(path, use_ema=use_ema)
    if loaded.run_config is None:
        raise WeightsError(f'{path} is an export already: export takes a run\'s checkpoint-*.pth or best.pth')
    if fmt == 'timm':
        return export_student(loaded.model, out_dir, loaded.data_config, dtype), loaded.ema
    state = cast_floats(to_format(loaded.model, fmt), dtype)
    with _export_folder(out_dir):
        save_checkpoint(state, out_dir / 'model.pth')
    return out_dir / 'model.pth', loaded.ema
