"""Top-1 / top-5 and mean cross entropy of a model over a loader, and the mean of a task's loss terms,
summed over every rank's shard."""
from typing import Dict, Iterator, List, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from timm.loss import SoftTargetCrossEntropy
from timm.utils import accuracy

from ..runtime.distributed import DistEnv, all_reduce_sum
from ..runtime.precision import autocast

__all__ = ['evaluate', 'evaluate_terms']


def _batches(loader, env: DistEnv, channels_last: bool) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """The loader's (images, targets) on the run's device, the images channels-last if asked."""
    for images, targets in loader:
        images, targets = images.to(env.device), targets.to(env.device)
        yield (images.contiguous(memory_format=torch.channels_last) if channels_last else images), targets


@torch.no_grad()
def evaluate(model: nn.Module, loader, env: DistEnv, precision: str, channels_last: bool = False) -> Dict[str, float]:
    """Top-1 / top-5 (percent) and mean cross entropy of ``model`` over every rank's shard (a collective)."""
    was_training = model.training
    model.eval()
    sums = dict(correct1=0.0, correct5=0.0, loss=0.0, count=0.0)
    for images, targets in _batches(loader, env, channels_last):
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


@torch.no_grad()
def evaluate_terms(task: nn.Module, loader, env: DistEnv, precision: str, channels_last: bool = False) -> Dict[str, float]:
    """The mean of each loss term the task returns (``loss``: the weighted total) over every rank's shard
    of ``loader`` (a collective), with the trainable module and the teachers in eval mode: nothing they
    keep (BatchNorm statistics, the teacher-norm statistics) changes."""
    was_training = task.training
    task.train(False)
    # mixup / cutmix runs train on class distributions: their criterion takes the labels as one-hot rows
    classes = task.student.num_classes if isinstance(task.criterion, SoftTargetCrossEntropy) else None
    sums: Dict[str, float] = {}
    count = 0
    for images, targets in _batches(loader, env, channels_last):
        with autocast(precision, env.device):
            terms = task(images, targets if classes is None else nn.functional.one_hot(targets, classes).float())
        for name, value in terms.items():
            if name != 'output':
                sums[name] = sums.get(name, 0.0) + float(value) * targets.shape[0]
        count += targets.shape[0]
    task.train(was_training)
    names = _every_ranks_names(sorted(sums), env)  # (a rank whose shard is empty saw no term)
    totals = all_reduce_sum(dict({n: sums.get(n, 0.0) for n in names}, _count=float(count)), env)
    return {n: totals[n] / max(totals['_count'], 1.0) for n in names}


def _every_ranks_names(names: List[str], env: DistEnv) -> List[str]:
    """The names any rank has, in one order on every rank (a collective)."""
    if not env.distributed:
        return names
    gathered: List[List[str]] = [[] for _ in range(env.world_size)]
    dist.all_gather_object(gathered, names)
    return sorted(set().union(*gathered))
