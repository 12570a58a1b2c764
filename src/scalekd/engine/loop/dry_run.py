"""``scalekd train --dry-run``: a config's models at full size and one training step on a synthetic
batch, with no data and no output folder."""
import math
from typing import Any, Dict

import torch
from timm.utils import random_seed

from ...task.report import param_counts, tap_rows, teacher_rows
from ..inputs.config import RunConfig
from ..runtime.distributed import DistEnv
from ..runtime.optimizer import build_optimizer
from ..runtime.precision import resolve_precision
from .synthetic_step import synthetic_batch, training_step
from ..inputs.task_build import build_task
from ..inputs.weights import load_weights

__all__ = ['dry_run']


def dry_run(cfg: RunConfig, device: torch.device, batch: int = 2) -> Dict[str, Any]:
    """Build a config's models at full size, load local weight files (each teacher's ``checkpoint``, so a file
    that does not fit is found now; hub weights are not fetched) and run one training step on a
    synthetic batch (no data, no output folder); returns the loss terms, parameter counts and weights."""
    random_seed(cfg.seed, 0)
    task = build_task(cfg, device, random_weights=True)
    weights = {}
    teachers = [(t.name, t, task.teachers[t.name].model) for t in cfg.teacher_configs() if t.name in task.teachers]
    for role, model_cfg, model in teachers + [('student', cfg.student, task.student)]:
        if model_cfg.checkpoint:
            load_weights(model, model_cfg.checkpoint, what=f'{role} {model_cfg.model}')
        weights[role] = (f'loaded {model_cfg.checkpoint}' if model_cfg.checkpoint else
                         'hub weights (not fetched by --dry-run)' if model_cfg.pretrained else 'random')
    precision = resolve_precision(cfg.train.precision, device)
    optimizer = build_optimizer(task.trainable_module, cfg.optim, DistEnv(device=device),
                                projector_lr_scale=cfg.distill_options().projector_lr_scale)
    images, targets = synthetic_batch(task, batch, cfg.train.channels_last)
    losses = training_step(task, optimizer, images, targets, precision)
    return dict(losses=losses, finite=all(math.isfinite(v) for v in losses.values()), precision=precision,
                weights=weights, teachers=teacher_rows(task), taps=tap_rows(task), params=param_counts(task))
