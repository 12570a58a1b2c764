"""Device-specific kernels, chosen once the run's device is known: the CAP's 3x3 convolution on CPU.

The projectors are built with plain ``nn.Conv2d``; :func:`use_cpu_kernels` swaps the CAPs' full 3x3
student convolutions for :class:`UnfoldConv2d` (same parameters and state-dict keys, so checkpoints
do not change). Measured speed-ups: docs/cost.md.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..method.projectors import CrossAttentionProjector

__all__ = ['UnfoldConv2d', 'use_cpu_kernels']


class UnfoldConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same weights and math) that runs on CPU as unfold + one matrix product, which beats
    oneDNN's direct convolution on a CAP's small, wide maps; equal up to float rounding. Other devices,
    grouped convs and non-zero padding modes take the usual kernel, and so does an input whose unfolded
    copy (C_in x k x k x N x H_out x W_out values, kept for the backward) would exceed
    :attr:`max_unfold_bytes`: chunking the batch would not bound it, as autograd keeps every chunk's copy."""

    max_unfold_bytes: int = 256 * 2 ** 20  # the s3 CAP of Swin -> ResNet-50 at 224 (7.2 MB an image): batch <= 35

    def _unfold_bytes(self, x: torch.Tensor) -> int:
        n, c, h, w = x.shape
        out = [(d + 2 * p - dl * (k - 1) - 1) // s + 1
               for d, p, dl, k, s in zip((h, w), self.padding, self.dilation, self.kernel_size, self.stride)]
        return c * self.kernel_size[0] * self.kernel_size[1] * n * out[0] * out[1] * x.element_size()

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if (x.device.type != 'cpu' or self.groups != 1 or self.padding_mode != 'zeros' or isinstance(self.padding, str)
                or self._unfold_bytes(x) > self.max_unfold_bytes):
            return super()._conv_forward(x, weight, bias)
        n, _, h, w = x.shape
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # (N, C_in*k*k, L)
        length = cols.shape[-1]
        cols = cols.transpose(0, 1).reshape(cols.shape[1], n * length)  # one GEMM for the batch, both ways
        out = weight.flatten(1) @ cols if bias is None else torch.addmm(bias[:, None], weight.flatten(1), cols)
        size = [(d + 2 * p - dl * (k - 1) - 1) // s + 1
                for d, p, dl, k, s in zip((h, w), self.padding, self.dilation, self.kernel_size, self.stride)]
        return out.view(out.shape[0], n, *size).transpose(0, 1)


def _unfold_twin(conv: nn.Conv2d) -> UnfoldConv2d:
    """An :class:`UnfoldConv2d` holding ``conv``'s own parameters (built on the meta device: no
    initialisation, no random numbers drawn)."""
    twin = UnfoldConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                        conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, device='meta')
    twin.weight, twin.bias = conv.weight, conv.bias
    return twin.train(conv.training)


def use_cpu_kernels(module: nn.Module) -> int:
    """Swap every CAP's full 3x3 student convolution in ``module`` for :class:`UnfoldConv2d`; the number
    swapped. The ``separable`` CAP branch (``cap_conv``) keeps its convolutions."""
    caps = [m for m in module.modules() if isinstance(m, CrossAttentionProjector) and type(m.student_conv) is nn.Conv2d]
    for cap in caps:
        cap.student_conv = _unfold_twin(cap.student_conv)
    return len(caps)
