"""Teacher adapter: a frozen timm ViT teacher's final feature, logits and last stage.

Built on timm's :class:`~timm.task.DistillationTeacher` (eval mode, normalisation buffers).
Swin teachers: the last stage is ``layers[-1]`` (PatchMerging first in timm) plus the final
norm. Plain ViT / DeiT / BEiT / EVA teachers have no spatial stages; the last stage is the
last ``last_blocks`` blocks (default depth / 4) plus the final norm, run on the patch tokens
with the image's own prefix tokens re-attached, and with the extra block inputs timm passes
at that depth (rotary embeddings, shared relative position bias) as the latest ``extract`` gave
them, so that weights loaded into the teacher after the build take effect.
"""
from dataclasses import dataclass
from functools import partial
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.task import DistillationTeacher

from .common import (Shape, UnsupportedModelError, channel_stats, dummy_input, map_to_tokens, model_label, probing,
                     shape_of, tokens_to_map)
from .families import find_family

__all__ = ['FrozenTeacher', 'LogitsTeacher', 'ScaleKDTeacher', 'TeacherFeatures']


@dataclass
class TeacherFeatures:
    """What one no-grad teacher forward provides to the distiller (the logits alone for logit KD)."""
    logits: torch.Tensor
    final: Optional[torch.Tensor] = None        # T_n, (N, C_t, H_t, W_t)
    stage_input: Optional[torch.Tensor] = None  # T_{n-1}: the last stage's input, (N, C, H, W)
    prefix: Optional[torch.Tensor] = None  # plain ViTs: prefix tokens at the last stage's input


