"""The training engine: builds a run from its config and trains, evaluates, checkpoints and resumes it."""
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from timm.loss import create_classification_loss
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, accuracy, random_seed

from ..adapters.models import classes_kwargs, create_timm_model, input_normalization as model_normalization
from ..task.builder import build_distiller
from ..task.distiller import Distiller
from ..task.report import param_counts, tap_rows
from .checkpoint import checkpoint_name, read_training_checkpoint
from .config import RunConfig, config_to_dict, save_config
from .cuda_settings import apply_gpu_settings
from .data import build_datasets, build_loaders, build_mixup, seed_epoch
from .distributed import DistEnv, all_reduce_mean, all_reduce_sum, any_rank, barrier, on_main
from .epoch_losses import EpochLosses
from .faults import NormStatistics, StopSignal, judge_non_finite, non_finite_flags
from .memory import peak_memory_mb, reset_peak_memory
from .optimizer import build_optimizer, gather_optimizer_state, is_sharded, optimizer_step
from .precision import autocast, autocast_dtype, cpu_has_fast_bf16, resolve_precision, resolve_teacher_dtype
from .errors import RunError, RunInterrupted
from .run_folder import check_output_path
from .run_logger import RunLogger
from .run_output import RunOutput, check_resume_request
from .synthetic_step import synthetic_batch, training_step
from .training_state import Progress, TrainingState, changed_settings, gather_rng_states, restore_rng_states
from .weights import load_weights

__all__ = ['Trainer', 'build_task', 'evaluate', 'dry_run', 'input_normalization', 'RunError', 'RunInterrupted',
           'changed_settings']


def input_normalization(cfg: RunConfig) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """The mean / std a run's images are normalised with (one per input channel): ``data.mean`` /
    ``data.std``, else the student's pretrained cfg."""
    return model_normalization(cfg.student.model, cfg.data.in_chans, cfg.data.mean, cfg.data.std)


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
        teacher_dtype=resolve_teacher_dtype(cfg.train.teacher_precision, device),
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


