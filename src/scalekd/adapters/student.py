"""Student adapter: the s3 / s4 taps and the logits of a timm student, from one forward.

s3 is the second-to-last stage output (hierarchical students, from ``feature_info``) or the
block output three quarters deep (plain ViT / Mixer students, configurable). s4 is the
student's final feature map: the output of ``forward_features`` read as a map, with the final
norm that timm keeps in the head (ConvNeXt) applied.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn

from .common import Shape, dummy_input, model_label, probing, shape_of, tokens_to_map
from .families import find_family

__all__ = ['StudentAdapter', 'LogitsOnly']


@dataclass(frozen=True)
class StudentTaps:
    """Per-sample shapes (C, H, W) of the two taps."""
    s3: Shape
    s4: Shape


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
        family = find_family(model, 'student')
        self.family, self.plain = family.name, family.plain
        self.label = model_label(model)
        if self.plain:
            depth = len(model.blocks)
            s3_block = s3_block if s3_block is not None else max(1, min(round(depth * 3 / 4), depth - 1))
            if not 1 <= s3_block < depth:
                raise ValueError(f'student_s3_block must be in [1, {depth - 1}] for {self.label}, got {s3_block}')
            self.s3_index = s3_block - 1
        else:
            if s3_block is not None:
                raise ValueError(
                    f'student_s3_block applies to plain ViT / Mixer students only; {self.label} '
                    f'is hierarchical and uses its second-to-last stage')
            self.s3_index = len(model.feature_info) - 2
        self.num_prefix_tokens = getattr(model, 'num_prefix_tokens', 0)
        # avg-pool ViTs (EVA, BEiT) keep their final norm in the head as fc_norm
        self.uses_fc_norm = isinstance(getattr(model, 'norm', None), nn.Identity) and \
            not isinstance(getattr(model, 'fc_norm', nn.Identity()), nn.Identity)
        self.projector_norm = 'ln' if self.family == 'convnext' else 'bn'
        with probing(model, f'student {self.label} cannot run at {img_size[0]}x{img_size[1]}'):
            _, s3, s4 = self(model, dummy_input(model, img_size, in_chans))
        self.taps = StudentTaps(shape_of(s3), shape_of(s4))

    def final_map(self, model: nn.Module, final: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """``forward_features`` output -> the s4 map (N, C, H, W)."""
        if self.plain:
            tokens = model.fc_norm(final[:, self.num_prefix_tokens:]) if self.uses_fc_norm else final
            return tokens_to_map(tokens, grid, 0 if self.uses_fc_norm else self.num_prefix_tokens)
        if self.family == 'swin':
            return final.permute(0, 3, 1, 2)
        if self.family == 'convnext':
            return model.head.norm(final)
        return final

    def __call__(self, model: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One student forward: (logits, s3 map, s4 map)."""
        final, (s3,) = model.forward_intermediates(
            x, indices=[self.s3_index], norm=False, output_fmt='NCHW', intermediates_only=False)
        s4 = self.final_map(model, final, tuple(s3.shape[-2:]))
        return model.forward_head(final), s3, s4


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
