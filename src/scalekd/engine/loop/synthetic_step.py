"""One training step on a random batch: what ``train --dry-run``, ``inspect`` and ``bench`` run."""
from typing import Dict, Tuple

import torch

from ...task.distiller import Distiller
from ..runtime.precision import autocast

__all__ = ['synthetic_batch', 'training_step']


def synthetic_batch(task: Distiller, batch: int, channels_last: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Random images of the task's size and random labels, on its device. With ``channels_last`` the
    trainable module and the images are put in that memory format, as a run with that setting does."""
    device = next(task.trainable_module.parameters()).device
    images = torch.randn(batch, task.in_chans, *task.img_size, device=device)
    targets = torch.randint(0, task.student.num_classes, (batch,), device=device)
    if channels_last:
        task.trainable_module.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets


def training_step(task: Distiller, optimizer: torch.optim.Optimizer, images: torch.Tensor, targets: torch.Tensor,
                  precision: str = 'fp32') -> Dict[str, float]:
    """Forward (under ``precision``'s autocast), backward, optimizer step, gradients cleared; the weighted
    ``loss`` and every unweighted term as floats."""
    task.train()
    with autocast(precision, images.device):
        out = task(images, targets)
    out['loss'].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {k: float(v.detach()) for k, v in out.items() if k != 'output'}
