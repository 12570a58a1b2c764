"""Helpers shared by the student and teacher adapters."""
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..method.errors import UserError

Shape = Tuple[int, int, int]  # (C, H, W) of one sample

_PACKAGE_DIR = Path(__file__).resolve().parents[1]


class UnsupportedModelError(UserError):
    """A model whose family the adapters do not know, or that lacks an API they need."""


def model_label(model: nn.Module) -> str:
    """``name (Class)`` for error messages; the timm architecture name when known."""
    name = getattr(model, 'pretrained_cfg', {}).get('architecture') if hasattr(model, 'pretrained_cfg') else None
    cls = type(model).__name__
    return f'{name} ({cls})' if name else cls


def tokens_to_map(tokens: torch.Tensor, grid: Tuple[int, int], num_prefix: int = 0) -> torch.Tensor:
    """(N, P + H*W, C) tokens in raster order -> (N, C, H, W) map, dropping P prefix tokens."""
    tokens = tokens[:, num_prefix:]
    n, length, c = tokens.shape
    if length != grid[0] * grid[1]:
        raise ValueError(f'{length} patch tokens do not fill a {grid[0]}x{grid[1]} grid')
    return tokens.transpose(1, 2).reshape(n, c, *grid)


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) map -> (N, H*W, C) tokens in raster order."""
    return x.flatten(2).transpose(1, 2)


def attach_prefix(tokens: torch.Tensor, prefix: Optional[torch.Tensor], num_prefix: int, label: str) -> torch.Tensor:
    """``tokens`` with the images' ``num_prefix`` prefix tokens in front; ``prefix`` is repeated for a batch
    that stacks several projections of the same images."""
    if not num_prefix:
        return tokens
    if prefix is None:
        raise ValueError(f'{label} last stage needs the prefix tokens of the images')
    prefix = prefix.repeat(tokens.shape[0] // prefix.shape[0], 1, 1).to(tokens.dtype)
    return torch.cat([prefix, tokens], dim=1)


def map_layout(t: Any, grid: Tuple[int, int]) -> Optional[str]:
    """``'NCHW'`` or ``'NHWC'``: where the (H, W) ``grid`` sits in ``t``; ``None`` when ``t`` is not a 4-d
    tensor at that resolution (tokens, a list of features)."""
    if not isinstance(t, torch.Tensor) or t.ndim != 4:
        return None
    if tuple(t.shape[-2:]) == grid:
        return 'NCHW'
    return 'NHWC' if tuple(t.shape[1:3]) == grid else None


def to_nchw(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A map in ``layout`` (``'NCHW'`` or ``'NHWC'``) as (N, C, H, W)."""
    return t.permute(0, 3, 1, 2) if layout == 'NHWC' else t


def shape_of(x: torch.Tensor) -> Shape:
    return tuple(int(s) for s in x.shape[1:])


def _raised_in_scalekd(error: BaseException) -> bool:
    """Whether the innermost frame of ``error``'s traceback is scalekd's own code."""
    tb = error.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE_DIR)


@contextmanager
def probing(model: nn.Module, what: str) -> Iterator[None]:
    """Run a dummy forward in eval mode without autograd, restoring the training mode after.

    A failure in the model's own code (wrong input size for a fixed-size model, a window that does
    not fit, ...) becomes an :class:`UnsupportedModelError` that starts with ``what``; an error raised
    in scalekd's code (a deliberate message, or a bug) propagates unchanged.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    except (RuntimeError, AssertionError, ValueError, TypeError, IndexError) as e:
        if _raised_in_scalekd(e):
            raise
        raise UnsupportedModelError(f'{what}: {str(e).splitlines()[0] if str(e) else type(e).__name__}') from None
    finally:
        model.train(was_training)


def dummy_input(model: nn.Module, img_size: Tuple[int, int], in_chans: int, batch: int = 2) -> torch.Tensor:
    """A zero batch on the model's device and dtype at the configured resolution."""
    p = next(model.parameters())
    return torch.zeros(batch, in_chans, *img_size, device=p.device, dtype=p.dtype)


def normalization_from_pretrained_cfg(pretrained_cfg: Optional[Mapping[str, Any]], in_chans: int,
                                       mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None
                        ) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """The per-channel mean / std images are normalised with: ``mean`` / ``std`` when both are given,
    else the model's pretrained cfg's, else ImageNet's; one value per input channel (RGB statistics
    averaged for a 1-channel model)."""
    if mean is None or std is None:
        cfg = pretrained_cfg or {}
        mean, std = cfg.get('mean') or IMAGENET_DEFAULT_MEAN, cfg.get('std') or IMAGENET_DEFAULT_STD
    return channel_stats(mean, in_chans), channel_stats(std, in_chans)


def channel_stats(values: Sequence[float], in_chans: int) -> Tuple[float, ...]:
    """A pretrained cfg's per-channel mean / std for ``in_chans`` inputs: their average on each channel
    when the counts differ (a grayscale model built from an RGB architecture)."""
    values = tuple(float(v) for v in values)
    return values if len(values) == in_chans else (sum(values) / len(values),) * in_chans
