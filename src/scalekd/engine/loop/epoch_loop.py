"""One epoch of training, in small steps that each return an outcome: a micro-batch's result
(:class:`MicroStep`), an accumulation window's (:class:`Window`, with its :class:`Decision`), and
whether a checkpoint is due.

An epoch is a series of windows of ``train.accum_steps`` micro-batches; each ends in one decision:
update, skip (a non-finite loss while ``train.max_nan_skips`` allows) or stop (a non-finite loss
beyond it). The invariants, on every rank:

- Every rank takes the same decisions: each forwarded micro-batch costs one all-reduce of two flags
  (a non-finite loss, a stop signal, on any rank), and every rank reaches the collectives (lines
  marked "every rank") in the same order.
- ``Progress.updates`` counts the windows of the epoch done, skipped ones too: an epoch resumes
  ``updates x accum_steps`` micro-batches in, on any number of processes (the sampler's global order).
  The schedule steps once per window, whatever its decision.
- The norm layers' running statistics are copied at a window's first micro-batch; a window that is
  skipped or stops gets them back, so none of its forwards leaves a trace.
- A window's loss terms count once its update is done (:class:`~scalekd.engine.loop.epoch_losses.EpochLosses`).
- Checkpoints are taken between windows: after an update (every ``train.checkpoint_every_steps``
  updates, and before a stop signal ends the run), or, when a non-finite loss stops the run, of
  the state from before the window.
"""
import enum
import itertools
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, Optional, Tuple

import torch

from ..inputs.config import RunConfig
from ..inputs.data import seed_epoch
from ..runtime.distributed import DistEnv, all_reduce_mean, all_reduce_sum, any_rank
from .epoch_losses import EpochLosses
from .faults import NonFiniteLoss, NormStatistics, StopSignal, judge_non_finite, non_finite_flags
from ..runtime.memory import peak_memory_mb
from ..runtime.optimizer import optimizer_step
from ..runtime.precision import autocast
from .run_logger import RunLogger
from .run_parts import RunParts
from ..run_folder.training_state import Progress

__all__ = ['EpochLoop', 'Decision', 'MicroStep', 'Window']


class Decision(enum.Enum):
    """What every rank does at the end of an accumulation window."""
    UPDATE = 'update'
    SKIP = 'skip'   # a non-finite loss within the skip budget: no update, gradients dropped
    STOP = 'stop'   # a non-finite loss beyond it: the run saves the state from before the window and stops


@dataclass
class MicroStep:
    """One micro-batch's loss terms (detached) and the flags every rank agreed on."""
    terms: Dict[str, torch.Tensor]
    non_finite: bool
    stop_signal: bool


@dataclass
class Window:
    """An accumulation window's outcome on this rank."""
    images: int = 0  # images forwarded
    terms: Dict[str, torch.Tensor] = field(default_factory=dict)  # of the last finite micro-batch
    stop_signal: bool = False  # a stop signal reached some rank
    fault: Optional[NonFiniteLoss] = None  # a non-finite loss on some rank

    @property
    def decision(self) -> Decision:
        if self.fault is None:
            return Decision.UPDATE
        return Decision.SKIP if self.fault.skip else Decision.STOP


@dataclass
class _Pace:
    """Images forwarded on this rank since the epoch (or its resumed part) began."""
    bar: Iterable
    images: int = 0
    start: float = field(default_factory=time.perf_counter)

    def rate(self, world_size: int) -> float:
        return self.images * world_size / max(time.perf_counter() - self.start, 1e-9)


