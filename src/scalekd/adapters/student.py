"""Student adapter: the s3 / s4 taps and the logits of a timm student, from one forward.

Any timm model with ``forward_intermediates`` is a student. The taps are found from the model's own
intermediates (one probe at build time), not from a family table:

- s4 is the student's final feature map: the output of ``forward_features`` read as a map (NCHW or
  NHWC), or the last intermediate where the final feature is not a map (tokens).
- s3 is the previous stage's output: the last intermediate whose shape differs from the last one's
  (hierarchical students). A plain student (ViT, Mixer: a long run of same-shaped blocks at the end)
  taps the block three quarters deep instead (configurable, ``student_s3_block``).

Small overrides of the general rule: ConvNeXt keeps its final norm in the head (applied to s4), and
the plain token families (ViT, DeiT, BEiT, EVA, Mixer) read s4 from their normed final tokens.
"""
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from ..method.errors import OptionError
from .common import (Shape, UnsupportedModelError, dummy_input, map_layout, model_label, probing, shape_of, to_nchw,
                     tokens_to_map)
from .families import family_of

__all__ = ['StudentAdapter', 'LogitsOnly', 'StudentTaps']

_MIN_PLAIN_RUN = 4  # trailing same-shaped intermediates that make a student plain (blocks, not stages)


@dataclass(frozen=True)
class StudentTaps:
    """Per-sample shapes (C, H, W) of the two taps."""
    s3: Shape
    s4: Shape


def _trailing_run(shapes: List[Shape]) -> int:
    """How many intermediates at the end share the last one's shape."""
    run = 1
    while run < len(shapes) and shapes[-run - 1] == shapes[-1]:
        run += 1
    return run


class StudentAdapter:
    """Reads (logits, s3, s4) from a timm student; holds no reference to the model.

    Args:
        model: the timm student.
        img_size: (H, W) the pair trains at.
        in_chans: input channels.
        s3_block: 1-based block whose output is s3, plain students only
            (default: three quarters deep, e.g. block 9 of 12).
    """

    def __init__(self, model: nn.Module, img_size: Tuple[int, int], in_chans: int = 3, s3_block: Optional[int] = None):
        self.label = model_label(model)
        if not hasattr(model, 'forward_intermediates'):
            raise UnsupportedModelError(
                f'{self.label} is not a supported ScaleKD student: it has no forward_intermediates(), which the '
                f'feature taps read (timm models have it from timm 1.0.23; method none or kd need no taps)')
        family = family_of(model)
        self.family = family.name if family else type(model).__name__
        self.token_family = bool(family and family.plain)
        x = dummy_input(model, img_size, in_chans)
        with probing(model, f'student {self.label} cannot run at {img_size[0]}x{img_size[1]}'):
            final, inters = model.forward_intermediates(x, indices=None, norm=False, output_fmt='NCHW')
        shapes = [shape_of(t) for t in inters]
        if len(shapes) < 2 or any(len(s) != 3 for s in shapes):
            raise UnsupportedModelError(
                f'{self.label} is not a supported ScaleKD student: its intermediates are not at least two '
                f'(C, H, W) maps (got {shapes})')
        self.s3_index, self.plain = self._s3_index(shapes, s3_block)
        self.s4_index = len(shapes) - 1
        self.num_prefix_tokens = getattr(model, 'num_prefix_tokens', 0)
        # avg-pool ViTs (EVA, BEiT) keep their final norm in the head as fc_norm
        self.uses_fc_norm = isinstance(getattr(model, 'norm', None), nn.Identity) and \
            not isinstance(getattr(model, 'fc_norm', nn.Identity()), nn.Identity)
        self.head_norm = self.family == 'convnext'
        self.projector_norm = 'ln' if self.family == 'convnext' else 'bn'
        self.s4_layout = 'tokens' if self.token_family else \
            map_layout(final, tuple(inters[-1].shape[-2:])) or 'last'
        with probing(model, f'student {self.label} cannot run at {img_size[0]}x{img_size[1]}'):
            _, s3, s4 = self(model, x)
        self.taps = StudentTaps(shape_of(s3), shape_of(s4))

    def _s3_index(self, shapes: List[Shape], s3_block: Optional[int]) -> Tuple[int, bool]:
        """(index of the s3 intermediate, whether the student is plain)."""
        run = _trailing_run(shapes)
        if run >= min(_MIN_PLAIN_RUN, len(shapes)) and run * 2 > len(shapes):
            depth, first = run, len(shapes) - run
            s3_block = s3_block if s3_block is not None else max(1, min(round(depth * 3 / 4), depth - 1))
            if not 1 <= s3_block < depth:
                raise OptionError(f'student_s3_block must be in [1, {depth - 1}] for {self.label}, got {s3_block}')
            return first + s3_block - 1, True
        if s3_block is not None:
            raise OptionError(f'student_s3_block applies to plain students (ViT, Mixer: blocks of one shape) only; '
                              f'{self.label} is hierarchical and uses its previous stage')
        return len(shapes) - run - 1, False

    def final_map(self, model: nn.Module, final: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """``forward_features`` output and the last intermediate -> the s4 map (N, C, H, W)."""
        if self.s4_layout == 'tokens':
            tokens = model.fc_norm(final[:, self.num_prefix_tokens:]) if self.uses_fc_norm else final
            return tokens_to_map(tokens, tuple(last.shape[-2:]), 0 if self.uses_fc_norm else self.num_prefix_tokens)
        if self.s4_layout == 'last':
            return last
        s4 = to_nchw(final, self.s4_layout)
        return model.head.norm(s4) if self.head_norm else s4

    def __call__(self, model: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One student forward: (logits, s3 map, s4 map)."""
        final, (s3, last) = model.forward_intermediates(
            x, indices=[self.s3_index, self.s4_index], norm=False, output_fmt='NCHW', intermediates_only=False)
        return model.forward_head(final), s3, self.final_map(model, final, last)


class LogitsOnly:
    """The student's logits alone, for methods without feature taps (``none``, ``kd``): any timm
    classifier, whatever its family. Its one dummy forward checks the model runs at ``img_size``."""

    def __init__(self, model: nn.Module, img_size: Tuple[int, int], in_chans: int = 3):
        self.label = model_label(model)
        with probing(model, f'student {self.label} cannot run at {img_size[0]}x{img_size[1]}'):
            model(dummy_input(model, img_size, in_chans))

    def __call__(self, model: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, None, None]:
        """One student forward: (logits, None, None)."""
        return model(x), None, None
