"""The frequency spectrum of feature maps (the paper's Fig. 2 and Fig. 5), with the package's DCT.

Each channel of each map goes through the orthonormal 2-D DCT; the absolute responses are averaged
over samples and channels into an H x W map whose [0, 0] entry is the direct (DC) component.
"""
from pathlib import Path
from typing import Any, Dict, Union

import torch

from ...method.dct import Dct2d
from ..plots import pyplot, save_figure

__all__ = ['feature_spectrum', 'plot_spectrum']


def feature_spectrum(maps: torch.Tensor) -> Dict[str, Any]:
    """Spectrum of (N, C, H, W) maps: mean |DCT| per frequency, the DC share of the total response,
    and the response summed over each diagonal band u + v (0 = DC)."""
    if maps.ndim != 4:
        raise ValueError(f'feature maps must be (N, C, H, W), got shape {tuple(maps.shape)}')
    h, w = maps.shape[-2:]
    response = Dct2d(h, w, dtype=torch.float64)(maps.double()).abs().mean(dim=(0, 1))
    total = response.sum().item()
    bands = torch.zeros(h + w - 1, dtype=torch.float64)
    u, v = torch.meshgrid(torch.arange(h), torch.arange(w), indexing='ij')
    bands.index_add_(0, (u + v).flatten(), response.flatten())
    return dict(shape=[int(s) for s in maps.shape], response=response.tolist(),
                dc_share=response[0, 0].item() / total if total > 0 else 0.0,
                bands=(bands / total if total > 0 else bands).tolist())


def plot_spectrum(spectrum: Dict[str, Any], path: Union[str, Path], title: str = '') -> Path:
    """Heat map of the mean |DCT| response (DC marked) beside its share per frequency band."""
    plt = pyplot()
    response = torch.tensor(spectrum['response'])
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8))
    image = left.imshow(response.log10().clamp(min=-6).numpy(), cmap='viridis')
    left.scatter([0], [0], marker='s', s=80, facecolors='none', edgecolors='r', label=f"DC {spectrum['dc_share']:.1%}")
    left.set_xlabel('horizontal frequency v')
    left.set_ylabel('vertical frequency u')
    left.legend(loc='upper right', fontsize=8)
    fig.colorbar(image, ax=left, label='log10 mean |DCT|')
    bands = spectrum['bands']
    right.bar(range(len(bands)), [100 * b for b in bands], color=['r'] + ['C0'] * (len(bands) - 1))
    right.set_xlabel('frequency band u + v (0 = DC)')
    right.set_ylabel('share of the total response (%)')
    fig.suptitle(title or f"feature spectrum, {spectrum['shape'][0]} maps of {spectrum['shape'][1]} channels")
    return save_figure(fig, path)