class EpochLoop:
    """Trains a run's epochs window by window (see the module's invariants).

    Args:
        parts: the run's objects.
        progress: where the run stands, advanced here.
        losses: the epoch's loss sums, added to here.
        logger: the run's log.
        save: writes a checkpoint of the run as it stands (every rank calls it); its path.
    """

    def __init__(self, parts: RunParts, progress: Progress, losses: EpochLosses, logger: RunLogger,
                 save: Callable[[], Path]):
        self.parts, self.progress, self.losses, self.logger, self.save = parts, progress, losses, logger, save
        self.cfg: RunConfig = parts.cfg
        self.env: DistEnv = parts.env
        self.accum = self.cfg.train.accum_steps
        self.norm_stats = NormStatistics(parts.task.trainable_module)
        self.stop = StopSignal()

    def train_one_epoch(self, epoch: int) -> Dict[str, float]:
        """Train the rest of one epoch; the epoch's mean loss terms over every rank, and images / s."""
        self.parts.task.train()
        pace = _Pace(self._epoch_batches(epoch))
        batches = iter(pace.bar)
        try:
            for _ in range(self.progress.updates, self.parts.updates_per_epoch):
                window = self._window(itertools.islice(batches, self.accum), epoch)
                pace.images += window.images
                self._end_window(window, epoch, pace)
        finally:  # the loader's workers end with the iterator, which an error's traceback keeps alive
            getattr(batches, 'close', lambda: None)()
        self.progress.updates = 0
        return self._epoch_means(pace)

    def _epoch_batches(self, epoch: int) -> Iterable:
        """The loader from the epoch's position on (behind a progress bar on the main process)."""
        p, loader = self.progress, self.parts.train_loader
        seed_epoch(loader, self.cfg.seed, epoch, self.env.rank, start_batch=p.updates * self.accum)
        total = (self.parts.updates_per_epoch - p.updates) * self.accum
        return self.logger.progress(loader, total, f'{Path(self.cfg.output).name} epoch {epoch + 1}/{self.parts.epochs}')

    def _window(self, batches: Iterator[Tuple[torch.Tensor, torch.Tensor]], epoch: int) -> Window:
        """Forward and backward the window's micro-batches until one has a non-finite loss on some rank;
        the rest of a skipped window is read and left (the data position moves on by whole windows)."""
        window, before = Window(), self.norm_stats.snapshot()
        for i, (images, targets) in enumerate(batches):
            if window.fault is not None:
                continue
            images, targets = self._inputs(images, targets)
            step = self._micro_step(images, targets, last=i == self.accum - 1)
            window.images += images.shape[0]
            window.stop_signal = step.stop_signal
            if step.non_finite:
                window.fault = self._judge(step.terms, epoch)
                if window.decision is Decision.STOP:
                    break
            else:
                self.losses.add(step.terms)
                window.terms = step.terms
        if window.fault is not None:  # undo what the window's forwards did to the norm layers
            self.norm_stats.restore(before)
        return window

    def _inputs(self, images: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        images = images.to(self.env.device, non_blocking=True)
        targets = targets.to(self.env.device, non_blocking=True)
        if self.cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.parts.mixup is not None:
            images, targets = self.parts.mixup(images, targets)
        return images, targets

    def _micro_step(self, images: torch.Tensor, targets: torch.Tensor, last: bool) -> MicroStep:
        """Forward one micro-batch, agree on its flags with every rank, and backward a finite loss
        (gradients are synchronised over ranks at the window's last micro-batch only)."""
        task, scaler = self.parts.task, self.parts.scaler
        with task.no_sync() if not last else nullcontext():
            with autocast(self.parts.precision, self.env.device):
                out = task(images, targets)
            terms = {k: v.detach().float() for k, v in out.items() if k != 'output'}
            non_finite, stop = any_rank([~torch.isfinite(terms['loss']), self.stop.flag()], self.env)  # every rank
            if not non_finite:
                loss = out['loss'] / self.accum
                (scaler.scale(loss) if scaler is not None else loss).backward()
        return MicroStep(terms, non_finite, stop)

    def _judge(self, terms: Dict[str, torch.Tensor], epoch: int) -> NonFiniteLoss:
        """Skip or stop, and which terms were not finite on some rank (every rank)."""
        flags = any_rank(non_finite_flags(terms), self.env)
        p = self.progress
        return judge_non_finite(list(terms), flags, p.nan_skips, self.cfg.train.max_nan_skips, epoch, p.step)

    def _end_window(self, window: Window, epoch: int, pace: _Pace) -> None:
        """Act on the window's decision (every rank): stop, saving the state from before the window; or
        update (skip), log the step, and checkpoint when due, then stop on a signal."""
        if window.decision is Decision.STOP:
            self.losses.discard()
            raise window.fault.error(self.save())
        self._update(window)
        if window.decision is Decision.UPDATE and self._step_logged():
            self._log_step(window.terms, epoch, pace)
        if window.stop_signal or self._checkpoint_due():
            path = self.save()
            if window.stop_signal:
                stopped = self.stop.interrupted(self.progress.step, path)
                self.logger.info(str(stopped))  # in train.log too (main process)
                raise stopped

    def _update(self, window: Window) -> None:
        """The optimizer step of a window (none for a skipped window, whose gradients are dropped); the
        schedule and the position advance either way."""
        parts, p = self.parts, self.progress
        if window.decision is Decision.SKIP:
            parts.optimizer.zero_grad(set_to_none=True)
            self.losses.discard()
            p.nan_skips = window.fault.skips_used
            self.logger.info(window.fault.note())
        else:
            optimizer_step(parts.optimizer, parts.scaler, parts.task.get_clip_parameters(), self.cfg.optim.clip_grad)
            self.losses.commit()
        p.step += 1
        p.updates += 1
        if parts.ema is not None and window.decision is Decision.UPDATE:
            parts.ema.update(parts.task.student, step=p.step)
        parts.scheduler.step_update(p.step)

    def _step_logged(self) -> bool:
        step = self.progress.step
        return step == 1 or step % self.cfg.log.interval == 0

    def _checkpoint_due(self) -> bool:
        """Whether the update just done is one of ``train.checkpoint_every_steps`` inside the epoch (its
        end has a checkpoint of its own)."""
        every, p = self.cfg.train.checkpoint_every_steps, self.progress
        return bool(every) and p.step % every == 0 and p.updates < self.parts.updates_per_epoch

    def _log_step(self, terms: Dict[str, torch.Tensor], epoch: int, pace: _Pace) -> None:
        """A train line of the window's last micro-batch's terms, averaged over ranks (every rank)."""
        means = all_reduce_mean({k: float(v) for k, v in terms.items()}, self.env)
        p = self.progress
        record = dict(means, epoch=epoch + 1, step=p.step, lr=self.parts.optimizer.param_groups[0]['lr'])
        self.logger.metrics(record, p.step, 'train')
        if pace.bar is not self.parts.train_loader:
            pace.bar.set_postfix({k: f'{v:.3g}' for k, v in means.items()}
                                 | {'img/s': f'{pace.rate(self.env.world_size):.0f}'}, refresh=False)

    def _epoch_means(self, pace: _Pace) -> Dict[str, float]:
        """The epoch's mean loss terms, images / s and the peak memory of the rank that holds the most
        (every rank); the loss sums start afresh."""
        means = self.losses.means(self.env)
        means['img_per_s'] = pace.rate(self.env.world_size)
        env = self.env
        peaks = all_reduce_sum({str(r): peak_memory_mb(env.device) if r == env.rank else 0.0
                                for r in range(env.world_size)}, env)
        means['peak_mem_mb'] = max(peaks.values())
        self.losses.reset()
        return means
