"""Training checkpoints: atomic writes, safe loads, a format version with migrations, and finding
the newest complete one.

A training checkpoint is a dict with ``format_version`` (:data:`FORMAT_VERSION`), ``config``,
``progress``, ``student`` and, for a full training state, ``task_state``, ``optimizer``,
``scaler``, ``ema``, ``rng``, ``world_size`` (the schedule is the config's, at ``progress.step``). A sharded
optimizer's state is in a folder beside the file (:func:`optimizer_folder`, see
:mod:`~scalekd.engine.run_folder.optimizer_shards`). ``best.pth`` holds only what eval and
export need (``config``, ``progress``, ``student``, ``ema``). Files written before versioning
are format 1; :func:`read_training_checkpoint` migrates every older format to the current one.
"""
import errno
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from ..errors import UserError

__all__ = ['FORMAT_VERSION', 'save_checkpoint', 'load_checkpoint', 'is_training_checkpoint',
           'read_training_checkpoint', 'migrate', 'out_of_space',
           'latest_checkpoint', 'checkpoints_by_age', 'checkpoint_name', 'checkpoint_position', 'rng_state', 'set_rng_state',
           'CheckpointError', 'optimizer_folder', 'is_optimizer_folder']

FORMAT_VERSION = 4

# checkpoint-EEEE.pth after E epochs; checkpoint-EEEE-UUUUUU.pth after E epochs and U updates of the next
_CHECKPOINT_FILE = re.compile(r'^checkpoint-(\d+)(?:-(\d+))?\.pth$')


_OPTIMIZER_FOLDER = re.compile(r'^checkpoint-\d+(?:-\d+)?\.pth\.optim$')


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt, unsafe or of an unknown format."""


def checkpoint_name(epoch: int, updates: int) -> str:
    """The file name of the checkpoint after ``epoch`` epochs and ``updates`` optimizer updates of the next."""
    return f'checkpoint-{epoch:04d}.pth' if updates == 0 else f'checkpoint-{epoch:04d}-{updates:06d}.pth'


def optimizer_folder(checkpoint: Union[str, Path]) -> Path:
    """The folder of a checkpoint's sharded optimizer state: ``checkpoint-*.pth.optim`` beside it."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + '.optim')


def is_optimizer_folder(name: str) -> bool:
    """Whether ``name`` is the name of a checkpoint's optimizer folder."""
    return _OPTIMIZER_FOLDER.match(name) is not None


def rng_state(device: torch.device) -> Dict[str, Any]:
    """Every RNG this process draws from, as weights-only-loadable values: CPU, Python, NumPy and
    the RNG of ``device`` alone when it is a GPU (never the other GPUs of the node)."""
    np_state = np.random.get_state()
    state = dict(torch=torch.get_rng_state(), python=random.getstate(),
                 numpy=dict(key=torch.from_numpy(np_state[1].astype(np.int64)), pos=int(np_state[2]),
                            has_gauss=int(np_state[3]), cached_gaussian=float(np_state[4])))
    if device.type == 'cuda':
        state['cuda'] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    """Restore :func:`rng_state`; the GPU state goes to ``device`` (format 1 stored a list of every
    visible GPU's state: the entry of ``device``'s index is used when it exists)."""
    torch.set_rng_state(state['torch'])
    random.setstate(state['python'])
    n = state['numpy']
    np.random.set_state(('MT19937', n['key'].numpy().astype(np.uint32), n['pos'], n['has_gauss'], n['cached_gaussian']))
    cuda = state.get('cuda')
    if device.type != 'cuda' or cuda is None:
        return
    if isinstance(cuda, (list, tuple)):
        index = device.index or 0
        if index >= len(cuda):
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda, device)


def created_mode(full: int = 0o666) -> int:
    """The mode ``open()`` (``full`` 0o666) or ``mkdir()`` (0o777) gives under the process's umask: what a
    file written through a temporary one (owner-only, as ``mkstemp`` and safetensors make them) gets."""
    umask = os.umask(0)
    os.umask(umask)
    return full & ~umask


