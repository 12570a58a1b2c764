"""Loading weight files safely: safetensors, or torch files with ``weights_only`` (no pickle code runs)."""
import pickle
import sys
from pathlib import Path
from typing import Any, Dict, Union

import torch
import torch.nn as nn

from ..run_folder.checkpoint import is_training_checkpoint, load_error
from ..errors import UserError

__all__ = ['WeightsError', 'read_state_dict', 'read_torch_file', 'state_dict_of', 'load_state_dict_checked',
           'load_weights']



class WeightsError(UserError):
    """A weight file that is missing, unreadable, unsafe or does not fit its model."""


def read_state_dict(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, of a scalekd export folder (its ``model.safetensors``), of a
    scalekd training checkpoint or ``best.pth`` (its student, the EMA weights when there are some), or
    of a torch file (its ``state_dict`` / ``model`` entry if nested)."""
    path = Path(path)
    if path.is_dir() and (path / 'model.safetensors').is_file():
        path = path / 'model.safetensors'
    if not path.is_file():
        raise WeightsError(f'weight file {path} does not exist' + (' (a folder without model.safetensors)'
                                                                  if path.is_dir() else ''))
    if path.suffix == '.safetensors':
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise WeightsError(f'{path} is not a readable safetensors file: {e}') from None
    return state_dict_of(read_torch_file(path), path)


def read_torch_file(path: Union[str, Path]) -> Any:
    """A torch file's contents, loaded with ``weights_only`` (no code from the file runs); Python objects
    beyond tensors (an mmengine checkpoint's metadata, ...) load as inert stand-ins."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f'weight file {path} does not exist')
    if path.stat().st_size == 0:
        raise WeightsError(f'weight file {path} is empty (0 bytes)')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError:
        return _load_with_inert_objects(path)
    except Exception as e:  # RuntimeError / EOFError for truncated or foreign files
        raise WeightsError(f'{path} cannot be loaded safely (weights_only): {load_error(e, path)}') from None


class _Inert:
    """Stands in for a class or function a file names: takes any arguments and state, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _load_with_inert_objects(path: Path) -> Any:
    """``torch.load`` with ``weights_only``, each global the file names (other than what torch allows)
    replaced by an inert stand-in: tensors load, the rest (training metadata) loads as inert objects,
    and no code from the file runs."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        stand_ins = [(type(name.rsplit('.', 1)[-1], (_Inert,), {}), name) for name in names]
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise WeightsError(f'{path} cannot be loaded safely (weights_only): {load_error(e, path)}') from None


def state_dict_of(data: Any, path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """The tensors of a loaded torch file: a scalekd training checkpoint's student (EMA weights first),
    a nested ``state_dict`` / ``model`` / ``state_dict_ema`` entry, or the file's own dict of tensors
    (``module.`` prefixes dropped)."""
    if is_training_checkpoint(data):
        data = data.get('ema') or data['student']
    for key in ('state_dict', 'model', 'state_dict_ema'):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise WeightsError(f'{path} holds no state dict of tensors')
    return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in data.items()}


def load_weights(model: nn.Module, path: Union[str, Path], what: str = 'model') -> None:
    """Load a weight file into ``model``; mismatched keys or shapes are an error that lists them."""
    load_state_dict_checked(model, read_state_dict(path), path, what)


def _mismatches(model: nn.Module, state: Dict[str, torch.Tensor]) -> Dict[str, list]:
    own = model.state_dict()
    return {label: keys for label, keys in (
        ('missing', sorted(set(own) - set(state))),
        ('unexpected', sorted(set(state) - set(own))),
        ('shape-mismatched', sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape))) if keys}


def _resampled(model: nn.Module, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``state`` through timm's checkpoint filter of the model's family, as timm applies it to hub weights:
    position embeddings and tables resampled to the model's image size; ``state`` where there is none."""
    adapt = getattr(sys.modules.get(type(model).__module__), 'checkpoint_filter_fn', None)
    if adapt is None:
        return state
    try:
        return adapt(dict(state), model)
    except Exception:  # a filter written for another layout: the mismatch is reported as it is
        return state


def load_state_dict_checked(model: nn.Module, state: Dict[str, torch.Tensor], path: Union[str, Path],
                            what: str = 'model') -> None:
    """Load ``state`` (read from ``path``) into ``model``. Weights of another image size are resampled
    as timm does for hub weights; keys or shapes that still do not fit are an error that lists them."""
    problems = _mismatches(model, state)
    if set(problems) == {'shape-mismatched'}:
        resampled = _resampled(model, state)
        if not _mismatches(model, resampled):
            state, problems = resampled, {}
    if problems:
        def show(keys):
            return ', '.join(keys[:8]) + (f' (+{len(keys) - 8} more)' if len(keys) > 8 else '')
        listed = '; '.join(f'{label} keys: {show(keys)}' for label, keys in problems.items())
        sized = any('pos' in k or 'relative_position' in k for k in problems.get('shape-mismatched', []))
        hint = ' (position embeddings of another image size: check data.img_size against the size these weights ' \
               'were trained at)' if sized else ''
        raise WeightsError(f'{path} does not fit the {what} ({type(model).__name__}): {listed}{hint}')
    model.load_state_dict(state)
