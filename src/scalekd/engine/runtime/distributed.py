"""Process group set-up from torchrun's environment, the few collectives the engine needs, and the
exit of a process that joined a group."""
import gc
import logging
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Dict, NoReturn, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

from .devices import DeviceError, resolve_device
from ..errors import UserError, error_line

__all__ = ['DistEnv', 'init_distributed', 'all_reduce_sum', 'all_reduce_mean', 'any_rank', 'on_main', 'barrier',
           'cleanup', 'exit_process', 'lost_peer', 'RankError', 'PeerFailure']

T = TypeVar('T')
_joined_group = False  # set once this process joins a process group: exit_process then skips finalization


class RankError(UserError):
    """The main process refused the run (a user error there); every other rank raises it with that message."""


class PeerFailure(RuntimeError):
    """The main process failed with an unexpected error; every other rank raises this, naming the error's
    type (the main process prints its traceback)."""


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the run."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device('cpu')

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = 'auto', timeout_s: int = 1800) -> DistEnv:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``/``MASTER_PORT``); nccl on CUDA, gloo on CPU. One process without them.

    ``device`` follows :func:`scalekd.engine.runtime.devices.resolve_device`; under torchrun each process takes
    ``cuda:LOCAL_RANK``, so an explicit ``cuda:N`` is refused there.
    """
    global _joined_group
    resolved = resolve_device(device)
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    if resolved.type == 'cuda':
        if world_size > 1 and resolved.index is not None:
            raise DeviceError(f'--device {device}: under torchrun each process uses cuda:LOCAL_RANK; pass --device '
                              f'cuda (or auto) and choose GPUs with CUDA_VISIBLE_DEVICES')
        resolved = torch.device('cuda', local_rank if world_size > 1 else resolved.index or 0)
        torch.cuda.set_device(resolved)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend='nccl' if resolved.type == 'cuda' else 'gloo',
                                timeout=timedelta(seconds=timeout_s))
    _joined_group = _joined_group or world_size > 1
    return DistEnv(rank, world_size, local_rank, resolved)


def all_reduce_sum(values: Dict[str, float], env: DistEnv) -> Dict[str, float]:
    """Sum scalar values over all processes (no-op in one process)."""
    if not env.distributed or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def all_reduce_mean(values: Dict[str, float], env: DistEnv) -> Dict[str, float]:
    """Mean of scalar values over all processes."""
    return {k: v / env.world_size for k, v in all_reduce_sum(values, env).items()}


def any_rank(flags: Sequence[torch.Tensor], env: DistEnv) -> list:
    """For each boolean flag, whether it is set on any process: one all-reduce of all of them
    (the single host sync of a training step), so every rank takes the same branch."""
    t = torch.stack([f.detach().reshape(()).to(device=env.device, dtype=torch.float32) for f in flags])
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def on_main(fn: Callable[[], T], env: DistEnv) -> T:
    """``fn()`` on the main process, its result sent to every rank. When it raises, the main process
    raises that error and every other rank raises at once too, instead of waiting for the main process
    until the timeout: :class:`RankError` with the message of a :class:`UserError` (a refusal: the
    folder is in use, no checkpoint loads, a file is missing), else :class:`PeerFailure` naming the
    error's type."""
    if not env.distributed:
        return fn()
    box = [None]
    if env.is_main:
        try:
            box[0] = ('ok', fn())
        except BaseException as e:
            box[0] = ('refused', error_line(e)) if isinstance(e, UserError) else ('failed', type(e).__name__)
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == 'refused':
        raise RankError(value)
    if kind == 'failed':
        raise PeerFailure(f'the main process failed ({value}): see its traceback')
    return value


# what gloo and NCCL say when another process's connection breaks, and when it stops answering
_LOST = ('Connection reset by peer', 'Connection closed by peer', 'Broken pipe', 'remote process exited')
_SILENT = ('Timed out', 'timed out', 'Timeout')


def lost_peer(error: BaseException) -> Optional[str]:
    """One line for a collective that failed because another process of the run ended (its connection
    reset or closed: killed, crashed) or stopped answering for ``train.dist_timeout_s``; ``None`` for any
    other error. The lost process is named where this one can know it: the other of two."""
    text = str(error)
    if not isinstance(error, RuntimeError) or not ('gloo' in text or 'NCCL' in text):
        return None
    rank, world = int(os.environ.get('RANK', '0')), int(os.environ.get('WORLD_SIZE', '1'))
    peer = f'rank {1 - rank}' if world == 2 else 'a peer process'
    if any(s in text for s in _LOST):
        return f'{peer} was lost: it ended or was killed (the launcher reports how)'
    if any(s in text for s in _SILENT):
        return f'{peer} did not answer within train.dist_timeout_s: it is stopped or hung'
    return None


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def cleanup(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End this process with ``code``; one that joined a process group leaves without interpreter
    finalization (``os._exit``), after collecting what the run left to finalizers (loader workers,
    files) and flushing the logs and standard streams.

    Why: gloo's worker threads outlive ``destroy_process_group`` whenever anything still references the
    group, which after a full ``scalekd train`` run is the case even once the trainer is collected. A
    worker that releases a finished collective's tensors while the interpreter finalizes needs the
    GIL, cannot take it, and aborts the process ("terminate called without an active exception",
    SIGABRT) after a run that succeeded: 1 run in 15 on 2 CPU ranks here.
    """
    if not _joined_group:
        sys.exit(code)
    gc.collect()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or file: nothing more can reach it
            pass
    os._exit(code)
