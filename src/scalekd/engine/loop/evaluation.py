"""Top-1 / top-5 and mean cross entropy of a model over a loader, summed over every rank's shard."""
from typing import Dict

import torch
import torch.nn as nn
from timm.utils import accuracy

from ..runtime.distributed import DistEnv, all_reduce_sum
from ..runtime.precision import autocast

__all__ = ['evaluate']


@torch.no_grad()
def evaluate(model: nn.Module, loader, env: DistEnv, precision: str, channels_last: bool = False) -> Dict[str, float]:
    """Top-1 / top-5 (percent) and mean cross entropy of ``model`` over every rank's shard (a collective)."""
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
