"""What a run does about faults: a loss that is not finite (skip its accumulation window or stop),
the normalisation statistics the bad forward changed, and SIGTERM / SIGINT.

Nothing here communicates: the training loop reduces the flags over ranks
(:func:`~scalekd.engine.runtime.distributed.any_rank`) and hands the agreed values in, so every rank takes
the same decision.
"""
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn as nn

from ..errors import LossNotFinite, RunInterrupted

__all__ = ['NormStatistics', 'NonFiniteLoss', 'judge_non_finite', 'non_finite_flags', 'StopSignal', 'STOP_SIGNALS', 'ignore_stop_signals', 'handling']


NORM_STATISTICS = ('running_mean', 'running_var', 'num_batches_tracked')


class NormStatistics:
    """The running statistics of ``module``'s norm layers (:data:`NORM_STATISTICS`, the buffers a
    training forward updates), to undo the forwards of an accumulation window whose loss is not finite."""

    def __init__(self, module: nn.Module):
        self.buffers = [b for m in module.modules() for name, b in m.named_buffers(recurse=False)
                        if name in NORM_STATISTICS]

    def snapshot(self) -> List[torch.Tensor]:
        """Copies of the statistics as they are now (taken before a window's first forward)."""
        return [b.clone() for b in self.buffers]

    def restore(self, snapshot: Sequence[torch.Tensor]) -> None:
        """Put a :meth:`snapshot` back in place."""
        for buffer, value in zip(self.buffers, snapshot):
            buffer.copy_(value)


def non_finite_flags(terms: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
    """For each loss term, whether it is not finite on this rank (to be reduced over ranks)."""
    return [~torch.isfinite(v.detach()) for v in terms.values()]


@dataclass(frozen=True)
class NonFiniteLoss:
    """A non-finite loss every rank agreed on: where, in which terms, and whether its window is skipped."""
    where: str
    terms: str
    skip: bool
    skips_used: int
    max_skips: int

    def note(self) -> str:
        """The log line of a skipped window."""
        return (f'non-finite loss at {self.where} ({self.terms}): update skipped '
                f'({self.skips_used}/{self.max_skips} skips used)')

    def error(self, saved: Path) -> LossNotFinite:
        """The stop, naming the checkpoint of the state from before the window."""
        return LossNotFinite(
            f'non-finite loss at {self.where} in term(s) {self.terms}; the state before it is saved in {saved}: '
            f'continue from it with a lower learning rate (--resume auto -o optim.lr=...; the new rate applies '
            f'from there) or skip such updates (--max-nan-skips N)')


def judge_non_finite(names: Sequence[str], flags: Sequence[bool], skips_used: int, max_skips: int,
                     epoch: int, step: int) -> NonFiniteLoss:
    """Skip the window while fewer than ``max_skips`` (``train.max_nan_skips``) were used, else stop.

    ``flags`` are :func:`non_finite_flags` reduced over ranks; ``epoch`` and ``step`` count from 0 and
    are those of the update the window would make. ``skips_used`` counts this skip when it is one.
    """
    skip = skips_used < max_skips
    return NonFiniteLoss(where=f'epoch {epoch + 1}, step {step + 1}',
                         terms=', '.join(n for n, f in zip(names, flags) if f), skip=skip,
                         skips_used=skips_used + skip, max_skips=max_skips)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # a scheduler, Ctrl-C, a closed terminal


@contextmanager
def handling(signals: Sequence[int], handler: Callable[[int, Any], None]) -> Iterator[None]:
    """``handler`` for ``signals`` inside the block, set from the main thread only (Python sets handlers
    nowhere else; in another thread the block runs with the handlers as they are); the previous
    handlers come back after."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A data-loader worker's ``worker_init_fn``: the stop signals are ignored there. A scheduler signals
    the job's whole process group; a worker killed by it would crash the trainer before it saves, while
    the trainer's process finishes the step, saves and stops (its workers end with the loader, or once
    the trainer's process is gone)."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


class StopSignal:
    """SIGTERM / SIGINT / SIGHUP while training: recorded by the handler, acted on by every rank at the
    next step (:meth:`flag` is reduced over ranks with the non-finite flag)."""

    SIGNALS = STOP_SIGNALS

    def __init__(self):
        self.signum: Optional[int] = None

    @contextmanager
    def installed(self) -> Iterator['StopSignal']:
        """Catch the signals inside the block (from the main thread only); the old handlers come back after."""
        with handling(self.SIGNALS, self._record):
            yield self

    def _record(self, signum, frame) -> None:
        self.signum = signum

    def flag(self) -> torch.Tensor:
        """Whether this process received a signal."""
        return torch.tensor(self.signum is not None)

    def interrupted(self, step: int, saved: Path) -> RunInterrupted:
        """The stop after saving ``saved`` at ``step`` (on every rank; the signal may have come to another)."""
        return RunInterrupted(f'stopped by signal {self.signum or "on another rank"} at step {step}; checkpoint '
                              f'{saved}; continue with --resume auto', self.signum)