class Trainer:
    """One run, built from its config (models, data, optimiser, schedule, logging), and its training loop.

    Args:
        cfg: the validated run config.
        env: this process's place in the (possibly distributed) run.
        resume: ``None``, ``'auto'`` (newest complete checkpoint in the output folder, if any) or a path.
        force: start afresh in an output folder that holds another run (deleting only its files).

    The main process holds the output folder (:class:`~scalekd.engine.run_output.RunOutput`) from here
    to the end of :meth:`fit`. Lines marked "every rank" are collectives: each rank reaches them together.
    """

    def __init__(self, cfg: RunConfig, env: DistEnv, resume: Optional[str] = None, force: bool = False):
        self.cfg, self.env = cfg, env
        tcfg = cfg.train
        check_resume_request(resume, force)
        self.precision = resolve_precision(tcfg.precision, env.device)
        resolve_teacher_dtype(tcfg.teacher_precision, env.device)  # refused now, before the output folder is touched
        if tcfg.batch_size % (env.world_size * tcfg.accum_steps):
            raise RunError(f'train.batch_size {tcfg.batch_size} does not split over {env.world_size} process(es) '
                           f'x {tcfg.accum_steps} accumulation step(s)')
        self.batch_per_rank = tcfg.batch_size // (env.world_size * tcfg.accum_steps)
        if tcfg.deterministic:
            enable_determinism(env.device)
        self.out_dir = check_output_path(cfg.output)
        self._notes: List[str] = []  # said in the log once it is open
        self.output = RunOutput(cfg.output, tcfg.keep_checkpoints, self._notes.append,
                                ('config.yaml', *RunLogger.files(cfg.log))) if env.is_main else None
        # every rank: the main process opens the folder, every rank learns the checkpoint it resumes from
        self.resumed_from: Optional[Path] = on_main(lambda: self.output.open(resume, force), env)
        try:
            self._build(resume is not None)
        except BaseException:
            if self.output is not None:
                self.output.release(failed=True)
            raise

    def _build(self, resuming: bool) -> None:
        cfg, env, tcfg = self.cfg, self.env, self.cfg.train
        random_seed(cfg.seed, 0)  # identical initial weights (teacher included) on every rank
        self.task = build_task(cfg, env.device)
        apply_gpu_settings(cfg, env, self.task, self._notes.append)
        if self.task.teacher is not None:
            source = cfg.teacher.checkpoint or ('the hub' if cfg.teacher.pretrained else None)
            self._notes.append(f'teacher weights: {source}' if source else
                               'teacher weights: none given (random): set teacher.checkpoint or teacher.pretrained')
        if env.device.type == 'cpu' and not cpu_has_fast_bf16() and torch.bfloat16 in (
                autocast_dtype(self.precision), self.task.teacher_dtype):
            self._notes.append('bf16 on a CPU without AVX512-BF16 or AMX is emulated: slower than fp32 here')
        if self.precision != 'fp32':
            self._notes.append(f'val top-1 is measured under {self.precision} autocast; scalekd eval measures in fp32, '
                               f'which can differ by a few tenths of a point')
        random_seed(cfg.seed, env.rank)  # then each rank its own stream (drop path, mixup)
        if tcfg.channels_last:
            self.task.trainable_module.to(memory_format=torch.channels_last)
        mean, std = input_normalization(cfg)
        self.data = build_datasets(cfg.data, mean, std, seed=cfg.seed)
        self.train_loader, self.val_loader = build_loaders(self.data, cfg.data, self.batch_per_rank, env, cfg.seed)
        self.mixup = build_mixup(cfg.data)

        self.optimizer = build_optimizer(self.task.trainable_module, cfg.optim, env, tcfg.zero)
        if tcfg.zero and not env.distributed:
            self._notes.append('train.zero: one process, nothing to shard: the optimizer state is whole')
        self.updates_per_epoch = len(self.train_loader) // tcfg.accum_steps
        self.scheduler, self.epochs = create_scheduler_v2(
            self.optimizer, sched=cfg.sched.sched, num_epochs=cfg.sched.epochs, decay_epochs=cfg.sched.decay_epochs,
            decay_milestones=cfg.sched.decay_milestones, decay_rate=cfg.sched.decay_rate, min_lr=cfg.sched.min_lr,
            warmup_lr=cfg.sched.warmup_lr, warmup_epochs=cfg.sched.warmup_epochs, step_on_epochs=False,
            updates_per_epoch=self.updates_per_epoch)
        self.scaler = torch.amp.GradScaler(env.device.type) if self.precision == 'fp16' else None
        self.ema = ModelEmaV3(self.task.student, decay=tcfg.ema_decay) if tcfg.ema else None
        if tcfg.compile:
            self.task.compile()
        if env.distributed:
            self.task.prepare_distributed(device_ids=[env.local_rank] if env.device.type == 'cuda' else None)

        self.training_state = TrainingState(cfg, self.task, self.optimizer, self.scaler, self.ema)
        self.progress = Progress()
        self.losses = EpochLosses(env.device)
        self.norm_stats = NormStatistics(self.task.trainable_module)
        self.stop = StopSignal()
        if self.resumed_from is not None:
            self._resume()
        # every rank: before anything is written, the main process checks the folder has room for checkpoints
        on_main(lambda: self.output.check_space(self.training_state.checkpoint_bytes()), env)
        if env.is_main:
            self.output.start(fresh=not resuming)
            save_config(cfg, self.out_dir / 'config.yaml')
        barrier(env)  # every rank
        self.logger = RunLogger(self.out_dir, cfg.log, enabled=env.is_main, wandb_config=config_to_dict(cfg),
                                start_step=self.progress.step)
        for note in self._notes:
            self.logger.info(note)
        if self.resumed_from is not None:
            self.logger.info(f'resumed from {self.resumed_from} at epoch {self.progress.epoch} + '
                             f'{self.progress.batch} batches, step {self.progress.step}')
        if not reset_peak_memory(env.device):  # peak memory figures: of the training, not of the build
            self.logger.info('peak memory figures include the model build: this system cannot reset the peak')

    def _resume(self) -> None:
        """Continue from the checkpoint :attr:`resumed_from` (the main process read it when opening the
        folder), on this run's number of processes and accumulation steps (the same global image
        position: an epoch is one global order dealt round-robin to the processes, see
        :class:`scalekd.engine.data.EpochSampler`), with the config's schedule from the resumed step on.
        The main process carries the epoch's loss sums."""
        main = self.output is not None
        state = self.output.take_resume_state() if main else read_training_checkpoint(self.resumed_from)
        resumed = self.training_state.load(state, self.resumed_from)
        self.progress = p = resumed.progress
        self.losses.load(resumed.totals if main else dict.fromkeys(resumed.totals, 0.0), resumed.batches if main else 0)
        self.scheduler.step_update(p.step)
        restore_rng_states(resumed.rngs, self.env, self.cfg.seed + p.step)
        if main:
            changed = changed_settings(resumed.config, self.cfg)
            self._notes += [f'settings changed since the checkpoint, applied: {"; ".join(changed)}'] if changed else []
            self.output.reconcile_best(p, state)

    def _save(self, is_best: bool = False) -> Path:
        """Checkpoint the current state: every rank takes part (RNG streams and loss sums are
        gathered), the main process writes."""
        rngs = gather_rng_states(self.env)
        totals, batches = self.losses.global_sums(self.env)
        optimizer_state = gather_optimizer_state(self.optimizer, self.env)
        p = self.progress
        name = checkpoint_name(p.epoch, p.batch // self.cfg.train.accum_steps)
        if self.output is not None:
            state = self.training_state.state_dict(p, totals, batches, rngs, optimizer_state)
            self.output.write(state, name, p.step, is_best)
        return self.out_dir / name

    # -- training ------------------------------------------------------------------------------
    def summary(self) -> str:
        """One screen on the models, taps, parameter counts and recipe."""
        cfg, task = self.cfg, self.task
        teacher = task.teacher
        params = param_counts(task)
        lines = [f'run {self.out_dir}  ({self.env.world_size} process(es) on {self.env.device}, {self.precision})',
                 f'teacher {teacher.label if teacher else "-"}   student {task.taps.label}   '
                 f'method {task.options.method} at {cfg.data.img_size}px'
                 + (f', teacher forward in {cfg.train.teacher_precision}' if cfg.train.teacher_precision else ''),
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
                     f'aug {cfg.data.auto_augment or "none"}, re {cfg.data.re_prob}, ls {cfg.data.label_smoothing}'
                     + (f', optimizer state sharded over {self.env.world_size} processes' if is_sharded(self.optimizer)
                        else ''))
        return '\n'.join(lines)

    def _step_inputs(self, images, targets):
        images = images.to(self.env.device, non_blocking=True)
        targets = targets.to(self.env.device, non_blocking=True)
        if self.cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        return images, targets

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
                before = self.norm_stats.snapshot()
                with task.no_sync() if not boundary else nullcontext():
                    with autocast(self.precision, env.device):
                        out = task(images, targets)
                    terms = {k: v.detach().float() for k, v in out.items() if k != 'output'}
                    # every rank: a non-finite loss, a stop signal, on any rank
                    non_finite, stop = any_rank([~torch.isfinite(terms['loss']), self.stop.flag()], env)
                    if non_finite:  # undo what the bad forward did to the norm layers' running statistics
                        self.norm_stats.restore(before)
                        flags = any_rank(non_finite_flags(terms), env)  # every rank: which terms, on any rank
                        bad = judge_non_finite(list(terms), flags, p.nan_skips, cfg.train.max_nan_skips, epoch, p.step)
                        if not bad.skip:
                            p.batch -= p.batch % accum  # the state from before the window
                            self.losses.discard()
                            raise bad.error(self._save())  # every rank
                        p.nan_skips = bad.skips_used
                        self.logger.info(bad.note())
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
                    means = all_reduce_mean({k: float(v) for k, v in terms.items()}, env)  # every rank
                    self._log_step(epoch, means, bar, seen, start)
                skip_window = False
                every = cfg.train.checkpoint_every_steps
                if stop or (every and p.step % every == 0 and p.batch < total):
                    path = self._save()  # every rank: mid-epoch checkpoint, or the one before stopping
                    if stop:
                        stopped = self.stop.interrupted(p.step, path)
                        self.logger.info(str(stopped))  # in train.log too (main process)
                        raise stopped
        totals, batches = self.losses.global_sums(env)  # every rank
        means = {k: v / max(batches, 1) for k, v in totals.items()}
        means['img_per_s'] = seen * env.world_size / max(time.perf_counter() - start, 1e-9)
        peaks = all_reduce_sum({str(r): peak_memory_mb(env.device) if r == env.rank else 0.0  # every rank
                                for r in range(env.world_size)}, env)
        means['peak_mem_mb'] = max(peaks.values())  # of the rank that holds the most
        self.losses.reset()
        p.batch = 0
        return means

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

    def _log_step(self, epoch: int, means: Dict[str, float], bar, seen: int, start: float) -> None:
        """A train line of the last micro-batch's terms, ``means`` over ranks."""
        record = dict(means, epoch=epoch + 1, step=self.progress.step, lr=self.optimizer.param_groups[0]['lr'])
        self.logger.metrics(record, self.progress.step, 'train')
        if bar is not self.train_loader:
            rate = seen * self.env.world_size / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix({k: f'{v:.3g}' for k, v in means.items()} | {'img/s': f'{rate:.0f}'}, refresh=False)

    def fit(self) -> Dict[str, Any]:
        """Train from where the run stands to the last epoch; the best top-1 / top-5 and their epoch.

        SIGTERM and SIGINT finish the current step, save a checkpoint and raise :class:`RunInterrupted`.
        The output folder's lock is let go at the end, whatever happens.
        """
        try:
            with self.stop.installed():
                return self._fit()
        except RunInterrupted:  # logged where the stop is taken
            raise
        except Exception as e:
            self.logger.failed(e)
            raise
        finally:
            self.logger.close()
            if self.output is not None:
                self.output.release()

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
    """Build a config's models at full size, load local weight files (``teacher.checkpoint``, so a file
    that does not fit is found now; hub weights are not fetched) and run one training step on a
    synthetic batch (no data, no output folder); returns the loss terms, parameter counts and weights."""
    random_seed(cfg.seed, 0)
    task = build_task(cfg, device, random_weights=True)
    weights = {}
    for role, model_cfg, model in (('teacher', cfg.teacher, task.teacher and task.teacher.model),
                                   ('student', cfg.student, task.student)):
        if model is None:
            continue
        if model_cfg.checkpoint:
            load_weights(model, model_cfg.checkpoint, what=f'{role} {model_cfg.model}')
        weights[role] = (f'loaded {model_cfg.checkpoint}' if model_cfg.checkpoint else
                         'hub weights (not fetched by --dry-run)' if model_cfg.pretrained else 'random')
    precision = resolve_precision(cfg.train.precision, device)
    optimizer = build_optimizer(task.trainable_module, cfg.optim, DistEnv(device=device))
    images, targets = synthetic_batch(task, batch, cfg.train.channels_last)
    losses = training_step(task, optimizer, images, targets, precision)
    return dict(losses=losses, finite=all(math.isfinite(v) for v in losses.values()), precision=precision,
                weights=weights, taps=tap_rows(task), params=param_counts(task))
