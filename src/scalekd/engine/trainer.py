"""The training engine: builds a run from its config and trains, evaluates, checkpoints and resumes it."""
import dataclasses
import math
import os
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
from timm.loss import create_classification_loss
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, accuracy, random_seed

from ..adapters.models import create_timm_model, input_normalization as model_normalization
from ..task.builder import build_distiller
from ..task.distiller import Distiller
from ..task.report import param_counts, tap_rows
from .checkpoint import (FORMAT_VERSION, CheckpointError, checkpoint_name, checkpoint_position, checkpoints_by_age,
                         latest_checkpoint, read_training_checkpoint, rng_state, save_checkpoint, set_rng_state)
from .config import RunConfig, config_from_dict, config_to_dict, save_config
from .data import build_datasets, build_loaders, build_mixup, seed_epoch
from .distributed import DistEnv, all_reduce_mean, all_reduce_sum, any_rank, barrier, on_main
from .precision import autocast, resolve_precision
from .run_folder import RunFolder
from .run_logger import RunLogger
from .synthetic_step import synthetic_batch, training_step
from .weights import load_weights

__all__ = ['Trainer', 'build_task', 'evaluate', 'dry_run', 'input_normalization', 'RunError', 'RunInterrupted']




class RunError(ValueError):
    """A run that cannot start as asked (output folder, resume, batch split)."""


def input_normalization(cfg: RunConfig) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """The mean / std a run's images are normalised with (one per input channel): ``data.mean`` /
    ``data.std``, else the student's pretrained cfg."""
    return model_normalization(cfg.student.model, cfg.data.in_chans, cfg.data.mean, cfg.data.std)


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


