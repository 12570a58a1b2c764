"""The model families that need more than the general adapters: which timm classes each covers.

Any timm model is a student, and a teacher where its last stage replays (see
:mod:`scalekd.adapters.student` / :mod:`scalekd.adapters.teacher`). Families are the overrides:
``plain`` token models (ViT, DeiT, BEiT, EVA, Mixer) read s4 from their normed final tokens and, as
teachers, replay their last blocks with the prefix tokens; ConvNeXt's final norm sits in its head;
Hiera (unrolled token order) and MViTv2 (stages called with the grid size) replay their last stage by
a rule of their own.
The weight exports of :mod:`scalekd.tools.transfer` use ``openmmlab`` (OpenMMLab key rules) and
``torchvision`` (a torchvision model).

BEiT and EVA (timm's ``Beit`` / ``Eva`` classes, e.g. EVA-02) are families of their own: the adapters
treat them like a plain ViT (same blocks / norms / prefix-token API), but their weights are laid out
differently (``q_bias`` / ``v_bias``, layer-scale ``gamma_*``, relative position tables, SwiGLU MLPs),
so no ViT key rule carries them over. The paper's "BEiT-L/14 pre-trained by EVA" teacher,
``eva_large_patch14_196``, is a timm ``VisionTransformer``: family ``vit``.
"""
from dataclasses import dataclass
from typing import Optional, Tuple, Type

import torch.nn as nn
from timm.models.beit import Beit
from timm.models.convnext import ConvNeXt
from timm.models.efficientnet import EfficientNet
from timm.models.eva import Eva
from timm.models.hiera import Hiera
from timm.models.mlp_mixer import MlpMixer
from timm.models.mvitv2 import MultiScaleVit
from timm.models.resnet import ResNet
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

from .token_stages import SizedStage, UnrolledStage

__all__ = ['Family', 'FAMILIES', 'family_of', 'describe']


@dataclass(frozen=True)
class Family:
    """One model family and what each consumer supports for it."""
    name: str
    classes: Tuple[Type[nn.Module], ...]
    plain: bool = False          # tokens without spatial stages (ViT, Mixer)
    teacher_stage: Optional[type] = None  # a last-stage rule of its own (scalekd.adapters.token_stages)
    openmmlab: bool = False
    torchvision: bool = False


FAMILIES: Tuple[Family, ...] = (
    Family('resnet', (ResNet,), openmmlab=True, torchvision=True),
    Family('efficientnet', (EfficientNet,)),  # timm's EfficientNet class: EfficientNet, MobileNet-V1 / V2, MNASNet, MixNet
    Family('convnext', (ConvNeXt,), openmmlab=True),
    Family('swin', (SwinTransformer,), openmmlab=True),
    Family('mixer', (MlpMixer,), plain=True, openmmlab=True),
    Family('vit', (VisionTransformer,), plain=True, openmmlab=True, torchvision=True),
    Family('beit', (Beit,), plain=True),
    Family('eva', (Eva,), plain=True),
    Family('hiera', (Hiera,), teacher_stage=UnrolledStage),
    Family('mvitv2', (MultiScaleVit,), teacher_stage=SizedStage),
)


def family_of(model: nn.Module) -> Optional[Family]:
    """The family whose classes ``model`` is an instance of, if any."""
    return next((f for f in FAMILIES if isinstance(model, f.classes)), None)


def describe(role: str) -> str:
    """``name (Class), ...`` of the families with ``role`` (a :class:`Family` flag) set."""
    return ', '.join(f'{f.name} ({"/".join(c.__name__ for c in f.classes)})' for f in FAMILIES if getattr(f, role))
