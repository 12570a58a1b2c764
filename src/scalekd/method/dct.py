"""Orthonormal 2-D DCT-II and the DC-removal operator phi of dual-view feature mimicking.

``phi`` (the paper's Eq. 2) zeroes the direct (zero-frequency) DCT coefficient of every
channel. Because the orthonormal DCT is an exact change of basis whose [0, 0] basis
vector is constant, ``phi(x)`` equals ``x`` minus its per-sample, per-channel spatial mean;
:func:`remove_dc` computes that cheap, exact form and :class:`Dct2d` the real transform
(used by the spectrum analysis and by the tests that show the two agree).
"""
import math

import torch
import torch.nn as nn

__all__ = ['dct_matrix', 'Dct2d', 'remove_dc', 'keep_dc', 'remove_dc_by_dct']


def dct_matrix(n: int, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """Orthonormal DCT-II matrix ``M`` of size (n, n): ``M @ x`` transforms a length-n signal."""
    if n < 1:
        raise ValueError(f'DCT size must be >= 1, got {n}')
    k = torch.arange(n, dtype=torch.float64, device=device).unsqueeze(1)
    i = torch.arange(n, dtype=torch.float64, device=device).unsqueeze(0)
    m = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m.to(dtype)


class Dct2d(nn.Module):
    """Orthonormal 2-D DCT-II over the last two dims of an (..., H, W) tensor.

    The basis matrices are built once, for one grid, and kept as non-persistent buffers.
    """

    def __init__(self, height: int, width: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.grid = (height, width)
        self.register_buffer('mat_h', dct_matrix(height, dtype), persistent=False)
        self.register_buffer('mat_w', dct_matrix(width, dtype), persistent=False)

    def _check(self, x: torch.Tensor) -> None:
        if tuple(x.shape[-2:]) != self.grid:
            raise ValueError(f'Dct2d was built for a {self.grid} grid, got input of shape {tuple(x.shape)}')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Spatial map -> DCT coefficients (same shape)."""
        self._check(x)
        return self.mat_h.to(x.dtype) @ x @ self.mat_w.to(x.dtype).T

    def inverse(self, coeffs: torch.Tensor) -> torch.Tensor:
        """DCT coefficients -> spatial map (exact inverse of :meth:`forward`)."""
        self._check(coeffs)
        return self.mat_h.to(coeffs.dtype).T @ coeffs @ self.mat_w.to(coeffs.dtype)


def remove_dc(x: torch.Tensor) -> torch.Tensor:
    """phi: remove the direct component of an (N, C, H, W) map, i.e. subtract each channel's spatial mean."""
    return x - x.mean(dim=(-2, -1), keepdim=True)


def keep_dc(x: torch.Tensor) -> torch.Tensor:
    """The complement of phi: keep only the direct component (each channel's spatial mean, broadcast)."""
    return x.mean(dim=(-2, -1), keepdim=True).expand_as(x)


def remove_dc_by_dct(x: torch.Tensor, dct: Dct2d) -> torch.Tensor:
    """phi in the paper's form: DCT, zero coefficient [0, 0], inverse DCT."""
    coeffs = dct(x).clone()
    coeffs[..., 0, 0] = 0
    return dct.inverse(coeffs)
