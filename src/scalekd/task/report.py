"""What a task distils: its teachers, its taps (shapes, projector, views) and parameter counts."""
from typing import Any, Dict, List

import torch.nn as nn
from timm.utils import unwrap_model

from .distiller import Distiller

__all__ = ['count_params', 'param_counts', 'tap_rows', 'teacher_rows']


def count_params(module: nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())


def param_counts(distiller: Distiller) -> Dict[str, int]:
    """Parameters of the student, the teachers (all of them) and the distillation modules (projectors)."""
    return dict(student=count_params(distiller.student),
                teacher=sum(count_params(t.model) for t in distiller.teachers.values()),
                distill=count_params(distiller.distill_modules()))


def teacher_rows(distiller: Distiller) -> List[Dict[str, Any]]:
    """One row per teacher: name, model, the size it sees, weight, whether its logits teach and whether
    it runs TPP, its parameters and its last stage's shapes (feature teachers)."""
    branches = distiller.branches()
    rows = []
    for name, teacher in distiller.teachers.items():
        entry, branch = distiller.entries[name], branches.get(name)
        row = dict(name=name, model=teacher.label, img_size=list(entry.img_size or distiller.img_size),
                   weight=entry.weight, kd=name in distiller.kd_teachers,
                   tpp=branch is not None and branch.proxy is not None, params=count_params(teacher.model))
        if branch is not None:
            row.update(last_stage=[list(teacher.stage_input_shape), list(teacher.final_shape)],
                       distill_params=count_params(branch))
        rows.append(row)
    return rows


def tap_rows(distiller: Distiller) -> List[Dict[str, Any]]:
    """One row per teacher and feature tap: student and target shapes, projector, views, queries,
    parameters."""
    module = unwrap_model(distiller.trainable_module)
    taps = getattr(distiller.taps, 'taps', None)  # per-tap shapes; none for logits-only methods
    opts = distiller.options
    rows = []
    for teacher_name, branch in module.branches.items():
        teacher = distiller.teachers[teacher_name]
        for name, mimicking, path, target in (
                ('s3', branch.proxy.mimicking if branch.proxy is not None else None, 'proxy', 'stage_input_shape'),
                ('s3', branch.s3, 'direct', 'stage_input_shape'),
                ('s4', branch.s4, 'direct', 'final_shape')):
            if mimicking is None:
                continue
            rows.append(dict(
                teacher=teacher_name, name=name, path=path, student_shape=list(getattr(taps, name)),
                target_shape=list(getattr(teacher, target)), projector=opts.projector,
                views=[v.name for v in mimicking.views],
                queries='proxy' if name == 's4' and branch.adaptive_queries else 'learned',
                params=count_params(mimicking)))
    return rows
