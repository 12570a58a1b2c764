"""The distiller a run config describes: teacher and student built by name, weight files loaded, the
loss and input normalisation of the config."""
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.loss import create_classification_loss

from ...adapters.models import classes_kwargs, create_timm_model, normalization_from_model_name
from ...task.builder import TeacherSpec, build_distiller
from ...task.distiller import Distiller
from .config import DataConfig, ModelConfig, RunConfig
from ..errors import RunError
from ..runtime.precision import resolve_teacher_dtype
from .weights import load_weights

__all__ = ['build_task', 'normalization_from_config', 'teacher_specs']


def normalization_from_config(cfg: RunConfig) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """The mean / std a run's images are normalised with (one per input channel): ``data.mean`` /
    ``data.std``, else the student's pretrained cfg."""
    return normalization_from_model_name(cfg.student.model, cfg.data.in_chans, cfg.data.mean, cfg.data.std)


def _create(model_cfg: ModelConfig, data_cfg: DataConfig, role: str, random_weights: bool,
            img_size: Optional[int] = None, size_key: str = 'data.img_size') -> nn.Module:
    if not model_cfg.model:
        raise RunError(f'{role}.model is not set')
    size = img_size or data_cfg.img_size
    classes = {} if 'num_classes' in model_cfg.kwargs else \
        classes_kwargs(role, model_cfg.pretrained, data_cfg.num_classes)
    model = create_timm_model(model_cfg.model, (size, size), role=role,
                              pretrained=model_cfg.pretrained and not random_weights, size_key=size_key,
                              in_chans=data_cfg.in_chans, **classes, **model_cfg.kwargs)
    if model_cfg.checkpoint and not random_weights:
        load_weights(model, model_cfg.checkpoint, what=f'{role} {model_cfg.model}')
    return model


def teacher_specs(cfg: RunConfig, random_weights: bool = False) -> List[TeacherSpec]:
    """The config's teachers, created (weights loaded unless ``random_weights``), as the builder takes them."""
    return [TeacherSpec(_create(t, cfg.data, 'teacher', random_weights, t.img_size,
                                f'teachers[{i}].img_size' if t.img_size else 'data.img_size'),
                        name=t.name, img_size=t.img_size, weight=t.weight, kd=t.kd, tpp=t.tpp_option, mean=t.mean,
                        std=t.std)
            for i, t in enumerate(cfg.teacher_configs())]


def build_task(cfg: RunConfig, device: torch.device, random_weights: bool = False) -> Distiller:
    """The distiller of a config: teacher weights from the hub or a local file, student from scratch
    (``random_weights``: no weights fetched or loaded at all)."""
    options = cfg.distill_options()
    needs_teacher = options.method != 'none'
    teachers = teacher_specs(cfg, random_weights) if needs_teacher else []
    student = _create(cfg.student, cfg.data, 'student', random_weights)
    mean, std = normalization_from_config(cfg)
    soft_targets = cfg.data.mixup > 0 or cfg.data.cutmix > 0
    criterion = create_classification_loss(loss_type='bce' if cfg.data.bce_loss else 'ce',
                                           smoothing=cfg.data.label_smoothing, soft_targets=soft_targets)
    single = cfg.teachers is None  # the teacher block: one teacher, as before there were several
    teacher = (teachers[0].model if single else teachers) if teachers else None
    distiller = build_distiller(
        teacher, student, img_size=cfg.data.img_size,
        in_chans=cfg.data.in_chans, criterion=criterion, input_mean=mean, input_std=std,
        teacher_mean=cfg.teacher.mean if single else None, teacher_std=cfg.teacher.std if single else None,
        teacher_dtype=resolve_teacher_dtype(cfg.train.teacher_precision, device),
        **{k: v for k, v in vars(cfg.distill).items()})
    return distiller.to(device)
