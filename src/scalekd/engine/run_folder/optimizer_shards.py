"""A sharded optimizer's state in a checkpoint, written by every rank with torch's distributed checkpoint
(DCP): no process gathers the whole state.

Layout: beside ``checkpoint-*.pth``, the folder ``checkpoint-*.pth.optim`` holds DCP's files, ``.metadata``
and one ``__R_0.distcp`` per rank R. Its entries are ``state/I/NAME`` (a tensor of parameter I's optimizer
state, I the parameter's index in the plain optimizer's state dict) and ``value/I/NAME/TYPE`` (a Python
number or ``None``, as a 0-d tensor). The checkpoint file's ``optimizer`` then holds ``param_groups`` (the
plain optimizer's, written once, by the main process) and ``shards`` (``folder``, ``format``, ``processes``)
instead of ``state``.

Writing: the main process lists the checkpoint in the run's series and makes a temporary folder
(``.checkpoint-*.pth.optim.*.tmp``); every rank writes its shard there; DCP writes its metadata once every
rank's shard is on disk, then the main process renames the folder, and only then writes the checkpoint
file: a checkpoint file always has its complete folder. Where a rank cannot see the main process's folder
(an output folder that nodes do not share), the state is gathered onto the main process and written whole
into the file, as for a plain optimizer.

Reading, on any number of processes: each rank reads only the entries it keeps (its ZeRO shard's, or all
of them for a plain optimizer). DCP's metadata is a pickle: it is read with an unpickler that admits only
DCP's own record classes, sizes, dtypes and paths (no pickled code runs, as for the checkpoint file).
"""
import pickle
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional, Set, Tuple

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint import metadata as dcp_metadata

from .checkpoint import CheckpointError, is_optimizer_folder, optimizer_folder, out_of_space, read_training_checkpoint
from ..runtime.distributed import DistEnv, any_rank, on_main
from ..runtime.optimizer import gather_optimizer_state, is_sharded, local_optimizer_state, plain_param_groups

if TYPE_CHECKING:
    from .history import RunOutput

__all__ = ['SHARDS_FORMAT', 'checkpoint_optimizer_state', 'optimizer_state_of', 'check_optimizer_shards',
           'read_resumable_checkpoint']

SHARDS_FORMAT = 'torch.distributed.checkpoint'
_VALUES = {'int': (torch.int64, int), 'float': (torch.float64, float), 'bool': (torch.bool, bool),
           'none': (torch.int64, lambda _: None)}


def _entries(states: Dict[int, Dict[str, Any]]) -> Dict[str, torch.Tensor]:
    """DCP entries of optimizer states by parameter index."""
    out = {}
    for index, slots in states.items():
        for name, value in slots.items():
            if isinstance(value, torch.Tensor):
                out[f'state/{index}/{name}'] = value
            elif value is None or isinstance(value, (bool, int, float)):
                kind = type(value).__name__ if value is not None else 'none'
                out[f'value/{index}/{name}/{kind}'] = torch.tensor(value or 0, dtype=_VALUES[kind][0])
            else:
                raise TypeError(f'optimizer state {name!r} of parameter {index} is a {type(value).__name__}: a '
                                f'sharded checkpoint holds tensors and numbers')
    return out


def _states(entries: Dict[str, torch.Tensor]) -> Dict[int, Dict[str, Any]]:
    """Optimizer states by parameter index from DCP entries (:func:`_entries` undone)."""
    states: Dict[int, Dict[str, Any]] = {}
    for key, tensor in entries.items():
        kind, index, name, *tag = key.split('/')
        states.setdefault(int(index), {})[name] = tensor if kind == 'state' else _VALUES[tag[0]][1](tensor.item())
    return states


def _index(key: str) -> Optional[int]:
    """The parameter index of a DCP entry of :func:`_entries`; ``None`` for another key."""
    parts = key.split('/')
    valid = (len(parts) == 3 and parts[0] == 'state') or \
        (len(parts) == 4 and parts[0] == 'value' and parts[3] in _VALUES)
    return int(parts[1]) if valid and parts[1].isdigit() else None


