"""What a task distils: its taps (shapes, projector, views) and parameter counts."""
from typing import Any, Dict, List

import torch.nn as nn
from timm.utils import unwrap_model

from .distiller import Distiller

__all__ = ['count_params', 'param_counts', 'tap_rows']


def count_params(module: nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())


def param_counts(distiller: Distiller) -> Dict[str, int]:
    """Parameters of the student, the teacher and the distillation modules (projectors)."""
    teacher = distiller.teacher
    return dict(student=count_params(distiller.student),
                teacher=count_params(teacher.model) if teacher is not None else 0,
                distill=count_params(distiller.distill_modules()))


def tap_rows(distiller: Distiller) -> List[Dict[str, Any]]:
    """One row per feature tap: student and target shapes, projector, views, queries, parameters."""
    module = unwrap_model(distiller.trainable_module)
    taps = getattr(distiller.taps, 'taps', None)  # per-tap shapes; none for logits-only methods
    opts = distiller.options
    teacher = distiller.teacher
    rows = []
    for name, mimicking, path, target in (
            ('s3', module.proxy.mimicking if module.proxy is not None else None, 'proxy', 'stage_input_shape'),
            ('s3', module.s3, 'direct', 'stage_input_shape'),
            ('s4', module.s4, 'direct', 'final_shape')):
        if mimicking is None:  # a feature tap exists only with a feature teacher
            continue
        rows.append(dict(
            name=name, path=path, student_shape=list(getattr(taps, name)), target_shape=list(getattr(teacher, target)),
            projector=opts.projector, views=[v.name for v in mimicking.views],
            queries='proxy' if name == 's4' and opts.adaptive_queries else 'learned',
            params=count_params(mimicking)))
    return rows
