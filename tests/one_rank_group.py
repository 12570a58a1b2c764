"""``scalekd`` under torchrun, its one process run as a distributed run in a real process group (nccl on
CUDA, gloo on CPU): DDP, the engine's collectives, ZeRO and SyncBatchNorm on a single device. Without
this, one process under torchrun joins no group (world size 1) and trains as a plain run.

Usage: ``python -m torch.distributed.run --nproc_per_node 1 one_rank_group.py train CONFIG ...``
"""
from datetime import timedelta

import torch.distributed as dist

from scalekd.engine.runtime import distributed

_plain_init = distributed.init_distributed


class OneRankGroup(distributed.DistEnv):
    """A process group of one rank, which the engine treats as distributed."""

    @property
    def distributed(self) -> bool:
        return True


def _init_group(device: str = 'auto', timeout_s: int = 1800) -> distributed.DistEnv:
    env = _plain_init(device, timeout_s)
    dist.init_process_group(backend='nccl' if env.device.type == 'cuda' else 'gloo',
                            timeout=timedelta(seconds=timeout_s))
    return OneRankGroup(env.rank, env.world_size, env.local_rank, env.device)


if __name__ == '__main__':
    distributed.init_distributed = _init_group  # the train command looks it up when it runs
    from scalekd.cli import console
    console()
