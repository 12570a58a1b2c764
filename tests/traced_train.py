"""``scalekd`` with test instruments, for runs in child processes (``torchrun tests/traced_train.py train ...``).

- ``SCALEKD_TEST_TRACE=DIR``: every training sample a rank loads is appended to ``DIR/rank{R}.txt``
  (its dataset index, one per line, in loading order; ``data.workers: 0`` keeps that the training order).
- ``SCALEKD_TEST_NAN=R:N``: rank ``R``'s ``N``-th training forward returns a NaN loss.
"""
import os
import sys
from pathlib import Path
from typing import Callable, Optional

from scalekd.cli import console
from scalekd.engine.inputs.data import SeededSamples
from scalekd.task.distiller import Distiller


def trace_samples(folder: Path, rank: Optional[int] = None) -> Callable[[], None]:
    """Record the samples this process loads into ``folder/rank{rank}.txt``; returns the undo."""
    rank = int(os.environ.get('RANK', '0')) if rank is None else rank
    folder.mkdir(parents=True, exist_ok=True)
    log = open(folder / f'rank{rank}.txt', 'a')
    getitem = SeededSamples.__getitem__

    def traced(self, key):
        log.write(f'{key[0]}\n')
        log.flush()
        return getitem(self, key)
    SeededSamples.__getitem__ = traced

    def undo():
        SeededSamples.__getitem__ = getitem
        log.close()
    return undo


def poison_forward(rank: int, call: int) -> None:
    """Make this process's ``call``-th training forward return a NaN loss when it is rank ``rank``."""
    if int(os.environ.get('RANK', '0')) != rank:
        return
    forward, calls = Distiller.forward, [0]

    def poisoned(self, input, target):
        out = forward(self, input, target)
        calls[0] += 1
        if calls[0] == call:
            out['loss'] = out['loss'] * float('nan')
        return out
    Distiller.forward = poisoned


if __name__ == '__main__':
    if os.environ.get('SCALEKD_TEST_TRACE'):
        trace_samples(Path(os.environ['SCALEKD_TEST_TRACE']))
    if os.environ.get('SCALEKD_TEST_NAN'):
        poison_forward(*map(int, os.environ['SCALEKD_TEST_NAN'].split(':')))
    console()
