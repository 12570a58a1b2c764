"""The distiller a run config describes: teacher and student built by name, weight files loaded, the
loss and input normalisation of the config."""
from typing import Tuple

import torch
import torch.nn as nn
from timm.loss import create_classification_loss

from ...adapters.models import classes_kwargs, create_timm_model, normalization_from_model_name
from ...task.builder import build_distiller
from ...task.distiller import Distiller
from .config import RunConfig
from ..errors import RunError
from ..runtime.precision import resolve_teacher_dtype
from .weights import load_weights

__all__ = ['build_task', 'normalization_from_config']


def normalization_from_config(cfg: RunConfig) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """The mean / std a run's images are normalised with (one per input channel): ``data.mean`` /
    ``data.std``, else the student's pretrained cfg."""
    return normalization_from_model_name(cfg.student.model, cfg.data.in_chans, cfg.data.mean, cfg.data.std)


def _create(model_cfg, data_cfg, role: str, random_weights: bool) -> nn.Module:
    if not model_cfg.model:
        raise RunError(f'{role}.model is not set')
    classes = {} if 'num_classes' in model_cfg.kwargs else \
        classes_kwargs(role, model_cfg.pretrained, data_cfg.num_classes)
    model = create_timm_model(model_cfg.model, (data_cfg.img_size, data_cfg.img_size), role=role,
                              pretrained=model_cfg.pretrained and not random_weights,
                              in_chans=data_cfg.in_chans, **classes, **model_cfg.kwargs)
    if model_cfg.checkpoint and not random_weights:
        load_weights(model, model_cfg.checkpoint, what=f'{role} {model_cfg.model}')
    return model


def build_task(cfg: RunConfig, device: torch.device, random_weights: bool = False) -> Distiller:
    """The distiller of a config: teacher weights from the hub or a local file, student from scratch
    (``random_weights``: no weights fetched or loaded at all)."""
    options = cfg.distill_options()
    needs_teacher = options.kd or options.uses_features
    teacher = _create(cfg.teacher, cfg.data, 'teacher', random_weights) if needs_teacher else None
    student = _create(cfg.student, cfg.data, 'student', random_weights)
    mean, std = normalization_from_config(cfg)
    soft_targets = cfg.data.mixup > 0 or cfg.data.cutmix > 0
    criterion = create_classification_loss(loss_type='bce' if cfg.data.bce_loss else 'ce',
                                           smoothing=cfg.data.label_smoothing, soft_targets=soft_targets)
    distiller = build_distiller(
        teacher, student, img_size=cfg.data.img_size, in_chans=cfg.data.in_chans, criterion=criterion,
        input_mean=mean, input_std=std, teacher_mean=cfg.teacher.mean, teacher_std=cfg.teacher.std,
        teacher_dtype=resolve_teacher_dtype(cfg.train.teacher_precision, device),
        **{k: v for k, v in vars(cfg.distill).items()})
    return distiller.to(device)