def save_checkpoint(state: Dict[str, Any], path: Union[str, Path]) -> None:
    """Write to a temporary file in the same folder, flush it to disk, then rename over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    try:
        os.fchmod(fd, created_mode())
        with os.fdopen(fd, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        written = Path(tmp).stat().st_size if Path(tmp).exists() else 0
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, (OSError, RuntimeError)) and out_of_space(e):
            raise CheckpointError(f'writing {path} failed after {written / 2 ** 20:.0f} MB: the disk is full '
                                  f'({shutil.disk_usage(path.parent).free / 2 ** 20:.0f} MB free once the partial '
                                  f'file was removed); the previous checkpoint is intact') from None
        raise


def out_of_space(e: BaseException) -> bool:
    """Whether a write failed for want of disk space (``ENOSPC``, or torch's zip writer failing mid-file,
    which is how torch.save reports it)."""
    return getattr(e, 'errno', None) in (errno.ENOSPC, errno.EDQUOT) or 'unexpected pos' in str(e)


def load_checkpoint(path: Union[str, Path]) -> Dict[str, Any]:
    """Load a torch file with ``weights_only`` (no pickled code runs)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'checkpoint {path} does not exist')
    if path.stat().st_size == 0:
        raise CheckpointError(f'checkpoint {path} is empty (0 bytes): a write that never happened')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise CheckpointError(f'checkpoint {path} cannot be loaded safely: {load_error(e, path)}') from None


_GLOBAL = re.compile(r'GLOBAL ([\w.]+)')  # the class or function torch's weights-only unpickler refused


def load_error(e: Exception, path: Union[str, Path]) -> str:
    """Why a weights-only ``torch.load`` of ``path`` failed: that it is no torch file at all (neither
    ``torch.save``'s zip archive nor a pickle), or the first sentence of torch's error (not its advice to
    load unsafely) and, for a pickle that names a class or function torch does not allow, that name and
    how to go on."""
    head = _head(path)
    if head is not None and not head.startswith((b'PK\x03\x04', b'\x80')):
        return (f'it is not a PyTorch file (neither the zip archive torch.save writes nor a pickle; it starts '
                f'with {head!r})')
    reason = re.split(r'(?<=\.) ', str(e).splitlines()[0])[0] if str(e).strip() else type(e).__name__
    refused = _GLOBAL.search(str(e))
    if refused:
        reason += (f' The file names {refused[1]}, which a weights-only load never runs. If you trust the file, '
                   f'convert it: load it once with torch.load(path, weights_only=False), torch.save its state dict of '
                   f'tensors, and give that file')
    return reason


def _head(path: Union[str, Path], size: int = 8) -> Optional[bytes]:
    """The first ``size`` bytes of a file; ``None`` when it cannot be read."""
    try:
        with open(path, 'rb') as f:
            return f.read(size)
    except OSError:
        return None


