"""A timm student's state dict under the key names another toolkit's model expects.

``timm``: unchanged. ``torchvision`` (the families with ``torchvision`` set in
:data:`scalekd.adapters.FAMILIES`): ResNet with the plain stem (``resnet18/34/50/101/152``; the keys are
timm's) and ViT with a class token (``VisionTransformer``). ``mmdet`` / ``mmseg``: the backbone alone
under OpenMMLab's names (:mod:`.openmmlab`).
"""
from typing import Callable, Dict

import torch
import torch.nn as nn

from ...adapters import families
from ...engine.errors import UserError
from .key_rules import rename
from .openmmlab import OpenMMLabKeyError, family_of, to_openmmlab

__all__ = ['FORMATS', 'ExportFormatError', 'to_format']

FORMATS = ('timm', 'torchvision', 'mmdet', 'mmseg')
_VIT_TORCHVISION = [  # timm -> torchvision templates (.key_rules)
    ('cls_token', 'class_token'),
    ('pos_embed', 'encoder.pos_embedding'),
    ('patch_embed.proj.*', 'conv_proj.*'),
    ('blocks.{i}.norm1.*', 'encoder.layers.encoder_layer_{i}.ln_1.*'),
    ('blocks.{i}.norm2.*', 'encoder.layers.encoder_layer_{i}.ln_2.*'),
    ('blocks.{i}.attn.qkv.weight', 'encoder.layers.encoder_layer_{i}.self_attention.in_proj_weight'),
    ('blocks.{i}.attn.qkv.bias', 'encoder.layers.encoder_layer_{i}.self_attention.in_proj_bias'),
    ('blocks.{i}.attn.proj.*', 'encoder.layers.encoder_layer_{i}.self_attention.out_proj.*'),
    ('blocks.{i}.mlp.fc1.*', 'encoder.layers.encoder_layer_{i}.mlp.0.*'),
    ('blocks.{i}.mlp.fc2.*', 'encoder.layers.encoder_layer_{i}.mlp.3.*'),
    ('norm.*', 'encoder.ln.*'),
    ('head.*', 'heads.head.*'),
]


class ExportFormatError(UserError):
    """A student that the asked format has no model for."""


def _openmmlab(toolkit: str) -> Callable[[nn.Module, Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]:
    """The backbone as its ``init_cfg=dict(type='Pretrained')`` loader reads it: mmdet's Swin takes
    only keys under ``backbone.`` (mmseg's either way); their ResNet and mmseg's ViT the bare keys."""
    def convert(model: nn.Module, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        try:
            out = to_openmmlab(model, toolkit, state)
        except OpenMMLabKeyError as e:
            raise ExportFormatError(str(e)) from None
        return {f'backbone.{k}': v for k, v in out.items()} if family_of(model) == 'swin' else out
    return convert


def _torchvision_name(key: str) -> str:
    new = rename(key, _VIT_TORCHVISION)
    if new is None:
        raise ExportFormatError(f'no torchvision name for the timm key {key!r}')
    return new


def _torchvision(model: nn.Module, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    name, family = type(model).__name__, families.family_of(model)
    if family is None or not family.torchvision:
        raise ExportFormatError(f'--format torchvision covers ResNet and ViT students, not {name}; use --format timm')
    if family.name == 'resnet':
        if not isinstance(model.conv1, nn.Conv2d) or any('downsample.2' in k for k in state):
            raise ExportFormatError('torchvision has no ResNet with a deep stem or average-pool shortcut '
                                    '(the ResNet-D of this student); use --format timm')
        return dict(state)
    # vit
    plain = (model.num_prefix_tokens == 1 and model.has_class_token and model.global_pool == 'token'
             and isinstance(model.fc_norm, nn.Identity) and not isinstance(model.norm, nn.Identity))
    if not plain or any(k.startswith(('blocks.0.ls', 'reg_token')) or '.q_norm' in k for k in state):
        raise ExportFormatError(f'torchvision ViT has one class token, pre-norm blocks and a final norm; '
                                f'{name} differs; use --format timm')
    return {_torchvision_name(k): v for k, v in state.items()}


_CONVERTERS: Dict[str, Callable[[nn.Module, Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]] = {
    'timm': lambda model, state: dict(state),
    'torchvision': _torchvision,
    'mmdet': _openmmlab('mmdet'),
    'mmseg': _openmmlab('mmseg'),
}


def to_format(model: nn.Module, fmt: str) -> Dict[str, torch.Tensor]:
    """``model``'s state dict with the keys of ``fmt`` (one of :data:`FORMATS`)."""
    if fmt not in _CONVERTERS:
        raise ExportFormatError(f'unknown export format {fmt!r}; choose from {", ".join(FORMATS)}')
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    return _CONVERTERS[fmt](model, state)
