"""The training engine: builds a run from its config and trains, evaluates, checkpoints and resumes it."""
import dataclasses
import math
import shutil
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.loss import create_classification_loss
from timm.models import get_pretrained_cfg_value
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, accuracy, random_seed

from .builder import build_distiller
from .checkpoint import (checkpoints_by_age, latest_checkpoint, load_checkpoint, rng_state, save_checkpoint,
                         set_rng_state)
from .config import RunConfig, config_to_dict, save_config
from .data import build_datasets, build_loaders, build_mixup, seed_epoch
from .distiller import Distiller
from .distributed import DistEnv, all_reduce_mean, all_reduce_sum, barrier
from .inspection import param_counts, tap_rows
from .models import create_timm_model
from .precision import autocast, resolve_precision
from .run_logger import RunLogger
from .weights import load_weights

__all__ = ['Trainer', 'build_task', 'evaluate', 'dry_run', 'input_normalization', 'RunError', 'RunInterrupted']


class RunError(ValueError):
    """A run that cannot start as asked (output folder, resume, batch split)."""


def input_normalization(cfg: RunConfig) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """The mean / std the data is normalised with: the config's, else the student's pretrained cfg."""
    if cfg.data.mean is not None and cfg.data.std is not None:
        return tuple(cfg.data.mean), tuple(cfg.data.std)
    name = cfg.student.model
    mean = get_pretrained_cfg_value(name, 'mean') if name else None
    std = get_pretrained_cfg_value(name, 'std') if name else None
    return tuple(mean or IMAGENET_DEFAULT_MEAN), tuple(std or IMAGENET_DEFAULT_STD)


def _create(model_cfg, data_cfg, role: str, random_weights: bool) -> nn.Module:
    if not model_cfg.model:
        raise RunError(f'{role}.model is not set')
    model = create_timm_model(model_cfg.model, (data_cfg.img_size, data_cfg.img_size), role=role,
                              pretrained=model_cfg.pretrained and not random_weights,
                              num_classes=data_cfg.num_classes, in_chans=data_cfg.in_chans, **model_cfg.kwargs)
    if model_cfg.checkpoint and not random_weights:
        load_weights(model, model_cfg.checkpoint, what=f'{role} {model_cfg.model}')
    return model


def build_task(cfg: RunConfig, device: torch.device, random_weights: bool = False) -> Distiller:
    """The distiller of a config: teacher weights from the hub or a local file, student from scratch."""
    options = cfg.distill_options()
    needs_teacher = options.kd or options.uses_features
    teacher = _create(cfg.teacher, cfg.data, 'teacher', random_weights) if needs_teacher else None
    student = _create(cfg.student, cfg.data, 'student', random_weights)
    mean, std = input_normalization(cfg)
    soft_targets = cfg.data.mixup > 0 or cfg.data.cutmix > 0
    criterion = create_classification_loss(loss_type='bce' if cfg.data.bce_loss else 'ce',
                                           smoothing=cfg.data.label_smoothing, soft_targets=soft_targets)
    distiller = build_distiller(
        teacher, student, img_size=cfg.data.img_size, in_chans=cfg.data.in_chans, criterion=criterion,
        input_mean=mean, input_std=std, teacher_mean=cfg.teacher.mean, teacher_std=cfg.teacher.std,
        **{k: v for k, v in vars(cfg.distill).items()})
    return distiller.to(device)