# what DCP's metadata pickle names besides the classes of torch.distributed.checkpoint.metadata
_METADATA_GLOBALS = {('torch', 'Size'), ('torch.serialization', '_get_layout'), ('collections', 'OrderedDict'),
                     ('torch.distributed.checkpoint.filesystem', '_StorageInfo'), ('pathlib', 'PosixPath'),
                     ('pathlib', 'PurePosixPath'), ('pathlib', 'WindowsPath'), ('pathlib', 'PureWindowsPath')}


class _MetadataUnpickler(pickle.Unpickler):
    """Admits only what DCP's metadata is made of."""

    def find_class(self, module: str, name: str) -> Any:
        record = getattr(dcp_metadata, name, None) if module == dcp_metadata.__name__ and '.' not in name else None
        dtype = module == 'torch' and '.' not in name and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in _METADATA_GLOBALS or dtype or (isinstance(record, type) and record.__module__ == module):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f'it names {module}.{name}, which is no part of DCP\'s metadata')


def _read_metadata(folder: Path) -> dcp_metadata.Metadata:
    """A shard folder's DCP metadata; ``ValueError`` saying why it is damaged."""
    try:
        with open(folder / '.metadata', 'rb') as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise ValueError('its .metadata is missing') from None
    except Exception as e:
        raise ValueError(f'its .metadata does not load ({str(e).splitlines()[0] if str(e) else type(e).__name__})') \
            from None
    if not isinstance(metadata, dcp_metadata.Metadata) or not isinstance(metadata.storage_data, dict):
        raise ValueError('its .metadata is not DCP\'s')
    unknown = [k for k, m in metadata.state_dict_metadata.items()
               if _index(k) is None or not isinstance(m, dcp_metadata.TensorStorageMetadata)]
    if unknown:
        raise ValueError(f'it holds {unknown[0]!r}, no entry of an optimizer state')
    for info in metadata.storage_data.values():
        name = getattr(info, 'relative_path', '')
        f = folder / name
        if not isinstance(name, str) or '/' in name or not f.is_file() or f.is_symlink():
            raise ValueError(f'{name} is missing')
        if f.stat().st_size < info.offset + info.length:
            raise ValueError(f'{name} is cut short')
    return metadata


class _Reader(FileSystemReader):
    """DCP's file reader with a metadata read that runs no pickled code."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        metadata = _read_metadata(Path(self.path))
        metadata.storage_meta = metadata.storage_meta or dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _shards(state: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """A checkpoint's record of its optimizer folder; ``None`` when the file holds the whole state."""
    optimizer = state.get('optimizer')
    return optimizer.get('shards') if isinstance(optimizer, dict) else None


def _checked_folder(state: Dict[str, Any], path: Path) -> Optional[Tuple[Path, dcp_metadata.Metadata]]:
    """The checkpoint's optimizer folder, checked, and its metadata (``None`` when the file holds the whole state)."""
    shards = _shards(state)
    if shards is None:
        return None
    name = shards.get('folder') if isinstance(shards, dict) else None
    if not isinstance(name, str) or not is_optimizer_folder(name) or shards.get('format') != SHARDS_FORMAT:
        raise CheckpointError(f'checkpoint {path} names an optimizer state this scalekd does not read ({shards!r})')
    folder = Path(path).parent / name
    if folder.is_symlink():
        reason = 'is a link, not a folder its run wrote'
    elif not folder.is_dir():
        reason = 'is missing' if not folder.exists() else 'is not a folder'
    else:
        try:
            return folder, _read_metadata(folder)
        except ValueError as e:
            reason = f'is damaged: {e}'
    raise CheckpointError(f'checkpoint {path} keeps its optimizer state in {folder}, which {reason}; resume '
                          f'from another checkpoint (eval and export read the checkpoint file alone)')


