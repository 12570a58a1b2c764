"""What a training run is built of, from its config: the task, data and loaders, optimiser, schedule,
grad scaler and EMA, and the one-screen summary of them a run logs first."""
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from timm.data import Mixup
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, random_seed
from torch.utils.data import DataLoader

from ...task.distiller import Distiller
from ...task.report import param_counts, tap_rows, teacher_rows
from ..inputs.config import RunConfig
from ..runtime.cuda_settings import apply_gpu_settings
from ..inputs.data import Datasets, build_datasets, build_loaders, build_mixup
from ..runtime.distributed import DistEnv
from ..runtime.optimizer import build_optimizer, is_sharded
from ..runtime.precision import autocast_dtype, cpu_has_fast_bf16
from ..inputs.task_build import build_task, normalization_from_config

__all__ = ['RunParts', 'build_run_parts']


@dataclass
class RunParts:
    """The objects of one run: what its loop trains, reads and steps."""
    cfg: RunConfig
    env: DistEnv
    precision: str
    task: Distiller
    data: Datasets
    train_loader: DataLoader
    val_loader: DataLoader
    mixup: Optional[Mixup]
    optimizer: torch.optim.Optimizer
    scheduler: Any  # timm's scheduler, stepped once per update
    epochs: int
    updates_per_epoch: int
    scaler: Optional[torch.amp.GradScaler]
    ema: Optional[ModelEmaV3]

    def summary(self, out_dir: Path) -> str:
        """One screen on the models, taps, parameter counts and recipe."""
        cfg, task, env, data = self.cfg, self.task, self.env, self.data
        params = param_counts(task)
        teachers = ', '.join(t['model'] if len(task.teachers) == 1 else
                             f"{t['name']} {t['model']} ({'x'.join(map(str, t['img_size']))}, weight {t['weight']:g}"
                             f"{', kd' if t['kd'] else ''}{', tpp' if t['tpp'] else ''})" for t in teacher_rows(task))
        lines = [f'run {out_dir}  ({env.world_size} process(es) on {env.device}, {self.precision}'
                 + (' picked by precision auto' if cfg.train.precision == 'auto' else '') + ')',
                 f'teacher{"s" if len(task.teachers) > 1 else ""} {teachers or "-"}   student {task.taps.label}   '
                 f'method {task.options.method} at {cfg.data.img_size}px'
                 + (f', teacher forward in {cfg.train.teacher_precision}' if cfg.train.teacher_precision else ''),
                 f"params: student {params['student']:,}  teacher {params['teacher']:,}  distill {params['distill']:,}"]
        for t in tap_rows(task):
            lines.append(f"  tap {t['name']} ({t['path']}{', ' + t['teacher'] if len(task.teachers) > 1 else ''}): "
                         f"{'x'.join(map(str, t['student_shape']))} -> "
                         f"{'x'.join(map(str, t['target_shape']))}, {t['projector']} x{len(t['views'])}, "
                         f"{t['params']:,} params")
        lines.append(f'data {cfg.data.dataset} {cfg.data.root}: {len(data.train)} train / {len(data.val)} '
                     f'val images, {len(data.classes)} classes'
                     + (f', {data.skipped} unreadable image(s) skipped' if data.skipped else ''))
        lines.append(f'recipe: {cfg.optim.opt} lr {cfg.optim.lr} wd {cfg.optim.weight_decay}, {cfg.sched.sched} '
                     f'{self.epochs} epochs (warmup {cfg.sched.warmup_epochs}), batch {cfg.train.batch_size} '
                     f'({self.train_loader.batch_size} x {env.world_size} x {cfg.train.accum_steps}), '
                     f'aug {cfg.data.auto_augment or "none"}, re {cfg.data.re_prob}, ls {cfg.data.label_smoothing}'
                     + (f', optimizer state sharded over {env.world_size} processes' if is_sharded(self.optimizer)
                        else ''))
        return '\n'.join(lines)


def _build_task(cfg: RunConfig, env: DistEnv, precision: str, note: Callable[[str], None]) -> Distiller:
    random_seed(cfg.seed, 0)  # identical initial weights (teacher included) on every rank
    task = build_task(cfg, env.device)
    apply_gpu_settings(cfg, env, task, note)
    for t in cfg.teacher_configs() if task.teachers else []:
        source = t.checkpoint or ('the hub' if t.pretrained else None)
        where, fix = ('teacher', 'teacher.checkpoint or teacher.pretrained') if cfg.teachers is None else \
            (f'teacher {t.name}', 'checkpoint or pretrained in its teachers entry')
        note(f'{where} weights: {source}' if source else f'{where} weights: none given (random): set {fix}')
    if env.device.type == 'cpu' and not cpu_has_fast_bf16() and torch.bfloat16 in (
            autocast_dtype(precision), task.teacher_dtype):
        note('bf16 on a CPU without AVX512-BF16 or AMX is emulated: slower than fp32 here')
    if precision != 'fp32':
        note(f'val top-1 is measured under {precision} autocast; scalekd eval measures in fp32, '
             f'which can differ by a few tenths of a point')
    random_seed(cfg.seed, env.rank)  # then each rank its own stream (drop path, mixup)
    if cfg.train.channels_last:
        task.trainable_module.to(memory_format=torch.channels_last)
    return task


def build_run_parts(cfg: RunConfig, env: DistEnv, precision: str, batch_per_rank: int,
                    note: Callable[[str], None]) -> RunParts:
    """Build a run's objects on every rank alike (what is worth a line in the log goes to ``note``); the
    task is compiled and wrapped for several processes last (the optimizer and the EMA take the plain modules)."""
    tcfg = cfg.train
    task = _build_task(cfg, env, precision, note)
    data = build_datasets(cfg.data, *normalization_from_config(cfg), seed=cfg.seed)
    train_loader, val_loader = build_loaders(data, cfg.data, batch_per_rank, env, cfg.seed)
    optimizer = build_optimizer(task.trainable_module, cfg.optim, env, tcfg.zero,
                                cfg.distill_options().projector_lr_scale)
    if tcfg.zero and not env.distributed:
        note('train.zero: one process, nothing to shard: the optimizer state is whole')
    updates_per_epoch = len(train_loader) // tcfg.accum_steps
    s = cfg.sched
    scheduler, epochs = create_scheduler_v2(
        optimizer, sched=s.sched, num_epochs=s.epochs, decay_epochs=s.decay_epochs, decay_milestones=s.decay_milestones,
        decay_rate=s.decay_rate, min_lr=s.min_lr, warmup_lr=s.warmup_lr, warmup_epochs=s.warmup_epochs,
        step_on_epochs=False, updates_per_epoch=updates_per_epoch)
    parts = RunParts(cfg, env, precision, task, data, train_loader, val_loader, build_mixup(cfg.data), optimizer,
                     scheduler, epochs, updates_per_epoch,
                     scaler=torch.amp.GradScaler(env.device.type) if precision == 'fp16' else None,
                     ema=ModelEmaV3(task.student, decay=tcfg.ema_decay) if tcfg.ema else None)
    if tcfg.compile:
        task.compile()
    if env.distributed:
        task.prepare_distributed(device_ids=[env.local_rank] if env.device.type == 'cuda' else None)
    return parts
