"""Demo runs trained one after another or in parallel processes, and stopped cleanly.

:func:`train_runs` trains runs in this process, or ``jobs`` at a time, each in a spawned process of its
own with ``cores // jobs`` threads (several one-thread runs use a small CPU better than one run on every
core). However the command stops, no run process outlives it and no queued run starts:

- Ctrl-C or SIGTERM (to the command, or to a run process whose trainer reports it): every run process
  gets SIGTERM (a run under way saves its step and stops), then SIGKILL after a grace period;
  :class:`StudyStopped` says so, with exit code 130 / 143;
- a run process that died (the out-of-memory killer): the others are ended the same way; exit code 1;
- a run's error (data that cannot be read, ...): the others are ended and the error is raised as is;
- the command's process killed: Linux's parent-death signal stops each run process, and a run process
  whose command is gone ends once its run has stopped.
"""
import contextlib
import ctypes
import dataclasses
import multiprocessing
import os
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Dict, Hashable, Iterator, Optional, Sequence, Tuple

import torch

from ..engine.runtime.allocator import keep_freed_memory
from ..engine.inputs.config import RunConfig
from ..engine.runtime.distributed import DistEnv
from ..engine.errors import RunInterrupted, stop_signal
from ..engine.loop.faults import handling

__all__ = ['StudyStopped', 'train_runs']

Run = Hashable  # a run's key, given back to ``record``
Setup = Callable[[RunConfig], Any]  # what every run of a process shares (a test loader), from the first run's config
Train = Callable[[RunConfig, Any, DistEnv], Dict[str, Any]]  # one run: config, shared setup, environment -> result


class StudyStopped(RuntimeError):
    """A study stopped before its end (a signal, a run's process that died); its finished runs are kept."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


_worker: Dict[str, Any] = {}  # a run process's study, stop event, train function and shared setup (_start_worker)


def _start_worker(study: int, stop, threads: int, setup: Setup, first: RunConfig, train: Train, device: str) -> None:
    _worker.update(study=study, stop=stop, train=train)
    if sys.platform == 'linux':  # SIGTERM when the study's process dies, however it dies: no orphan trains on
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    _exit_if_orphaned()  # the study died before the line above
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the study's to act on (a run's trainer still takes it)
    if hasattr(signal, 'pthread_sigmask'):  # blocked since the spawn (_spawning): a Ctrl-C pending from then is dropped
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    torch.set_num_threads(threads)
    keep_freed_memory()
    try:
        _worker.update(env=DistEnv(device=torch.device(device)), shared=setup(first))
    except Exception as e:  # (data that cannot be read): the first run's error, not a process that died
        _worker['error'] = e


def _exit_if_orphaned() -> None:
    """End this pool process when the study's process is gone."""
    if os.getppid() != _worker['study']:
        os._exit(1)


def _train_in_worker(cfg: RunConfig) -> Optional[Dict[str, Any]]:
    """One run in a pool process; ``None`` when the study stopped before it started. A run that ends
    (done, failed, or stopped by a signal: reported to the study) after its study died ends the process:
    the parent-death signal may have come while the run's trainer held the signal handlers, and the
    process would otherwise wait for another run forever."""
    _exit_if_orphaned()
    if _worker['stop'].is_set():
        return None
    if 'error' in _worker:
        raise _worker['error']
    try:
        return _worker['train'](cfg, _worker['shared'], _worker['env'])
    finally:
        _exit_if_orphaned()


@contextlib.contextmanager
def _spawning() -> Iterator[None]:
    """SIGINT blocked in this thread while it starts run processes: each inherits the mask, so a Ctrl-C
    to the terminal's process group while it still imports (before :func:`_start_worker` ignores it) stays
    pending instead of printing a traceback; here it is raised once the mask is restored (the resource
    tracker of :mod:`multiprocessing` starts the same way)."""
    if not hasattr(signal, 'pthread_sigmask'):
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _end_processes(processes: Sequence[multiprocessing.process.BaseProcess], grace_s: float = 60) -> None:
    """SIGTERM to each (a run under way saves its step and stops), then SIGKILL to any left after ``grace_s``."""
    for process in processes:
        process.terminate()
    deadline = time.monotonic() + grace_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


