"""Teacher adapter: a frozen timm teacher's final feature, logits and last stage.

Built on timm's :class:`~timm.task.DistillationTeacher` (eval mode, normalisation buffers). The last
stage follows one of two rules (:mod:`scalekd.adapters.last_stage`): the last blocks of a plain ViT /
DeiT / BEiT / EVA, or the last ``feature_info`` module of any other timm model (Swin, SwinV2, ConvNeXt,
MaxViT, EfficientNet, ResNet, ...) with what ``forward_features`` runs after it; Hiera and MViTv2 have
rules of their own (:mod:`scalekd.adapters.token_stages`). Every teacher proves its rule at build time
by replaying its last stage on a recorded input.
"""
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.task import DistillationTeacher

from ..method.errors import OptionError
from .common import Shape, UnsupportedModelError, channel_stats, dummy_input, model_label, probing, shape_of
from .families import family_of
from .last_stage import ModuleStage, TokenStage
from .token_stages import SizedStage, UnrolledStage

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
        require_replay: refuse a teacher whose last stage does not replay (TPP needs it); false:
            :attr:`replays` says whether it does.
    """

    def __init__(self, model: nn.Module, img_size: Tuple[int, int], in_chans: int = 3, last_blocks: Optional[int] = None,
                 require_replay: bool = True):
        super().__init__(model, in_chans)
        family = family_of(model)
        self.family = family.name if family else type(model).__name__
        zeros = dummy_input(model, img_size, in_chans)
        probe = torch.randn(zeros.shape, generator=torch.Generator().manual_seed(0)).to(zeros)  # the global RNG untouched
        with probing(model, f'teacher {self.label} cannot run at {img_size[0]}x{img_size[1]}'):
            if family is not None and family.plain:
                self.stage: Union[TokenStage, ModuleStage, UnrolledStage, SizedStage] = TokenStage(model, last_blocks)
            elif last_blocks is not None:
                raise OptionError(f'teacher_last_blocks applies to plain ViT teachers only, not {self.label}')
            else:
                self.stage = (family.teacher_stage if family and family.teacher_stage else ModuleStage)(model, probe)
            feats = self.extract(probe)
            self.final_shape: Shape = shape_of(feats.final)
            self.stage_input_shape: Shape = shape_of(feats.stage_input)
        failure = self._replay_failure(feats)
        self.replays = failure is None  # whether TPP can run through its last stage
        if failure is not None and require_replay:
            raise failure
        self.stage.forget()  # recorded at the build's weights: last_stage waits for a real extract()

    def _replay_failure(self, feats: TeacherFeatures) -> Optional[UnsupportedModelError]:
        """The adapter proves itself: its last stage, replayed on the stage input the teacher's own forward
        recorded, must give that forward's final feature (else TPP would train against a wrong last
        stage). ``None`` when it does, else the error that says how it fails."""
        try:
            with probing(self.model, f'{self.label}: its last stage fails when replayed on the recorded stage input, '
                                     f'so the last-stage adapter does not fit it and it cannot be a ScaleKD teacher'):
                replay = self.last_stage(feats.stage_input, feats.prefix)
        except UnsupportedModelError as e:
            return e
        scale = feats.final.abs().max().item()
        if replay.shape != feats.final.shape:
            how = f'shape {tuple(replay.shape[1:])} instead of {tuple(feats.final.shape[1:])}'
        elif not torch.allclose(replay, feats.final, rtol=1e-4, atol=1e-5 * max(scale, 1.0)):
            how = f'largest difference {(replay - feats.final).abs().max().item():.3g}, values up to {scale:.3g}'
        else:
            return None
        return UnsupportedModelError(
            f'{self.label}: its last stage, replayed on the recorded stage input, does not give the teacher\'s '
            f'own final feature ({how}): the last-stage adapter does not fit this model, so it cannot be a '
            f'ScaleKD teacher')

    @torch.no_grad()
    def extract(self, x: torch.Tensor) -> TeacherFeatures:
        """No-grad forward: logits, final feature map and the last stage's input."""
        final, final_map, stage_input, prefix = self.stage.features(self.model, x)
        return TeacherFeatures(self.model.forward_head(final), final_map, stage_input, prefix)

    def last_stage(self, x: torch.Tensor, prefix: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The teacher's last stage on a (N, C, H, W) map shaped like its input; differentiable in ``x``.

        ``prefix``: the prefix tokens of the images (plain ViTs); a batch that stacks several
        projections of the same images repeats them.
        """
        if tuple(x.shape[1:]) != self.stage_input_shape:
            raise ValueError(
                f'{self.label} last stage takes {self.stage_input_shape} maps, got {tuple(x.shape[1:])}')
        return self.stage.replay(self.model, x, prefix)