def check_optimizer_shards(state: Dict[str, Any], path: Path) -> None:
    """Refuse a checkpoint whose optimizer folder is missing, a link or damaged (its metadata does not load,
    a file it names is missing or cut short), naming it."""
    _checked_folder(state, path)


def read_resumable_checkpoint(path: Path) -> Dict[str, Any]:
    """A training checkpoint to resume from (:func:`read_training_checkpoint`), with its optimizer folder checked."""
    state = read_training_checkpoint(path)
    check_optimizer_shards(state, Path(path))
    return state


def optimizer_state_of(state: Dict[str, Any], path: Path, wanted: Optional[Set[int]]) -> Dict[str, Any]:
    """A checkpoint's optimizer state in the plain optimizer's format, with the states of the ``wanted``
    parameter indices (``None``: all) when it is in a folder of shards (read by this process alone)."""
    checked = _checked_folder(state, path)
    if checked is None:
        return state['optimizer']
    folder, metadata = checked
    entries = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in metadata.state_dict_metadata.items()
               if wanted is None or _index(k) in wanted}
    try:
        with warnings.catch_warnings():  # that this process reads alone is the intent, not a guess to warn about
            warnings.simplefilter('ignore', UserWarning)
            dcp.load(entries, storage_reader=_Reader(folder), no_dist=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f'checkpoint {path} keeps its optimizer state in {folder}, which is damaged: '
                              f'{reason[:300]}') from None
    return dict(param_groups=state['optimizer']['param_groups'], state=_states(entries))


def _shards_error(failures: Dict[int, Any], name: str) -> CheckpointError:
    """One line for a failed shard write (DCP gives each failed rank's error, with its frames): a full
    disk, or the first rank's error."""
    errors = {rank: failure[0] if isinstance(failure, tuple) else failure for rank, failure in failures.items()}
    rank, error = min(errors.items())
    if any(out_of_space(e) for e in errors.values()):
        return CheckpointError(f'writing the optimizer shards of {name} failed: the disk is full (the partial '
                               f'shards are removed); the previous checkpoint is intact')
    detail = str(error).splitlines()[0] if str(error).strip() else ''
    return CheckpointError(f'writing the optimizer shards of {name} failed (rank {rank}): {type(error).__name__}'
                           + (f': {detail}' if detail else ''))


def checkpoint_optimizer_state(optimizer: torch.optim.Optimizer, env: DistEnv, output: Optional['RunOutput'],
                               name: str, step: int) -> Optional[Dict[str, Any]]:
    """What checkpoint ``name`` of ``step`` holds of the optimizer, on the main process (``None`` on the
    others; ``output`` is the main process's). A collective: every rank calls it. A sharded optimizer's
    ranks each write their shard into the checkpoint's folder (the file then names it); a plain one's state
    is its state dict."""
    if not is_sharded(optimizer):
        return gather_optimizer_state(optimizer, env)
    temp: Path = on_main(lambda: output.shard_folder(name, step), env)
    if any_rank([torch.tensor(not temp.is_dir())], env)[0]:  # the output folder is not shared by every node
        on_main(lambda: output.drop_shards(temp), env)
        return gather_optimizer_state(optimizer, env)
    try:
        dcp.save(_entries(local_optimizer_state(optimizer)), storage_writer=FileSystemWriter(temp))
    except BaseException as e:
        if output is not None:
            output.drop_shards(temp)
        failures = getattr(e, 'failures', None)  # DCP's CheckpointException (a BaseException): every rank's error
        if not failures:
            raise
        raise _shards_error(failures, name) from None
    if output is None:
        return None
    output.commit_shards(temp, name)
    return dict(param_groups=plain_param_groups(optimizer),
                shards=dict(folder=optimizer_folder(name).name, format=SHARDS_FORMAT, processes=env.world_size))