@torch.no_grad()
def evaluate(model: nn.Module, loader, env: DistEnv, precision: str, channels_last: bool = False) -> Dict[str, float]:
    """Top-1 / top-5 (percent) and mean cross entropy of ``model`` over every rank's shard."""
    was_training = model.training
    model.eval()
    sums = dict(correct1=0.0, correct5=0.0, loss=0.0, count=0.0)
    for images, targets in loader:
        images, targets = images.to(env.device), targets.to(env.device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(precision, env.device):
            logits = model(images)
        logits = logits.float()
        top1, top5 = accuracy(logits, targets, topk=(1, min(5, logits.shape[-1])))
        n = targets.shape[0]
        sums['correct1'] += top1.item() * n / 100
        sums['correct5'] += top5.item() * n / 100
        sums['loss'] += nn.functional.cross_entropy(logits, targets, reduction='sum').item()
        sums['count'] += n
    model.train(was_training)
    sums = all_reduce_sum(sums, env)
    count = max(sums['count'], 1.0)
    return dict(top1=100 * sums['correct1'] / count, top5=100 * sums['correct5'] / count,
                loss=sums['loss'] / count, count=int(sums['count']))


@dataclass
class _Progress:
    """Where a run stands; saved in every checkpoint."""
    epoch: int = 0     # epochs completed
    batch: int = 0     # batches of the current epoch consumed (mid-epoch checkpoints)
    step: int = 0      # optimizer updates done
    best_top1: float = -1.0
    best_top5: float = 0.0
    best_epoch: int = -1
    nan_skips: int = 0
    totals: Dict[str, float] = field(default_factory=dict)  # loss sums of the current epoch
    seen: int = 0                                            # images of the current epoch (this rank)
    history: List[Dict[str, Any]] = field(default_factory=list)


class RunInterrupted(RuntimeError):
    """SIGTERM / SIGINT stopped the run after saving a checkpoint."""


class Trainer:
    """Everything of one run, built from its config (models, data, optimiser, schedule, logging).

    Args:
        cfg: the validated run config.
        env: this process's place in the (possibly distributed) run.
        resume: ``None``, ``'auto'`` (newest complete checkpoint in the output folder, if any) or a path.
        force: start afresh in an output folder that holds another run.
    """

    def __init__(self, cfg: RunConfig, env: DistEnv, resume: Optional[str] = None, force: bool = False):
        self.cfg, self.env = cfg, env
        tcfg = cfg.train
        self.precision = resolve_precision(tcfg.precision, env.device)
        if tcfg.batch_size % (env.world_size * tcfg.accum_steps):
            raise RunError(f'train.batch_size {tcfg.batch_size} does not split over {env.world_size} process(es) '
                           f'x {tcfg.accum_steps} accumulation step(s)')
        self.batch_per_rank = tcfg.batch_size // (env.world_size * tcfg.accum_steps)
        if tcfg.deterministic:
            torch.use_deterministic_algorithms(True)
        self.out_dir = Path(cfg.output)
        resume_path = self._resume_path(resume, force)  # checks the output folder; writes nothing

        random_seed(cfg.seed, 0)  # identical initial weights (teacher included) on every rank
        self.task = build_task(cfg, env.device)
        random_seed(cfg.seed, env.rank)  # then each rank its own stream (augmentation, drop path)
        if tcfg.channels_last:
            self.task.trainable_module.to(memory_format=torch.channels_last)
        mean, std = input_normalization(cfg)
        self.data = build_datasets(cfg.data, mean, std, seed=cfg.seed)
        self.train_loader, self.val_loader = build_loaders(self.data, cfg.data, self.batch_per_rank, env, cfg.seed)
        self.mixup = build_mixup(cfg.data)

        self.optimizer = create_optimizer_v2(self.task.trainable_module, opt=cfg.optim.opt, lr=cfg.optim.lr,
                                             weight_decay=cfg.optim.weight_decay, momentum=cfg.optim.momentum)
        self.updates_per_epoch = len(self.train_loader) // tcfg.accum_steps
        self.scheduler, self.epochs = create_scheduler_v2(
            self.optimizer, sched=cfg.sched.sched, num_epochs=cfg.sched.epochs, decay_epochs=cfg.sched.decay_epochs,
            decay_milestones=cfg.sched.decay_milestones, decay_rate=cfg.sched.decay_rate, min_lr=cfg.sched.min_lr,
            warmup_lr=cfg.sched.warmup_lr, warmup_epochs=cfg.sched.warmup_epochs, step_on_epochs=False,
            updates_per_epoch=self.updates_per_epoch)
        self.scaler = torch.amp.GradScaler(env.device.type) if self.precision == 'fp16' else None
        self.ema = ModelEmaV3(self.task.student, decay=tcfg.ema_decay) if tcfg.ema else None
        if tcfg.compile:
            self.task.trainable_module = torch.compile(self.task.trainable_module)
        if env.distributed:
            self.task.prepare_distributed(device_ids=[env.local_rank] if env.device.type == 'cuda' else None)

        self.progress = _Progress()
        if resume_path is not None:
            self._load(resume_path)
        if env.is_main:
            if force and resume_path is None and (self.out_dir / 'config.yaml').exists():
                shutil.rmtree(self.out_dir)
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out_dir / 'config.yaml')
        barrier(env)
        self.logger = RunLogger(self.out_dir, cfg.log, enabled=env.is_main, wandb_config=config_to_dict(cfg))
        if resume_path is not None:
            self.logger.info(f'resumed from {resume_path} at epoch {self.progress.epoch} + '
                             f'{self.progress.batch} batches, step {self.progress.step}')
        self._stop_signal: Optional[int] = None

    # -- output folder, checkpoints and resume ---------------------------------------------------
    def _resume_path(self, resume: Optional[str], force: bool) -> Optional[Path]:
        if resume == 'auto':
            return latest_checkpoint(self.out_dir)
        if resume:
            return Path(resume)
        if (self.out_dir / 'config.yaml').exists() and not force:
            raise RunError(f'output folder {self.out_dir} already holds a run; pass --resume auto to continue '
                           f'it or --force to start over')
        return None

    def _state(self) -> Dict[str, Any]:
        rngs = [None] * self.env.world_size
        if self.env.distributed:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        return dict(
            progress=dataclasses.asdict(self.progress), world_size=self.env.world_size,
            student=self.task.student.state_dict(), task_state=self.task.get_task_state(),
            optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler is not None else None,
            ema=self.ema.module.state_dict() if self.ema is not None else None,
            rng=rngs, config=config_to_dict(self.cfg))

    def _load(self, path: Path) -> None:
        state = load_checkpoint(path)
        self.task.student.load_state_dict(state['student'])
        self.task.load_task_state(state['task_state'])
        self.optimizer.load_state_dict(state['optimizer'])
        self.scheduler.load_state_dict(state['scheduler'])
        if self.scaler is not None and state.get('scaler'):
            self.scaler.load_state_dict(state['scaler'])
        if self.ema is not None and state.get('ema'):
            self.ema.module.load_state_dict(state['ema'])
        self.progress = _Progress(**state['progress'])
        rngs = state['rng']
        if len(rngs) == self.env.world_size:
            set_rng_state(rngs[self.env.rank])
        else:  # a different number of processes: the global batch and schedule carry over, not the streams
            random_seed(self.cfg.seed + self.progress.step, self.env.rank)
            self.progress.batch = self.progress.batch * state['world_size'] // self.env.world_size

    def _save(self, is_best: bool = False) -> Optional[Path]:
        """Checkpoint the current state (all ranks take part; rank 0 writes)."""
        state = self._state()
        if not self.env.is_main:
            return None
        p = self.progress
        name = f'checkpoint-{p.epoch:04d}.pth' if p.batch == 0 else f'checkpoint-{p.epoch:04d}-{p.batch:06d}.pth'
        path = self.out_dir / name
        save_checkpoint(state, path)
        if is_best:
            save_checkpoint(state, self.out_dir / 'best.pth')
        for old in checkpoints_by_age(self.out_dir)[:-self.cfg.train.keep_checkpoints]:
            old.unlink()
        return path

    # -- training ------------------------------------------------------------------------------
    def summary(self) -> str:
        """One screen on the models, taps, parameter counts and recipe."""
        cfg, task = self.cfg, self.task
        teacher = task.teacher
        params = param_counts(task)
        lines = [f'run {self.out_dir}  ({self.env.world_size} process(es) on {self.env.device}, {self.precision})',
                 f'teacher {teacher.label if teacher else "-"}   student {task.taps.label}   '
                 f'method {task.options.method} at {cfg.data.img_size}px',
                 f"params: student {params['student']:,}  teacher {params['teacher']:,}  distill {params['distill']:,}"]
        for t in tap_rows(task):
            lines.append(f"  tap {t['name']} ({t['path']}): {'x'.join(map(str, t['student_shape']))} -> "
                         f"{'x'.join(map(str, t['target_shape']))}, {t['projector']} x{len(t['views'])}, "
                         f"{t['params']:,} params")
        lines.append(f'data {cfg.data.dataset} {cfg.data.root}: {len(self.data.train)} train / {len(self.data.val)} '
                     f'val images, {len(self.data.classes)} classes'
                     + (f', {self.data.skipped} unreadable image(s) skipped' if self.data.skipped else ''))
        lines.append(f'recipe: {cfg.optim.opt} lr {cfg.optim.lr} wd {cfg.optim.weight_decay}, {cfg.sched.sched} '
                     f'{self.epochs} epochs (warmup {cfg.sched.warmup_epochs}), batch {cfg.train.batch_size} '
                     f'({self.batch_per_rank} x {self.env.world_size} x {cfg.train.accum_steps}), '
                     f'aug {cfg.data.auto_augment or "none"}, re {cfg.data.re_prob}, ls {cfg.data.label_smoothing}')
        return '\n'.join(lines)

    def _step_inputs(self, images, targets):
        images = images.to(self.env.device, non_blocking=True)
        targets = targets.to(self.env.device, non_blocking=True)
        if self.cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        return images, targets

    def _check_finite(self, terms: Dict[str, float], epoch: int) -> bool:
        """True to train on this batch; False to skip it (``max_nan_skips``); raises when out of skips."""
        if math.isfinite(terms['loss']):
            return True
        p = self.progress
        bad = ', '.join(k for k, v in terms.items() if not math.isfinite(v))
        where = f'epoch {epoch + 1}, step {p.step + 1}'
        if p.nan_skips < self.cfg.train.max_nan_skips:
            p.nan_skips += 1
            self.logger.info(f'non-finite loss at {where} ({bad}): batch skipped '
                             f'({p.nan_skips}/{self.cfg.train.max_nan_skips} skips used)')
            self.optimizer.zero_grad(set_to_none=True)
            return False
        path = self._save()
        raise FloatingPointError(f'non-finite loss at {where} in term(s) {bad}; the state before it is saved in '
                                 f'{path}; lower the learning rate or allow --max-nan-skips')

    def train_one_epoch(self, epoch: int) -> Dict[str, float]:
        task, cfg, env, p = self.task, self.cfg, self.env, self.progress
        accum = cfg.train.accum_steps
        seed_epoch(self.train_loader, cfg.seed, epoch, start_batch=p.batch)
        task.train()
        seen, start = 0, time.perf_counter()
        total = self.updates_per_epoch * accum
        bar = self.logger.progress(self.train_loader, total - p.batch, f'{self.out_dir.name} epoch {epoch + 1}/{self.epochs}')
        for images, targets in bar:
            if p.batch >= total:
                break
            images, targets = self._step_inputs(images, targets)
            boundary = (p.batch + 1) % accum == 0
            with task.no_sync() if not boundary else nullcontext():
                with autocast(self.precision, env.device):
                    out = task(images, targets)
                terms = {k: v.detach().float().item() for k, v in out.items() if k != 'output'}
                if self._check_finite(terms, epoch):
                    loss = out['loss'] / accum
                    (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
                    for k, v in terms.items():
                        p.totals[k] = p.totals.get(k, 0.0) + v
                    p.seen += images.shape[0]
            seen += images.shape[0]
            p.batch += 1
            if boundary:
                self._update()
                if p.step == 1 or p.step % cfg.log.interval == 0:
                    self._log_step(epoch, terms)
                self._maybe_checkpoint_or_stop(last=p.batch >= total)
            if bar is not self.train_loader:
                rate = seen * env.world_size / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix({k: f'{v:.3g}' for k, v in terms.items()} | {'img/s': f'{rate:.0f}'}, refresh=False)
        self.scheduler.step(epoch + 1)
        batches = max(p.seen // self.batch_per_rank, 1)
        means = all_reduce_mean({k: v / batches for k, v in p.totals.items()}, env)
        means['img_per_s'] = seen * env.world_size / max(time.perf_counter() - start, 1e-9)
        p.totals, p.seen, p.batch = {}, 0, 0
        return means

    def _maybe_checkpoint_or_stop(self, last: bool) -> None:
        """Mid-epoch checkpoints every ``train.checkpoint_every_steps``; save and stop on SIGTERM / SIGINT."""
        stop = self._stop_signal is not None
        if self.env.distributed:  # every rank must agree, or the checkpoint's collectives would hang
            stop = all_reduce_sum({'stop': float(stop)}, self.env)['stop'] > 0
        every = self.cfg.train.checkpoint_every_steps
        if stop or (every and self.progress.step % every == 0 and not last):
            path = self._save()
            if stop:
                raise RunInterrupted(f'stopped by signal {self._stop_signal or "on another rank"} at step '
                                     f'{self.progress.step}; checkpoint {path}; continue with --resume auto')

    def _update(self) -> None:
        clip = self.cfg.optim.clip_grad
        if self.scaler is not None:
            if clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.task.get_clip_parameters(), clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if clip:
                torch.nn.utils.clip_grad_norm_(self.task.get_clip_parameters(), clip)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.step += 1
        if self.ema is not None:
            self.ema.update(self.task.student, step=self.progress.step)
        self.scheduler.step_update(self.progress.step)

    def _log_step(self, epoch: int, terms: Dict[str, float]) -> None:
        record = all_reduce_mean(terms, self.env)
        record.update(epoch=epoch + 1, step=self.progress.step, lr=self.optimizer.param_groups[0]['lr'])
        self.logger.metrics(record, self.progress.step, 'train')

    def _request_stop(self, signum, frame) -> None:
        self._stop_signal = signum

    def fit(self) -> Dict[str, Any]:
        """Train from where the run stands to the last epoch; the best top-1 / top-5 and their epoch.

        SIGTERM and SIGINT finish the current step, save a checkpoint and raise :class:`RunInterrupted`.
        """
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            handlers = {s: signal.signal(s, self._request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            return self._fit()
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
            self.logger.close()

    def _fit(self) -> Dict[str, Any]:
        cfg, p = self.cfg, self.progress
        self.logger.info(self.summary())
        for epoch in range(p.epoch, self.epochs):
            train = self.train_one_epoch(epoch)
            record = dict(epoch=epoch + 1, step=p.step, lr=self.optimizer.param_groups[0]['lr'],
                          **{f'train_{k}': v for k, v in train.items()})
            is_best = False
            if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == self.epochs:
                val = evaluate(self.task.student, self.val_loader, self.env, self.precision, cfg.train.channels_last)
                record.update({f'val_{k}': v for k, v in val.items()})
                if self.ema is not None:
                    ema = evaluate(self.ema.module, self.val_loader, self.env, self.precision, cfg.train.channels_last)
                    record.update({f'ema_{k}': v for k, v in ema.items()})
                    val = max(val, ema, key=lambda m: m['top1'])
                if val['top1'] > p.best_top1:
                    p.best_top1, p.best_top5, p.best_epoch, is_best = val['top1'], val['top5'], epoch + 1, True
            p.history.append(record)
            p.epoch = epoch + 1
            self.logger.metrics(record, p.step, 'epoch')
            self.logger.info(' '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in record.items()))
            self._save(is_best)
        best = dict(top1=p.best_top1, top5=p.best_top5, epoch=p.best_epoch)
        self.logger.info(f'best top-1 {best["top1"]:.2f}  top-5 {best["top5"]:.2f}  (epoch {best["epoch"]})')
        return best


def dry_run(cfg: RunConfig, device: torch.device, batch: int = 2) -> Dict[str, Any]:
    """Build a config's models at full size with random weights and run one training step on a
    synthetic batch (no data, no output folder); returns the loss terms and parameter counts."""
    random_seed(cfg.seed, 0)
    task = build_task(cfg, device, random_weights=True)
    precision = resolve_precision(cfg.train.precision, device)
    optimizer = create_optimizer_v2(task.trainable_module, opt=cfg.optim.opt, lr=cfg.optim.lr,
                                    weight_decay=cfg.optim.weight_decay, momentum=cfg.optim.momentum)
    d = cfg.data
    images = torch.randn(batch, d.in_chans, d.img_size, d.img_size, device=device)
    targets = torch.randint(0, d.num_classes, (batch,), device=device)
    if cfg.train.channels_last:
        task.trainable_module.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    task.train()
    with autocast(precision, device):
        out = task(images, targets)
    out['loss'].backward()
    optimizer.step()
    losses = {k: float(v.detach()) for k, v in out.items() if k != 'output'}
    return dict(losses=losses, finite=all(math.isfinite(v) for v in losses.values()), precision=precision,
                taps=tap_rows(task), params=param_counts(task))