def enable_determinism(device: torch.device) -> None:
    """Deterministic algorithms; on CUDA also cuBLAS's fixed workspace (set before its first use) and
    no cuDNN autotuning."""
    if device.type == 'cuda':
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True)


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: Optional[torch.amp.GradScaler],
                   clip_parameters, clip: Optional[float]) -> None:
    """One update from the accumulated gradients: with a GradScaler, unscale before clipping, and
    the scaler skips the step when a gradient is not finite."""
    if scaler is not None:
        if clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(clip_parameters, clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        if clip:
            torch.nn.utils.clip_grad_norm_(clip_parameters, clip)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class EpochLosses:
    """The loss terms of the current epoch on this rank, summed on the device (no host sync per step).

    Terms of an accumulation window count only once its update is done (a skipped window leaves
    no trace); :meth:`global_sums` adds every rank's sums, which is what a checkpoint stores.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.names: List[str] = []
        self.sums: Optional[torch.Tensor] = None
        self.batches = 0
        self._window: List[torch.Tensor] = []

    def load(self, totals: Dict[str, float], batches: int) -> None:
        """Start from sums carried over (by the main process of a resumed run; none at an epoch's end)."""
        if not totals:
            return self.reset()
        self.names = sorted(totals)
        self.sums = torch.tensor([totals[n] for n in self.names], dtype=torch.float64, device=self.device)
        self.batches = batches

    def add(self, terms: Dict[str, torch.Tensor]) -> None:
        if not self.names:
            self.names = sorted(terms)
        self._window.append(torch.stack([terms[n].detach().double() for n in self.names]))

    def commit(self) -> None:
        if self._window:
            window = torch.stack(self._window).sum(0)
            self.sums = window if self.sums is None else self.sums + window
            self.batches += len(self._window)
        self._window = []

    def discard(self) -> None:
        self._window = []

    def global_sums(self, env: DistEnv) -> Tuple[Dict[str, float], int]:
        """Every rank's sums added (a collective), and the number of batches behind them."""
        sums = self.sums.tolist() if self.sums is not None else [0.0] * len(self.names)
        values = all_reduce_sum({**{f't/{n}': v for n, v in zip(self.names, sums)}, 'batches': self.batches}, env)
        return {n: values[f't/{n}'] for n in self.names}, int(values['batches'])

    def reset(self) -> None:
        self.sums, self.batches, self._window = None, 0, []


@dataclass
class _Progress:
    """Where a run stands; saved in every checkpoint (with the epoch's loss sums of every rank)."""
    epoch: int = 0     # epochs completed
    batch: int = 0     # batches of the current epoch consumed, per process (mid-epoch checkpoints)
    step: int = 0      # optimizer updates done
    best_top1: float = -1.0
    best_top5: float = 0.0
    best_epoch: int = -1
    best_step: int = -1
    nan_skips: int = 0
    history: List[Dict[str, Any]] = field(default_factory=list)


class RunInterrupted(RuntimeError):
    """SIGTERM / SIGINT stopped the run after saving a checkpoint."""


# settings a resumed run may change without changing what it computes
_RESUME_FREE = ('output', 'log.', 'data.root', 'data.workers', 'data.val_batch_size', 'data.check_images',
                'train.keep_checkpoints', 'train.checkpoint_every_steps', 'train.max_nan_skips',
                'train.dist_timeout_s', 'train.deterministic', 'train.compile', 'train.accum_steps')


def _flat(data: Dict[str, Any], prefix: str = '') -> Dict[str, Any]:
    out = {}
    for k, v in data.items():
        out.update(_flat(v, f'{prefix}{k}.') if isinstance(v, dict) and k != 'kwargs' else {f'{prefix}{k}': v})
    return out


def changed_settings(old: RunConfig, new: RunConfig) -> List[str]:
    """``key: old -> new`` for each setting of a resumed run that differs from its checkpoint's."""
    a, b = _flat(config_to_dict(old)), _flat(config_to_dict(new))
    return [f'{k}: {a.get(k)!r} -> {b.get(k)!r}' for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not k.startswith(_RESUME_FREE)]


class Trainer:
    """Everything of one run, built from its config (models, data, optimiser, schedule, logging).

    Args:
        cfg: the validated run config.
        env: this process's place in the (possibly distributed) run.
        resume: ``None``, ``'auto'`` (newest complete checkpoint in the output folder, if any) or a path.
        force: start afresh in an output folder that holds another run (deleting only its files).

    The main process holds the output folder's lock from here to the end of :meth:`fit`.
    """

    def __init__(self, cfg: RunConfig, env: DistEnv, resume: Optional[str] = None, force: bool = False):
        self.cfg, self.env = cfg, env
        tcfg = cfg.train
        if resume and force:
            raise RunError('--resume and --force contradict each other: --resume continues the run in the output '
                           'folder, --force deletes it')
        self.precision = resolve_precision(tcfg.precision, env.device)
        if tcfg.batch_size % (env.world_size * tcfg.accum_steps):
            raise RunError(f'train.batch_size {tcfg.batch_size} does not split over {env.world_size} process(es) '
                           f'x {tcfg.accum_steps} accumulation step(s)')
        self.batch_per_rank = tcfg.batch_size // (env.world_size * tcfg.accum_steps)
        if tcfg.deterministic:
            enable_determinism(env.device)
        self.folder = RunFolder(cfg.output) if env.is_main else None
        self.out_dir = Path(cfg.output)
        self._resume_state: Optional[Dict[str, Any]] = None
        self._notes: List[str] = []  # said in the log once it is open
        self.resumed_from: Optional[Path] = on_main(lambda: self._open_output(resume, force), env)
        try:
            self._build(resume is not None)
        except BaseException:
            if self.folder is not None:
                self.folder.release(failed=True)
            raise

    # -- output folder and resume ----------------------------------------------------------------------
    def _open_output(self, resume: Optional[str], force: bool) -> Optional[Path]:
        """Main process: lock the output folder, then find the checkpoint to resume from (read once,
        kept for :meth:`_load`), or make the folder ready for a fresh run."""
        self.folder.acquire()
        try:
            path = None
            if resume == 'auto':
                path, self._resume_state, passed = latest_checkpoint(self.folder.path)
                self._notes += [f'passed over {p}' for p in passed]
            elif resume:
                path = Path(resume)
                if path.is_dir():
                    raise RunError(f'--resume {path} is a folder: give one of its checkpoint-*.pth, or set output to it '
                                   f'and pass --resume auto')
                inside = path.resolve().parent == self.folder.path.resolve()
                if self.folder.holds_run() and not inside:
                    raise RunError(f'output folder {self.folder.path} holds another run; resume {path} into its own '
                                   f'folder (set output) or use --resume auto')
                self._resume_state = read_training_checkpoint(path)
                if inside:
                    self._set_aside_later(path)
            if not resume or not self.folder.holds_run():  # a new run here: nothing of another may be lost
                removed = self.folder.check_fresh(force)
                self._notes += [f'--force removed the previous run\'s {", ".join(removed)}'] if removed else []
            partial = self.folder.remove_partial_writes()
            self._notes += [f'removed unfinished writes {", ".join(partial)}'] if partial else []
            return path
        except BaseException:
            self.folder.release(failed=True)
            raise

    def _set_aside_later(self, path: Path) -> None:
        """Resuming from an older checkpoint of this folder abandons the history after it: its later
        checkpoints and a best.pth from after it move aside, so that no later resume mixes them in."""
        progress, train = self._resume_state['progress'], self._resume_state['config']['train']
        resumed = (progress['epoch'], progress['batch'] // train.get('accum_steps', 1))
        later = [p for p in checkpoints_by_age(self.folder.path) if checkpoint_position(p.name) > resumed]
        best, step = self.folder.path / 'best.pth', progress['step']
        if best.is_file() and self._best_step_on_disk(best) > step:
            later.append(best)
        if later:
            aside = self.folder.set_aside(later, step)
            self._notes.append(f'resumed from an older checkpoint: {", ".join(p.name for p in later)} of the '
                               f'abandoned history moved to {aside}')

    def _best_step_on_disk(self, best: Path) -> int:
        """The step of the best epoch ``best.pth`` holds (-1 when it does not load, with a note)."""
        try:
            return read_training_checkpoint(best)['progress'].get('best_step', -1)
        except CheckpointError as e:
            self._notes.append(f'best.pth is unreadable ({e})')
            return -1

    def _build(self, resuming: bool) -> None:
        cfg, env, tcfg = self.cfg, self.env, self.cfg.train
        random_seed(cfg.seed, 0)  # identical initial weights (teacher included) on every rank
        self.task = build_task(cfg, env.device)
        if self.task.teacher is not None:
            source = cfg.teacher.checkpoint or ('the hub' if cfg.teacher.pretrained else None)
            self._notes.append(f'teacher weights: {source}' if source else
                               'teacher weights: none given (random): set teacher.checkpoint or teacher.pretrained')
        random_seed(cfg.seed, env.rank)  # then each rank its own stream (drop path, mixup)
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
        self.losses = EpochLosses(env.device)
        self._buffers = list(self.task.trainable_module.buffers())  # running statistics a forward updates
        if self.resumed_from is not None:
            state = self._resume_state if env.is_main else read_training_checkpoint(self.resumed_from)
            self._load(state, self.resumed_from)
        self._resume_state = None
        if env.is_main:
            self.folder.mark(fresh=not resuming)
            save_config(cfg, self.out_dir / 'config.yaml')
        barrier(env)
        self.logger = RunLogger(self.out_dir, cfg.log, enabled=env.is_main, wandb_config=config_to_dict(cfg),
                                start_step=self.progress.step)
        for note in self._notes:
            self.logger.info(note)
        if self.resumed_from is not None:
            self.logger.info(f'resumed from {self.resumed_from} at epoch {self.progress.epoch} + '
                             f'{self.progress.batch} batches, step {self.progress.step}')
        self._stop_signal: Optional[int] = None

    def _load(self, state: Dict[str, Any], path: Path) -> None:
        """Continue from a training checkpoint, on this run's number of processes and accumulation
        steps (the same global image position: an epoch is one global order dealt round-robin to the
        processes, see :class:`scalekd.engine.data.EpochSampler`). The config's optimizer settings and
        schedule apply from the resumed step on; another global batch is refused."""
        if 'optimizer' not in state:
            raise CheckpointError(f'{path} holds a student for eval / export, not a training state; resume from a '
                                  f'checkpoint-*.pth')
        old = config_from_dict(state['config'], where=str(path))
        if old.train.batch_size != self.cfg.train.batch_size:
            raise RunError(f'{path} was trained with train.batch_size {old.train.batch_size}, this run asks for '
                           f'{self.cfg.train.batch_size}: a run\'s data order, steps and schedule are those of its '
                           f'global batch; resume with train.batch_size {old.train.batch_size} (on any number of '
                           f'processes and accumulation steps that divide it) or start a new run')
        hyper = [{k: v for k, v in g.items() if k != 'params'} for g in self.optimizer.param_groups]
        try:
            self.task.student.load_state_dict(state['student'])
            self.task.load_task_state(state['task_state'])
            self.optimizer.load_state_dict(state['optimizer'])
        except (RuntimeError, ValueError, KeyError) as e:
            detail = ' '.join(line.strip() for line in str(e).splitlines())
            raise CheckpointError(f'{path} does not fit this run ({self.cfg.student.model}, method '
                                  f'{self.cfg.distill.method}): {detail[:400]}') from None
        for group, values in zip(self.optimizer.param_groups, hyper):  # the config's lr, decay, momentum ...
            group.update(values)
        if self.scaler is not None and state.get('scaler'):
            self.scaler.load_state_dict(state['scaler'])
        if self.ema is not None and state.get('ema'):
            self.ema.module.load_state_dict(state['ema'])
        progress = dict(state['progress'])
        totals, batches = progress.pop('totals', {}), progress.pop('batches', 0)
        self.progress = _Progress(**progress)
        self.losses.load(totals if self.env.is_main else dict.fromkeys(totals, 0.0), batches if self.env.is_main else 0)
        self.progress.batch = self.progress.batch // old.train.accum_steps * self.cfg.train.accum_steps
        self.scheduler.step_update(self.progress.step)  # the config's schedule, at the resumed step
        rngs = state['rng']
        if len(rngs) == self.env.world_size:
            set_rng_state(rngs[self.env.rank], self.env.device)
        else:  # another number of processes: data order and augmentations carry over, not the other streams
            random_seed(self.cfg.seed + self.progress.step, self.env.rank)
        if self.env.is_main:
            changed = changed_settings(old, self.cfg)
            self._notes += [f'settings changed since the checkpoint, applied: {"; ".join(changed)}'] if changed else []
            self._reconcile_best(state)

    def _reconcile_best(self, state: Dict[str, Any]) -> None:
        """Make ``best.pth`` hold the resumed progress's best epoch: rewrite it when the resumed state is
        that epoch (a kill between the two writes); when it cannot be restored, track the best afresh
        from here, so that best.pth and the recorded best always agree."""
        p, best = self.progress, self.out_dir / 'best.pth'
        if p.best_step < 0 or (best.is_file() and self._best_step_on_disk(best) == p.best_step):
            return
        if p.best_step == p.step and p.batch == 0:
            save_checkpoint(self._best_state(state), best)
            self._notes.append(f'best.pth rewritten from the resumed checkpoint (epoch {p.best_epoch})')
            return
        self._notes.append(f'the best epoch so far ({p.best_epoch}, top-1 {p.best_top1:.2f}) is not in best.pth and '
                           f'the resumed checkpoint cannot restore it: the best epoch is tracked afresh from here')
        p.best_top1, p.best_top5, p.best_epoch, p.best_step = -1.0, 0.0, -1, -1

    # -- checkpoints ---------------------------------------------------------------------------
    def _state(self) -> Dict[str, Any]:
        """The full training state; every rank takes part (RNG states and loss sums are gathered)."""
        rngs = [None] * self.env.world_size
        if self.env.distributed:
            dist.all_gather_object(rngs, rng_state(self.env.device))
        else:
            rngs = [rng_state(self.env.device)]
        totals, batches = self.losses.global_sums(self.env)
        return dict(
            format_version=FORMAT_VERSION,
            progress=dict(dataclasses.asdict(self.progress), totals=totals, batches=batches),
            world_size=self.env.world_size,
            student=self.task.student.state_dict(), task_state=self.task.get_task_state(),
            optimizer=self.optimizer.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler is not None else None,
            ema=self.ema.module.state_dict() if self.ema is not None else None,
            rng=rngs, config=config_to_dict(self.cfg))

    @staticmethod
    def _best_state(state: Dict[str, Any]) -> Dict[str, Any]:
        """What eval and export need of a training state."""
        return {k: state[k] for k in ('format_version', 'progress', 'student', 'ema', 'config')}

    def _save(self, is_best: bool = False) -> Path:
        """Checkpoint the current state (all ranks take part; the main process writes), then best.pth,
        then drop the oldest checkpoints of the run's series beyond ``train.keep_checkpoints``."""
        state = self._state()
        path = self.out_dir / checkpoint_name(self.progress.epoch, self.progress.batch // self.cfg.train.accum_steps)
        if self.env.is_main:
            self.folder.record(path, self.progress.step)
            save_checkpoint(state, path)
            if is_best:
                save_checkpoint(self._best_state(state), self.out_dir / 'best.pth')
            protect = [self.resumed_from] if self.resumed_from is not None else []
            self.folder.prune(self.cfg.train.keep_checkpoints, protect)
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

    def _non_finite(self, terms: Dict[str, torch.Tensor], epoch: int, window_start: int) -> None:
        """Every rank, after agreeing that some rank's loss is not finite: skip the accumulation
        window (``train.max_nan_skips``), or save the state from before it once and raise."""
        p = self.progress
        flags = any_rank([~torch.isfinite(v.detach()) for v in terms.values()], self.env)
        bad = ', '.join(k for k, f in zip(terms, flags) if f)
        where = f'epoch {epoch + 1}, step {p.step + 1}'
        if p.nan_skips < self.cfg.train.max_nan_skips:
            p.nan_skips += 1
            self.logger.info(f'non-finite loss at {where} ({bad}): update skipped '
                             f'({p.nan_skips}/{self.cfg.train.max_nan_skips} skips used)')
            return
        p.batch = window_start
        self.losses.discard()
        path = self._save()
        raise FloatingPointError(f'non-finite loss at {where} in term(s) {bad}; the state before it is saved in '
                                 f'{path}: continue from it with a lower learning rate (--resume auto -o optim.lr=...; '
                                 f'the new rate applies from there) or skip such updates (--max-nan-skips N)')

    def train_one_epoch(self, epoch: int) -> Dict[str, float]:
        """Train the rest of one epoch; the epoch's mean loss terms over every rank, and images / s.

        Each micro-batch costs one host sync: an all-reduce of two flags (a non-finite loss on any
        rank, a stop signal on any rank) that every rank acts on alike.
        """
        task, cfg, env, p = self.task, self.cfg, self.env, self.progress
        accum = cfg.train.accum_steps
        seed_epoch(self.train_loader, cfg.seed, epoch, env.rank, start_batch=p.batch)
        task.train()
        seen, start = 0, time.perf_counter()
        total = self.updates_per_epoch * accum
        bar = self.logger.progress(self.train_loader, total - p.batch, f'{self.out_dir.name} epoch {epoch + 1}/{self.epochs}')
        skip_window, stop, terms = False, False, {}
        for images, targets in bar:
            if p.batch >= total:
                break
            boundary = (p.batch + 1) % accum == 0
            if not skip_window:
                images, targets = self._step_inputs(images, targets)
                before = [b.clone() for b in self._buffers]
                with task.no_sync() if not boundary else nullcontext():
                    with autocast(self.precision, env.device):
                        out = task(images, targets)
                    terms = {k: v.detach().float() for k, v in out.items() if k != 'output'}
                    non_finite, stop = any_rank([~torch.isfinite(terms['loss']),
                                                 torch.tensor(self._stop_signal is not None)], env)
                    if non_finite:  # undo what the bad forward did to the norm layers' running statistics
                        for buffer, value in zip(self._buffers, before):
                            buffer.copy_(value)
                        self._non_finite(terms, epoch, p.batch - p.batch % accum)
                        skip_window = True
                    else:
                        loss = out['loss'] / accum
                        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
                        self.losses.add(terms)
                seen += images.shape[0]
            p.batch += 1
            if boundary:
                self._update(skip_window)
                if not skip_window and (p.step == 1 or p.step % cfg.log.interval == 0):
                    self._log_step(epoch, terms, bar, seen, start)
                skip_window = False
                self._maybe_checkpoint_or_stop(stop, last=p.batch >= total)
        totals, batches = self.losses.global_sums(env)
        means = {k: v / max(batches, 1) for k, v in totals.items()}
        means['img_per_s'] = seen * env.world_size / max(time.perf_counter() - start, 1e-9)
        self.losses.reset()
        p.batch = 0
        return means

    def _maybe_checkpoint_or_stop(self, stop: bool, last: bool) -> None:
        """Mid-epoch checkpoints every ``train.checkpoint_every_steps``; save and stop on SIGTERM / SIGINT
        (``stop`` is already agreed by every rank)."""
        every = self.cfg.train.checkpoint_every_steps
        if stop or (every and self.progress.step % every == 0 and not last):
            path = self._save()
            if stop:
                raise RunInterrupted(f'stopped by signal {self._stop_signal or "on another rank"} at step '
                                     f'{self.progress.step}; checkpoint {path}; continue with --resume auto')

    def _update(self, skip: bool) -> None:
        """The optimizer step of an accumulation window (none for a skipped window, whose gradients
        are dropped); the schedule advances either way."""
        if skip:
            self.optimizer.zero_grad(set_to_none=True)
            self.losses.discard()
        else:
            optimizer_step(self.optimizer, self.scaler, self.task.get_clip_parameters(), self.cfg.optim.clip_grad)
            self.losses.commit()
        self.progress.step += 1
        if self.ema is not None and not skip:
            self.ema.update(self.task.student, step=self.progress.step)
        self.scheduler.step_update(self.progress.step)

    def _log_step(self, epoch: int, terms: Dict[str, torch.Tensor], bar, seen: int, start: float) -> None:
        """A train line (the last micro-batch's terms, averaged over ranks: the only other host sync)."""
        values = all_reduce_mean({k: float(v) for k, v in terms.items()}, self.env)
        record = dict(values, epoch=epoch + 1, step=self.progress.step, lr=self.optimizer.param_groups[0]['lr'])
        self.logger.metrics(record, self.progress.step, 'train')
        if bar is not self.train_loader:
            rate = seen * self.env.world_size / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix({k: f'{v:.3g}' for k, v in values.items()} | {'img/s': f'{rate:.0f}'}, refresh=False)

    def _request_stop(self, signum, frame) -> None:
        self._stop_signal = signum

    def fit(self) -> Dict[str, Any]:
        """Train from where the run stands to the last epoch; the best top-1 / top-5 and their epoch.

        SIGTERM and SIGINT finish the current step, save a checkpoint and raise :class:`RunInterrupted`.
        The output folder's lock is let go at the end, whatever happens.
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
            if self.folder is not None:
                self.folder.release()

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
                    p.best_step = p.step
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
    images, targets = synthetic_batch(task, batch, cfg.train.channels_last)
    losses = training_step(task, optimizer, images, targets, precision)
    return dict(losses=losses, finite=all(math.isfinite(v) for v in losses.values()), precision=precision,
                taps=tap_rows(task), params=param_counts(task))
