"""The model families ScaleKD knows: which timm classes each covers and what each consumer does with it.

Consumers: the student adapter (``student``; ``plain`` token models tap s3 at a block, the others at
their second-to-last stage), the teacher adapter (``teacher``), and the weight exports of
:mod:`scalekd.tools.transfer` (``openmmlab``: OpenMMLab key rules; ``torchvision``: a torchvision model).

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
from timm.models.mlp_mixer import MlpMixer
from timm.models.resnet import ResNet
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

from .common import UnsupportedModelError, model_label

__all__ = ['Family', 'FAMILIES', 'family_of', 'find_family', 'describe']


@dataclass(frozen=True)
class Family:
    """One model family and what each consumer supports for it."""
    name: str
    classes: Tuple[Type[nn.Module], ...]
    student: bool = True
    teacher: bool = False
    plain: bool = False          # tokens without spatial stages (ViT, Mixer)
    openmmlab: bool = False
    torchvision: bool = False


FAMILIES: Tuple[Family, ...] = (
    Family('resnet', (ResNet,), openmmlab=True, torchvision=True),
    Family('efficientnet', (EfficientNet,)),  # timm's EfficientNet class: EfficientNet, MobileNet-V1 / V2, MNASNet, MixNet
    Family('convnext', (ConvNeXt,), openmmlab=True),
    Family('swin', (SwinTransformer,), teacher=True, openmmlab=True),
    Family('mixer', (MlpMixer,), plain=True, openmmlab=True),
    Family('vit', (VisionTransformer,), teacher=True, plain=True, openmmlab=True, torchvision=True),
    Family('beit', (Beit,), teacher=True, plain=True),
    Family('eva', (Eva,), teacher=True, plain=True),
)


def family_of(model: nn.Module) -> Optional[Family]:
    """The family whose classes ``model`` is an instance of, if any."""
    return next((f for f in FAMILIES if isinstance(model, f.classes)), None)


def describe(role: str) -> str:
    """``name (Class), ...`` of the families with ``role`` (a :class:`Family` flag) set."""
    return ', '.join(f'{f.name} ({"/".join(c.__name__ for c in f.classes)})' for f in FAMILIES if getattr(f, role))


def find_family(model: nn.Module, role: str) -> Family:
    """``model``'s family for ``role`` (``student`` or ``teacher``), or an error naming what is supported."""
    family = family_of(model)
    if family is None or not getattr(family, role):
        raise UnsupportedModelError(
            f'{model_label(model)} is not a supported ScaleKD {role}: its family has no {role} adapter. '
            f'Supported {role} families: {describe(role)}.')
    if not hasattr(model, 'forward_intermediates'):
        raise UnsupportedModelError(
            f'{model_label(model)} cannot be a ScaleKD {role}: it has no forward_intermediates() '
            f'(update timm to >= 1.0.23)')
    return family
