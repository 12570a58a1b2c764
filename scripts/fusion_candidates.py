#!/usr/bin/env python
"""What fusing the two views' CAP convolutions by hand would save, before it is written.

    .venv/bin/python scripts/fusion_candidates.py                    # fp32, batch 8, ResNet-50's s3 / s4 CAPs
    .venv/bin/python scripts/fusion_candidates.py --precision bf16   # on a CPU with AVX512-BF16 / AMX, or a GPU

DFM gives each view its own CAP, and both CAPs of a tap start with a C_s x C_s 3x3 convolution of the
same student map, the largest cost of the projectors. Neither the eager step nor ``torch.compile``
(each view's CAP is a piece of its own) shares anything between them. Two hand fusions could:

- ``shared unfold``: one im2col of the student map for both views (one unfold forward, one fold in
  backward, one copy kept for the backward), then each view's matrix product;
- ``one GEMM``: both views' kernels concatenated (2 C_s x 9 C_s) and applied in one product; the
  concatenation copies both kernels every step.

Each line times, forward and backward, in the same rounds: the two CAPs of the tap as the step runs
them, their two convolutions alone, and the two fusions (equal to the convolutions up to rounding).
"""
import argparse
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from scalekd.engine.runtime.precision import autocast, resolve_precision
from scalekd.method.projectors import CrossAttentionProjector
from scalekd.task.kernels import use_cpu_kernels
from scalekd.tools.bench import cpu_name, time_interleaved

# (tap, student channels, student grid, teacher channels, teacher grid): Swin-S -> ResNet-50 at 224
TAPS = (('s3 (proxy path)', 1024, 14, 768, 7), ('s4', 2048, 7, 768, 7))


def _unfolded(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (C * 9, N * H * W): the 3x3 patches of the batch, one column per position."""
    cols = F.unfold(x, 3, padding=1)
    return cols.transpose(0, 1).reshape(cols.shape[1], -1)


def _as_map(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    n, _, h, w = x.shape
    return out.view(out.shape[0], n, h, w).transpose(0, 1)


def forwards(caps: List[CrossAttentionProjector], x: torch.Tensor) -> Dict[str, Callable[[], List[torch.Tensor]]]:
    """The forward of each variant on the student map ``x`` (the fusions compute under autocast as
    :class:`~scalekd.task.kernels.UnfoldConv2d` does)."""
    convs = [cap.student_conv for cap in caps]

    def shared_unfold() -> List[torch.Tensor]:
        cols = _unfolded(x)
        return [_as_map(torch.addmm(c.bias[:, None], c.weight.flatten(1), cols), x) for c in convs]

    def one_gemm() -> List[torch.Tensor]:
        weight = torch.cat([c.weight.flatten(1) for c in convs])
        bias = torch.cat([c.bias for c in convs])
        return list(_as_map(torch.addmm(bias[:, None], weight, _unfolded(x)), x).split(convs[0].out_channels, 1))

    return {'both CAPs': lambda: [cap(x) for cap in caps], 'their convolutions': lambda: [c(x) for c in convs],
            'shared unfold': shared_unfold, 'one GEMM': one_gemm}


def forward_backward(forward: Callable[[], List[torch.Tensor]], caps: List[CrossAttentionProjector],
                     x: torch.Tensor, precision: str) -> Callable[[], None]:
    """``forward`` under the run's autocast, then backward to the gradients of ``x`` and the weights."""
    def run() -> None:
        x.grad = None
        for cap in caps:
            cap.zero_grad(set_to_none=True)
        with autocast(precision, x.device):
            outs = forward()
        sum(out.float().square().mean() for out in outs).backward()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--precision', default='fp32', choices=('fp32', 'bf16'))
    parser.add_argument('--device', default='cpu')
    args = parser.parse_args()
    device = torch.device(args.device)
    precision = resolve_precision(args.precision, device, '--precision')
    torch.manual_seed(0)
    print(f'{cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device)}; {precision}, batch '
          f'{args.batch}; median seconds of {args.rounds} rounds, forward + backward')
    print('| tap | both CAPs | their convolutions | shared unfold | one GEMM | shared / convs | one GEMM / convs |')
    print('|---|---|---|---|---|---|---|')
    for tap, chs, grid, out_chs, out_grid in TAPS:
        caps = [CrossAttentionProjector(chs, out_chs, (grid, grid), (out_grid, out_grid)).to(device) for _ in range(2)]
        if device.type == 'cpu':
            for cap in caps:
                use_cpu_kernels(cap)
        x = torch.randn(args.batch, chs, grid, grid, device=device, requires_grad=True)
        variants = forwards(caps, x)
        with torch.no_grad():  # the fusions compute the convolutions
            reference = torch.cat(variants['their convolutions'](), 1)
            for name in ('shared unfold', 'one GEMM'):
                torch.testing.assert_close(torch.cat(variants[name](), 1), reference, rtol=1e-4, atol=1e-4)
        t = time_interleaved({name: forward_backward(f, caps, x, precision) for name, f in variants.items()},
                         args.rounds, device)
        convs = t['their convolutions']
        print(f'| {tap} | {t["both CAPs"]:.3f} | {convs:.3f} | {t["shared unfold"]:.3f} | {t["one GEMM"]:.3f} | '
              f'{t["shared unfold"] / convs:.2f} | {t["one GEMM"] / convs:.2f} |')


if __name__ == '__main__':
    main()
