"""Exporting and re-loading the distilled student: ``model.safetensors`` + timm's ``config.json``."""
import os
from pathlib import Path
from typing import Any, Dict, Tuple, Union

import timm
import torch
import torch.nn as nn
from safetensors.torch import save_file
from timm.models._hub import save_config_for_hf

from ..adapters.models import create_timm_model, input_normalization
from ..engine.checkpoint import read_training_checkpoint, save_checkpoint
from ..engine.config import RunConfig, config_from_dict
from ..engine.weights import WeightsError
from .transfer import to_format

__all__ = ['export_student', 'student_from_checkpoint', 'load_student']


def cast_floats(state: Dict[str, torch.Tensor], dtype: str) -> Dict[str, torch.Tensor]:
    """The floating-point tensors of ``state`` in ``dtype`` (``float32``, ``float16``, ``bfloat16``)."""
    store = getattr(torch, dtype)
    return {k: v.to(store) if v.is_floating_point() else v for k, v in state.items()}


def export_student(student: nn.Module, out_dir: Union[str, Path], data_config: Dict[str, Any],
                   dtype: str = 'float32') -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``out_dir``; returns the weights path.

    ``dtype`` (``float32``, ``float16``, ``bfloat16``) is the dtype the floating-point tensors are stored in.

    Load it back with ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path), ...)``
    or ``timm.create_model('local-dir:' + out_dir, pretrained=True)``.
    """
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    weights, config = out_dir / 'model.safetensors', out_dir / 'config.json'
    partial = [weights.with_name(weights.name + '.partial'), config.with_name(config.name + '.partial')]
    state = cast_floats({k: v.detach().contiguous().cpu() for k, v in student.state_dict().items()}, dtype)
    try:  # both files or neither
        save_file(state, str(partial[0]), metadata={'format': 'pt'})
        save_config_for_hf(student, str(partial[1]), data_config=data_config)
    except BaseException:
        for path in partial:
            path.unlink(missing_ok=True)
        if created:
            out_dir.rmdir()
        raise
    os.replace(partial[0], weights)
    os.replace(partial[1], config)
    return weights


def run_data_config(cfg: RunConfig) -> Dict[str, Any]:
    """A run's eval preprocessing as a timm data config (input size, interpolation, crop, mean, std)."""
    d = cfg.data
    mean, std = input_normalization(cfg.student.model, d.in_chans, d.mean, d.std)
    return dict(input_size=(d.in_chans, d.img_size, d.img_size), interpolation=d.interpolation, crop_pct=d.crop_pct,
                mean=mean, std=std)


def student_from_checkpoint(path: Union[str, Path], use_ema: bool = True) -> Tuple[nn.Module, RunConfig, bool]:
    """The student of a training checkpoint or ``best.pth`` of any format version (its EMA weights
    when present and asked for)."""
    state = read_training_checkpoint(path)
    cfg = config_from_dict(state['config'], where=str(path))
    d = cfg.data
    student = create_timm_model(cfg.student.model, (d.img_size, d.img_size), role='student',
                                num_classes=d.num_classes, in_chans=d.in_chans, **cfg.student.kwargs)
    ema = use_ema and state.get('ema') is not None
    student.load_state_dict(state['ema'] if ema else state['student'])
    return student, cfg, ema


def export_checkpoint(path: Union[str, Path], out_dir: Union[str, Path], use_ema: bool = True,
                      dtype: str = 'float32', fmt: str = 'timm') -> Tuple[Path, bool]:
    """Export the student of a training checkpoint; returns (weights path, whether EMA weights were used).

    ``fmt='timm'`` writes ``model.safetensors`` + ``config.json``; another format of
    :data:`scalekd.tools.transfer.FORMATS` writes ``model.pth``, a state dict under that toolkit's key names.
    """
    student, cfg, ema = student_from_checkpoint(path, use_ema)
    if fmt == 'timm':
        return export_student(student, out_dir, run_data_config(cfg), dtype), ema
    state = cast_floats(to_format(student, fmt), dtype)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(state, out_dir / 'model.pth')
    return out_dir / 'model.pth', ema


def load_student(path: Union[str, Path]) -> Tuple[nn.Module, Dict[str, Any]]:
    """A student from a training checkpoint (``.pth``) or an export folder / its ``model.safetensors``.

    Returns the model and its data config (input size, interpolation, crop, mean, std).
    """
    path = Path(path)
    if path.suffix == '.pth':
        student, cfg, _ = student_from_checkpoint(path)
        return student, run_data_config(cfg)
    folder = path.parent if path.suffix == '.safetensors' else path
    if not (folder / 'config.json').is_file() or not (folder / 'model.safetensors').is_file():
        raise WeightsError(f'{path} is neither a training checkpoint (.pth) nor an export folder with '
                           f'config.json and model.safetensors')
    model = timm.create_model(f'local-dir:{folder}', pretrained=True)
    return model, timm.data.resolve_data_config({}, model=model)
