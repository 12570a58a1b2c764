"""Per-teacher standardisation of the feature targets (``distill.teacher_norm``), for several teachers.

The distance D (:func:`~scalekd.method.losses.feature_distance`) L2-normalises every position's
feature vector, so a teacher whose features are all 100 times larger already gives the same terms.
What D does not balance is the spread *across channels*: a few channels of very large magnitude or
offset (as DINOv2 / CLIP ViTs have) decide the normalised target almost alone, and a teacher's
channels then weigh by their scale, not by what they carry. ``standardize`` gives each channel of a
teacher's target unit spread, ``z(t) = (t - mean_c) / std_c`` with the target's per-channel
statistics: the projectors at s3 and s4 learn to predict ``z(t)``, and the proxy path's output (which
comes out of the teacher's own last stage, in its raw feature space) is standardised alike. A teacher
whose features are another's up to a per-channel scale and offset then gives the same terms.
The statistics are estimated from the first ``batches`` training batches, then frozen; they are
buffers, so they are saved with the task state (checkpoints) and restored on resume. Under DDP, which
broadcasts the trainable module's buffers from rank 0 at every forward, they are rank 0's batches'.
"""
from typing import Tuple

import torch
import torch.nn as nn

__all__ = ['TEACHER_NORMS', 'FeatureStandardizer']

TEACHER_NORMS = ('none', 'standardize')


class FeatureStandardizer(nn.Module):
    """Per-channel statistics of one (N, C, H, W) target, observed (:meth:`observe`) over the first
    ``batches`` training batches and then frozen, and the standardisation they give (``forward``).

    Args:
        channels: C of the target.
        batches: training batches the statistics are estimated from.
        eps: the smallest standard deviation used (a constant channel is not divided by zero).
    """

    def __init__(self, channels: int, batches: int = 20, eps: float = 1e-6):
        super().__init__()
        self.batches = batches
        self.eps = eps
        self.register_buffer('seen', torch.zeros((), dtype=torch.long))  # batches observed so far
        self.register_buffer('count', torch.zeros((), dtype=torch.float64))  # values per channel observed
        self.register_buffer('total', torch.zeros(channels, dtype=torch.float64))
        self.register_buffer('total_sq', torch.zeros(channels, dtype=torch.float64))

    @property
    def frozen(self) -> bool:
        """Whether the statistics are final (``batches`` batches observed)."""
        return int(self.seen) >= self.batches

    @torch.no_grad()
    def observe(self, target: torch.Tensor) -> None:
        """Add ``target``'s values to the statistics, unless they are frozen."""
        if self.frozen:
            return
        if target.shape[1] != self.total.shape[0]:
            raise ValueError(f'the standardizer has {self.total.shape[0]} channels, the target {tuple(target.shape)}')
        values = target.detach().to(torch.float64).transpose(0, 1).flatten(1)  # (C, N*H*W)
        self.total += values.sum(1)
        self.total_sq += values.pow(2).sum(1)
        self.count += values.shape[1]
        self.seen += 1

    def stats(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) per channel, shaped (1, C, 1, 1); (0, 1) before anything was observed."""
        if int(self.seen) == 0:
            return self.total.new_zeros(1, self.total.shape[0], 1, 1), self.total.new_ones(1, self.total.shape[0], 1, 1)
        mean = self.total / self.count
        var = (self.total_sq / self.count - mean.pow(2)).clamp_min(0)
        return mean.view(1, -1, 1, 1), var.sqrt().clamp_min(self.eps).view(1, -1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (a target or a projection compared with it) standardised with the target's statistics."""
        mean, std = self.stats()
        dtype = torch.promote_types(x.dtype, torch.float32)
        return (x.to(dtype) - mean.to(dtype)) / std.to(dtype)
