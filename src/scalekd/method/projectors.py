"""Feature projectors: the cross attention projector (CAP) and the ablation's linear / conv projectors.

Every projector maps a student map (N, C_s, H_s, W_s) to a teacher-shaped map
(N, C_t, H_t, W_t). Only CAP can take input-dependent queries (teacher parameter perception).
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d, Mlp, trunc_normal_

from .errors import OptionError

__all__ = ['CrossAttentionProjector', 'LinearProjector', 'ConvProjector', 'build_projector', 'PROJECTORS',
           'fitting_heads']

Grid = Tuple[int, int]


def _check_map(x: torch.Tensor, chs: int, grid: Grid, what: str) -> None:
    if x.ndim != 4 or x.shape[1] != chs or tuple(x.shape[-2:]) != tuple(grid):
        raise ValueError(
            f'{what} expects (N, {chs}, {grid[0]}, {grid[1]}) maps, got {tuple(x.shape)}')


def _resize(x: torch.Tensor, grid: Grid) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(grid):
        return x
    return F.interpolate(x, size=grid, mode='bilinear', align_corners=False)


def fitting_heads(width: int, heads: int) -> int:
    """The most CAP heads, at most ``heads``, that divide the teacher ``width`` (heads split its channels)."""
    return max(h for h in range(1, heads + 1) if width % h == 0)


class CrossAttentionProjector(nn.Module):
    """CAP: a transformer decoder block whose queries live on the teacher's grid.

    Student branch: Conv3x3 -> BatchNorm (LayerNorm2d for ConvNeXt-style students) -> ReLU,
    plus a learned positional embedding; queries (learned, or given as a teacher-shaped map)
    go through Conv1x1 -> ReLU. Multi-head cross attention (logits scaled by
    ``softmax_scale / sqrt(head_dim)``, no residual), then ``y = LayerNorm(attn)`` and
    ``out = y + FFN(y)``. Output tokens are read back as the teacher map in raster order.

    Args:
        in_chs, in_grid: student channels and grid (H_s, W_s).
        out_chs, out_grid: teacher channels and grid (H_q, W_q).
        num_heads: attention heads, must divide ``out_chs``.
        softmax_scale: extra temperature on the attention logits (5 in the release).
        query_chs: width of queries given at call time; ``None`` learns a query table instead.
        student_norm: ``'bn'`` or ``'ln'`` for the student branch.
        mlp_ratio: FFN hidden width as a multiple of ``out_chs`` (4 in the release; smaller: a lighter CAP).
        student_conv: ``'full'`` (the paper's C_s x C_s 3x3 convolution) or ``'separable'`` (a
            depthwise 3x3 then a 1x1: about 9x fewer weights and FLOPs in the branch that dominates
            CAP's cost; an efficiency option beyond the paper, off by default).
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            in_grid: Grid,
            out_grid: Grid,
            num_heads: int = 8,
            softmax_scale: float = 5.0,
            query_chs: Optional[int] = None,
            student_norm: str = 'bn',
            mlp_ratio: float = 4.0,
            student_conv: str = 'full',
    ):
        super().__init__()
        if out_chs % num_heads:
            raise OptionError(f'CAP: num_heads={num_heads} does not divide the teacher width {out_chs}')
        if student_norm not in ('bn', 'ln'):
            raise OptionError(f"CAP: student_norm must be 'bn' or 'ln', got {student_norm!r}")
        self.in_chs, self.out_chs = in_chs, out_chs
        self.in_grid, self.out_grid = tuple(in_grid), tuple(out_grid)
        self.num_heads = num_heads
        self.head_dim = out_chs // num_heads
        self.scale = softmax_scale * self.head_dim ** -0.5

        if student_conv == 'full':
            self.student_conv = nn.Conv2d(in_chs, in_chs, 3, padding=1)
        elif student_conv == 'separable':
            self.student_conv = nn.Sequential(nn.Conv2d(in_chs, in_chs, 3, padding=1, groups=in_chs, bias=False),
                                              nn.Conv2d(in_chs, in_chs, 1))
        else:
            raise OptionError(f"CAP: student_conv must be 'full' or 'separable', got {student_conv!r}")
        self.student_norm = nn.BatchNorm2d(in_chs) if student_norm == 'bn' else LayerNorm2d(in_chs)
        self.pos_embed = nn.Parameter(torch.zeros(1, in_chs, *self.in_grid))
        trunc_normal_(self.pos_embed, std=0.02)

        self.learned_queries = query_chs is None
        self.query_chs = out_chs if query_chs is None else query_chs
        if self.learned_queries:
            self.query_embed = nn.Parameter(torch.randn(self.out_grid[0] * self.out_grid[1], out_chs))
        self.query_conv = nn.Conv2d(self.query_chs, self.query_chs, 1)

        self.q = nn.Linear(self.query_chs, out_chs)
        self.kv = nn.Linear(in_chs, 2 * out_chs)
        self.proj = nn.Linear(out_chs, out_chs)
        self.norm = nn.LayerNorm(out_chs)
        self.mlp = Mlp(out_chs, max(1, int(out_chs * mlp_ratio)), act_layer=nn.ReLU)

    def student_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Student map -> (N, H_s*W_s, C_s) tokens with positional embedding."""
        _check_map(x, self.in_chs, self.in_grid, 'CAP student input')
        x = F.relu(self.student_norm(self.student_conv(x))) + self.pos_embed
        return x.flatten(2).transpose(1, 2)

    def query_tokens(self, queries: Optional[torch.Tensor]) -> torch.Tensor:
        """Learned table or given query map -> (N or 1, H_q*W_q, C_q) tokens after Conv1x1 -> ReLU."""
        if self.learned_queries:
            if queries is not None:
                raise ValueError('this CAP learns its queries; build it with query_chs to pass queries in')
            queries = self.query_embed.T.reshape(1, self.query_chs, *self.out_grid)
        elif queries is None:
            raise ValueError(f'this CAP takes input-dependent queries of width {self.query_chs}; none were given')
        else:
            _check_map(queries, self.query_chs, self.out_grid, 'CAP queries')
        return F.relu(self.query_conv(queries)).flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor, queries: Optional[torch.Tensor] = None) -> torch.Tensor:
        n = x.shape[0]
        kv = self.kv(self.student_tokens(x))
        q = self.q(self.query_tokens(queries)).expand(n, -1, -1)
        h, d = self.num_heads, self.head_dim
        q = q.reshape(n, -1, h, d).transpose(1, 2)
        k, v = kv.reshape(n, -1, 2, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        attn = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        y = self.norm(self.proj(attn.transpose(1, 2).reshape(n, -1, self.out_chs)))
        y = y + self.mlp(y)
        return y.transpose(1, 2).reshape(n, self.out_chs, *self.out_grid)


class LinearProjector(nn.Module):
    """One linear map C_s -> C_t at every location (a 1x1 conv), resized to the teacher grid."""

    def __init__(self, in_chs: int, out_chs: int, in_grid: Grid, out_grid: Grid):
        super().__init__()
        self.in_chs, self.in_grid, self.out_grid = in_chs, tuple(in_grid), tuple(out_grid)
        self.proj = nn.Conv2d(in_chs, out_chs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_map(x, self.in_chs, self.in_grid, 'linear projector input')
        return _resize(self.proj(x), self.out_grid)


class ConvProjector(nn.Module):
    """Two 3x3 convolutions (C_s -> C_t -> C_t, ReLU between), resized to the teacher grid."""

    def __init__(self, in_chs: int, out_chs: int, in_grid: Grid, out_grid: Grid):
        super().__init__()
        self.in_chs, self.in_grid, self.out_grid = in_chs, tuple(in_grid), tuple(out_grid)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, padding=1)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_map(x, self.in_chs, self.in_grid, 'conv projector input')
        return _resize(self.conv2(F.relu(self.conv1(x))), self.out_grid)


PROJECTORS = ('cap', 'linear', 'conv')


def build_projector(
        kind: str,
        in_chs: int,
        out_chs: int,
        in_grid: Grid,
        out_grid: Grid,
        **cap_kwargs,
) -> nn.Module:
    """Build a projector by name (``cap``, ``linear`` or ``conv``); ``cap_kwargs`` go to CAP only."""
    if kind == 'cap':
        return CrossAttentionProjector(in_chs, out_chs, in_grid, out_grid, **cap_kwargs)
    if kind == 'linear':
        return LinearProjector(in_chs, out_chs, in_grid, out_grid)
    if kind == 'conv':
        return ConvProjector(in_chs, out_chs, in_grid, out_grid)
    raise OptionError(f'unknown projector {kind!r}; choose one of {", ".join(PROJECTORS)}')