def _from_format_1(state: Dict[str, Any]) -> Dict[str, Any]:
    """Format 1 (scalekd 0.1.0): no ``best_step`` (taken from the history), the epoch's loss sums of
    rank 0 alone with its image count (scaled to every rank: exact for one process, an estimate for
    several), the RNG of every visible GPU as a list (handled by :func:`set_rng_state`)."""
    progress = dict(state.get('progress', {}))
    best = [r['step'] for r in progress.get('history', []) if r.get('epoch') == progress.get('best_epoch')]
    progress['best_step'] = best[-1] if best else -1
    train = state.get('config', {}).get('train', {})
    world = state.get('world_size', 1)
    per_rank = max(train.get('batch_size', 1) // max(world * train.get('accum_steps', 1), 1), 1)
    progress['totals'] = {k: v * world for k, v in progress.get('totals', {}).items()}
    progress['batches'] = progress.pop('seen', 0) // per_rank * world
    return dict(state, progress=progress)


def _from_format_2(state: Dict[str, Any]) -> Dict[str, Any]:
    """Format 2 counted the position in an epoch in micro-batches per process (``batch``) and summed
    the loss terms of every rank's micro-batches (``totals``, ``batches``); format 3 counts updates
    (``updates``) and sums each update's mean terms (``loss_sums`` over ``loss_updates``)."""
    progress = dict(state.get('progress', {}))
    accum = state.get('config', {}).get('train', {}).get('accum_steps', 1)
    per_update = accum * state.get('world_size', 1)  # the micro-batches of every rank in one update
    progress['updates'] = progress.pop('batch', 0) // accum
    progress['loss_sums'] = {k: v / per_update for k, v in progress.pop('totals', {}).items()}
    progress['loss_updates'] = progress.pop('batches', 0) // per_update
    return dict(state, progress=progress)


def _from_format_3(state: Dict[str, Any]) -> Dict[str, Any]:
    """Format 4 may keep a sharded optimizer's state in a folder beside the file (``optimizer`` then holds
    ``param_groups`` and ``shards``); format 3 always held it whole, which format 4 reads as it is."""
    return state


# format N -> N + 1; a release that renames a config field adds the rename here
_MIGRATIONS: Dict[int, Callable[[Dict[str, Any]], Dict[str, Any]]] = {1: _from_format_1, 2: _from_format_2,
                                                                    3: _from_format_3}


def migrate(state: Dict[str, Any], where: str = 'checkpoint') -> Dict[str, Any]:
    """``state`` brought from its format to :data:`FORMAT_VERSION`; a newer format is an error."""
    version = state.get('format_version', 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f'{where} has format {version!r}, newer than this scalekd reads ({FORMAT_VERSION}): '
                              f'upgrade scalekd')
    while version < FORMAT_VERSION:
        state = _MIGRATIONS[version](state)
        version += 1
    return dict(state, format_version=version)


def is_training_checkpoint(data: Any) -> bool:
    """Whether loaded file contents are a scalekd training checkpoint (or ``best.pth``)."""
    return isinstance(data, dict) and 'config' in data and 'student' in data


def read_training_checkpoint(path: Union[str, Path]) -> Dict[str, Any]:
    """A scalekd training checkpoint (or ``best.pth``), migrated to the current format."""
    state = load_checkpoint(path)
    if not is_training_checkpoint(state):
        raise CheckpointError(f'{path} is not a scalekd training checkpoint (no config / student entries)')
    return migrate(state, str(path))


def checkpoint_position(name: str) -> Optional[Tuple[int, int]]:
    """(epochs, updates into the next) of a checkpoint file name; ``None`` for another name."""
    m = _CHECKPOINT_FILE.match(name)
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


def checkpoints_by_age(folder: Union[str, Path]) -> List[Path]:
    """The run's checkpoints in ``folder``, oldest first by (epochs, updates) done."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(pos, p) for p in folder.iterdir() if (pos := checkpoint_position(p.name)) is not None]
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: Union[str, Path], read: Callable[[Path], Dict[str, Any]] = read_training_checkpoint
                      ) -> Tuple[Optional[Path], Optional[Dict[str, Any]], List[str]]:
    """The newest checkpoint in ``folder`` that loads completely (``read`` raises :class:`CheckpointError`
    for one that does not), its migrated state (each file is read once), and why each newer one was passed over.

    Raises :class:`CheckpointError` listing every file when there are checkpoints and none loads.
    """
    failures = []
    for path in reversed(checkpoints_by_age(folder)):
        try:
            return path, read(path), failures
        except CheckpointError as e:
            failures.append(str(e))
    if failures:
        raise CheckpointError(f'{folder} holds {len(failures)} checkpoint(s) and none loads: '
                              + '; '.join(f.rstrip('.') for f in failures)
                              + '. Nothing was changed; move the damaged files away to start afresh, or pass '
                                '--resume PATH')
    return None, None, []