class FrozenTeacher(DistillationTeacher):
    """A frozen timm teacher (eval mode, no gradients) with its input normalisation, one value per
    input channel of the run."""

    def __init__(self, model: nn.Module, in_chans: int = 3):
        super().__init__(model)
        self.label = model_label(model)
        model.requires_grad_(False)
        if self.mean_kd.shape[1] != in_chans:
            self.set_normalization(channel_stats(self.mean_kd.flatten().tolist(), in_chans),
                                   channel_stats(self.std_kd.flatten().tolist(), in_chans))

    def compile(self, backend: str = 'inductor', mode: Optional[str] = None, **compile_kwargs) -> 'FrozenTeacher':
        """Compile the no-grad feature extraction and, where there is one, the last stage the proxy path
        runs (timm's ``DistillationTeacher.compile`` compiles ``model.forward``, which neither calls)."""
        self.extract = torch.compile(self.extract, backend=backend, mode=mode, **compile_kwargs)
        if getattr(self, 'last_stage', None) is not None:
            self.last_stage = torch.compile(self.last_stage, backend=backend, mode=mode, **compile_kwargs)
        return self

    def __getstate__(self) -> Dict[str, Any]:
        """A copy or pickle holds the plain methods: a compiled one is bound to this teacher."""
        return {k: v for k, v in self.__dict__.items() if k not in ('extract', 'last_stage')}

    def set_normalization(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """The normalisation the teacher was trained with, when its pretrained cfg does not say it."""
        p = next(self.model.parameters())
        self.mean_kd = torch.tensor(mean, device=p.device, dtype=p.dtype).view(1, -1, 1, 1)
        self.std_kd = torch.tensor(std, device=p.device, dtype=p.dtype).view(1, -1, 1, 1)


class LogitsTeacher(FrozenTeacher):
    """A teacher for logit KD alone: any timm classifier, whatever its family; no feature is read and
    it has no last stage. Its one dummy forward checks the model runs at ``img_size``."""
    last_stage = None

    def __init__(self, model: nn.Module, img_size: Tuple[int, int], in_chans: int = 3):
        super().__init__(model, in_chans)
        with probing(model, f'teacher {self.label} cannot run at {img_size[0]}x{img_size[1]}'):
            self.extract(dummy_input(model, img_size, in_chans))

    @torch.no_grad()
    def extract(self, x: torch.Tensor) -> TeacherFeatures:
        """No-grad forward: the logits."""
        return TeacherFeatures(self.model(x))


class ScaleKDTeacher(FrozenTeacher):
    """A frozen teacher that also exposes its last stage as a differentiable callable.

    Args:
        model: the timm teacher (its parameters are frozen here).
        img_size: (H, W) the pair trains at.
        in_chans: input channels.
        last_blocks: plain ViTs only, number of final blocks forming the last stage.
    """

    def __init__(self, model: nn.Module, img_size: Tuple[int, int], in_chans: int = 3, last_blocks: Optional[int] = None):
        family = find_family(model, 'teacher')
        super().__init__(model, in_chans)
        self.family = family.name
        self.num_prefix_tokens = getattr(model, 'num_prefix_tokens', 0) if family.plain else 0
        self._stage_kwargs: Dict[int, Dict[str, Any]] = {}
        if self.family == 'swin':
            if last_blocks is not None:
                raise ValueError(f'teacher_last_blocks applies to plain ViT teachers only, not {self.label}')
            self.stage_start = len(model.layers) - 1
            self.patch_norm = nn.Identity()
        else:
            depth = len(model.blocks)
            last_blocks = last_blocks if last_blocks is not None else depth // 4
            if not 1 <= last_blocks < depth:
                raise ValueError(f'teacher_last_blocks must be in [1, {depth - 1}] for {self.label}, got {last_blocks}')
            self.stage_start = depth - last_blocks
            # avg-pool models (BEiT, EVA) keep their final norm in the head as fc_norm
            fc_norm = getattr(model, 'fc_norm', None)
            self.patch_norm = fc_norm if isinstance(model.norm, nn.Identity) and fc_norm is not None else nn.Identity()
            for i, blk in enumerate(model.blocks[self.stage_start:]):
                blk.register_forward_pre_hook(partial(self._record_block_inputs, i), with_kwargs=True)
        zeros = dummy_input(model, img_size, in_chans)
        probe = torch.randn(zeros.shape, generator=torch.Generator().manual_seed(0)).to(zeros)  # the global RNG untouched
        with probing(model, f'teacher {self.label} cannot run at {img_size[0]}x{img_size[1]}'):
            feats = self.extract(probe)
            self.final_shape: Shape = shape_of(feats.final)
            self.stage_input_shape: Shape = shape_of(feats.stage_input)
            self._check_replay(feats)
        self._stage_kwargs.clear()  # recorded at the build's weights: last_stage waits for a real extract()

    def _check_replay(self, feats: TeacherFeatures) -> None:
        """The adapter proves itself: its last stage, replayed on the stage input the teacher's own forward
        recorded, must give that forward's final feature, else the model is refused (TPP would train
        against a wrong last stage)."""
        with torch.no_grad():
            replay = self.last_stage(feats.stage_input, feats.prefix)
        scale = feats.final.abs().max().item()
        if not torch.allclose(replay, feats.final, rtol=1e-4, atol=1e-5 * max(scale, 1.0)):
            error = (replay - feats.final).abs().max().item()
            raise UnsupportedModelError(
                f'{self.label}: its last stage, replayed on the recorded stage input, does not give the teacher\'s '
                f'own final feature (largest difference {error:.3g}, values up to {scale:.3g}): the last-stage '
                f'adapter does not fit this model, so it cannot be a ScaleKD teacher')

    def _record_block_inputs(self, i: int, block: nn.Module, args: tuple, kwargs: Dict[str, Any]) -> None:
        """Forward pre-hook of last-stage block ``i``: keep the extra inputs timm gives it (rotary
        embedding, shared relative position bias, ...) for :meth:`last_stage` to replay."""
        if len(args) > 1:
            raise UnsupportedModelError(f'{self.label}: its blocks take extra positional inputs, which the '
                                        f'last-stage adapter cannot replay')
        self._stage_kwargs[i] = kwargs

    def _block_kwargs(self, i: int) -> Dict[str, Any]:
        """The extra inputs block ``stage_start + i`` got in the latest forward."""
        if i not in self._stage_kwargs:
            raise RuntimeError(f'{self.label} last stage replays the block inputs of the latest teacher forward: '
                               f'call extract() first')
        return self._stage_kwargs[i]

    @torch.no_grad()
    def extract(self, x: torch.Tensor) -> TeacherFeatures:
        """No-grad forward: logits, final feature map and the last stage's input."""
        model = self.model
        if self.family == 'swin':
            final, (stage_input,) = model.forward_intermediates(
                x, indices=[self.stage_start - 1], norm=False, output_fmt='NCHW')
            return TeacherFeatures(model.forward_head(final), final.permute(0, 3, 1, 2), stage_input)
        p = self.num_prefix_tokens
        final, (inter,) = model.forward_intermediates(
            x, indices=[self.stage_start - 1], return_prefix_tokens=p > 0, norm=False, output_fmt='NCHW')
        stage_input, prefix = inter if p > 0 else (inter, None)
        grid = tuple(stage_input.shape[-2:])
        final_map = tokens_to_map(self.patch_norm(final[:, p:]), grid)
        return TeacherFeatures(model.forward_head(final), final_map, stage_input, prefix)

    def last_stage(self, x: torch.Tensor, prefix: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The teacher's last stage on a (N, C, H, W) map shaped like its input; differentiable in ``x``.

        ``prefix``: the prefix tokens of the images (plain ViTs); a batch that stacks several
        projections of the same images repeats them.
        """
        model = self.model
        if tuple(x.shape[1:]) != self.stage_input_shape:
            raise ValueError(
                f'{self.label} last stage takes {self.stage_input_shape} maps, got {tuple(x.shape[1:])}')
        if self.family == 'swin':
            return model.norm(model.layers[-1](x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        tokens = map_to_tokens(x)
        p = self.num_prefix_tokens
        if p:
            if prefix is None:
                raise ValueError(f'{self.label} last stage needs the prefix tokens of the images')
            prefix = prefix.repeat(x.shape[0] // prefix.shape[0], 1, 1).to(tokens.dtype)
            tokens = torch.cat([prefix, tokens], dim=1)
        for i, blk in enumerate(model.blocks[self.stage_start:]):
            tokens = blk(tokens, **self._block_kwargs(i))
        tokens = self.patch_norm(model.norm(tokens)[:, p:])
        return tokens.transpose(1, 2).reshape(x.shape[0], -1, *x.shape[-2:])