class _Terminated(Exception):
    """SIGTERM reached the study's process (raised there by the handler :func:`train_runs` installs)."""
    signum = signal.SIGTERM


def _raise_terminated(signum: int, frame) -> None:
    raise _Terminated()


def _stopped(error: BaseException, unfinished: int, total: int, output: str) -> StudyStopped:
    """What stopped the study, what it lost, and how to go on."""
    if isinstance(error, BrokenProcessPool):
        cause, code = ("a run's process ended abruptly (killed; by the out-of-memory killer if memory ran short: "
                       'then use fewer --jobs)'), 1
    else:
        signum = stop_signal(error)
        cause, code = f'stopped by {signum.name}', 128 + signum
    return StudyStopped(f'{cause}; {unfinished} of {total} runs not finished. The finished ones are kept under '
                        f'{output}: the same command trains the rest', code)


def _train_here(pending: Sequence[Tuple[Run, RunConfig]], device: torch.device, setup: Setup, train: Train,
                record: Callable[[Run, Dict[str, Any]], None]) -> None:
    """Train the pending runs one after the other in this process."""
    env = DistEnv(device=device)
    shared = setup(pending[0][1]) if pending else None
    for run, cfg in pending:
        record(run, train(cfg, shared, env))


def _train_in_pool(pending: Sequence[Tuple[Run, RunConfig]], jobs: int, device: torch.device, setup: Setup,
                   train: Train, record: Callable[[Run, Dict[str, Any]], None]) -> None:
    """Train the pending runs ``jobs`` at a time, each in a process of its own with ``cores // jobs``
    threads. Any error or stop (a run's error, a signal, a process that died) ends every run's process
    before it is raised: the runs the pool had queued start no training, and a run under way stops
    (the rerun trains it afresh)."""
    threads = max(1, torch.get_num_threads() // jobs)
    context = multiprocessing.get_context('spawn')
    stop = context.Event()
    before = set(multiprocessing.active_children())
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_start_worker,
                             initargs=(os.getpid(), stop, threads, setup, pending[0][1], train, str(device))) as pool:
        try:
            with _spawning():  # (the pool starts its processes as runs are submitted)
                futures = {pool.submit(_train_in_worker, dataclasses.replace(  # (bars of parallel runs would interleave)
                    cfg, log=dataclasses.replace(cfg.log, progress=False))): run for run, cfg in pending}
            for future in as_completed(futures):
                record(futures[future], future.result())
        except BaseException:
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)
            _end_processes(list(set(multiprocessing.active_children()) - before))
            raise


def train_runs(pending: Sequence[Tuple[Run, RunConfig]], jobs: int, device: torch.device, setup: Setup,
               train: Train, record: Callable[[Run, Dict[str, Any]], None], total: int, output: str) -> None:
    """Train each pending ``(key, config)`` with ``train(config, setup(first config), env)``, ``jobs`` at a
    time (in this process when ``jobs`` is 1), calling ``record(key, result)`` as each ends. A signal or a
    run process that died raises :class:`StudyStopped` (``total``: the command's runs, finished ones
    included; ``output``: where they are kept) once no run process is left."""
    done = 0

    def count(run: Run, result: Dict[str, Any]) -> None:
        nonlocal done
        done += 1
        record(run, result)
    with handling((signal.SIGTERM,), _raise_terminated):  # SIGTERM raises here, as SIGINT raises KeyboardInterrupt
        try:
            if jobs <= 1 or len(pending) <= 1:
                _train_here(pending, device, setup, train, count)
            else:
                _train_in_pool(pending, jobs, device, setup, train, count)
        except (KeyboardInterrupt, _Terminated, RunInterrupted, BrokenProcessPool) as e:
            raise _stopped(e, len(pending) - done, total, output) from None
