"""A model from whatever a user points at: a scalekd training checkpoint or ``best.pth``, an export
folder (``model.safetensors`` + ``config.json``), or a weight file / hub weights for a timm name.

Every command that takes a trained model (``eval``, ``export``, the analysis commands) loads it here,
and each file is read once.
"""
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Union

import timm
import torch.nn as nn
from timm.data import resolve_data_config

from ..adapters.models import create_timm_model, default_img_size, normalization_from_model_name
from ..engine.run_folder.checkpoint import is_training_checkpoint, migrate
from ..engine.inputs.config import RunConfig, config_from_dict
from ..engine.errors import UserError
from ..engine.inputs.weights import WeightsError, load_state_dict_checked, read_state_dict, read_torch_file, state_dict_of

__all__ = ['LoadedModel', 'load_model', 'run_data_config', 'export_folder_of']


@dataclass(frozen=True)
class LoadedModel:
    """A loaded model, its eval data config (input size, interpolation, crop, mean, std) and, for a
    training checkpoint, the run's config and whether the EMA weights were taken."""
    model: nn.Module
    data_config: Dict[str, Any]
    run_config: Optional[RunConfig] = None
    ema: bool = False


def run_data_config(cfg: RunConfig) -> Dict[str, Any]:
    """A run's eval preprocessing as a timm data config (input size, interpolation, crop, mean, std)."""
    d = cfg.data
    mean, std = normalization_from_model_name(cfg.student.model, d.in_chans, d.mean, d.std)
    return dict(input_size=(d.in_chans, d.img_size, d.img_size), interpolation=d.interpolation, crop_pct=d.crop_pct,
                mean=mean, std=std)


def export_folder_of(path: Path) -> Optional[Path]:
    """The export folder ``path`` is or whose ``model.safetensors`` it is; ``None`` for anything else."""
    folder = path if path.is_dir() else path.parent if path.name == 'model.safetensors' else None
    return folder if folder is not None and (folder / 'config.json').is_file() else None


def _from_export(folder: Path) -> LoadedModel:
    if not (folder / 'model.safetensors').is_file():
        raise WeightsError(f'export folder {folder} has config.json but no model.safetensors')
    try:
        json.loads((folder / 'config.json').read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise WeightsError(f'{folder / "config.json"} is not valid JSON ({e}): re-export the student') from None
    try:
        model = timm.create_model(f'local-dir:{folder}', pretrained=False)
    except (KeyError, TypeError, RuntimeError) as e:
        raise WeightsError(f'{folder / "config.json"} does not describe a timm model: {e}') from None
    load_state_dict_checked(model, read_state_dict(folder / 'model.safetensors'), folder / 'model.safetensors',
                            what=f'model of {folder / "config.json"}')
    return LoadedModel(model, resolve_data_config({}, model=model))


def _from_run(state: Dict[str, Any], path: Path, use_ema: bool) -> LoadedModel:
    state = migrate(state, str(path))
    cfg = config_from_dict(state['config'], where=str(path))
    d = cfg.data
    student = create_timm_model(cfg.student.model, (d.img_size, d.img_size), role='student',
                                num_classes=d.num_classes, in_chans=d.in_chans, **cfg.student.kwargs)
    ema = use_ema and state.get('ema') is not None
    load_state_dict_checked(student, state['ema'] if ema else state['student'], path, what=f'student of {path}')
    return LoadedModel(student, run_data_config(cfg), cfg, ema)


def _from_name(name: str, weights: Optional[Dict[str, Any]], path: Optional[Path], **kwargs: Any) -> LoadedModel:
    size = default_img_size(name, role='timm') or 224  # also refuses an unknown name, with close names
    model = create_timm_model(name, (size, size), pretrained=weights is None, **kwargs)
    if weights is not None:
        load_state_dict_checked(model, weights, path, what=name)
    return LoadedModel(model, resolve_data_config({}, model=model))


def _warn_non_finite(loaded: LoadedModel, path: Path) -> LoadedModel:
    bad = [k for k, v in loaded.model.state_dict().items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        warnings.warn(f'{path}: {len(bad)} tensor(s) hold NaN or infinite values ({", ".join(bad[:3])}'
                      f'{", ..." if len(bad) > 3 else ""}): the weights of a run that diverged; its outputs mean '
                      f'nothing', UserWarning, stacklevel=3)
    return loaded


def load_model(path: Optional[Union[str, Path]] = None, name: Optional[str] = None, use_ema: bool = True,
               **kwargs: Any) -> LoadedModel:
    """The model at ``path`` (a training checkpoint: its student, EMA weights first unless ``use_ema`` is
    false; an export folder), or the timm model ``name`` with the weight file ``path`` (without a path:
    its hub weights); ``kwargs`` go to ``timm.create_model`` for a model given by name. Weights with
    NaN or infinite values load with a warning naming them."""
    if path is None:
        if not name:
            raise UserError('give --model NAME or --checkpoint PATH')
        return _from_name(name, None, None, **kwargs)
    path = Path(path)
    return _warn_non_finite(_from_file(path, name, use_ema, **kwargs), path)


def _from_file(path: Path, name: Optional[str], use_ema: bool, **kwargs: Any) -> LoadedModel:
    folder = export_folder_of(path)
    if folder is not None:
        return _from_export(folder)
    if path.suffix == '.safetensors':
        weights = read_state_dict(path)
    else:
        data = read_torch_file(path)
        if is_training_checkpoint(data):
            return _from_run(data, path, use_ema)
        weights = state_dict_of(data, path)
    if not name:
        raise WeightsError(f'{path} holds plain weights, not a scalekd checkpoint or export folder, so their '
                           f'model is unknown (give its timm name where the command takes --model)')
    return _from_name(name, weights, path, **kwargs)
