"""Process group set-up from torchrun's environment, and the few collectives the engine needs."""
import os
from datetime import timedelta
from dataclasses import dataclass
from typing import Dict

import torch
import torch.distributed as dist

__all__ = ['DistEnv', 'init_distributed', 'all_reduce_sum', 'all_reduce_mean', 'barrier', 'cleanup']


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
    ``MASTER_ADDR``/``MASTER_PORT``); nccl on CUDA, gloo on CPU. One process without them."""
    use_cuda = torch.cuda.is_available() if device == 'auto' else device == 'cuda'
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device('cuda', local_rank)
    else:
        dev = torch.device('cpu')
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend='nccl' if use_cuda else 'gloo', timeout=timedelta(seconds=timeout_s))
    return DistEnv(rank, world_size, local_rank, dev)


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


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def cleanup(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()
