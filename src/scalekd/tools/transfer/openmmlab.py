"""timm <-> OpenMMLab key names for the families with ``openmmlab`` set in :data:`scalekd.adapters.FAMILIES`
(ResNet, ConvNeXt, Swin, MLP-Mixer, ViT).

Toolkits: ``mmcls`` (mmcls 1.x / mmpretrain classifiers: ``backbone.`` + ``head.``, the format of the
ScaleKD release's students), ``mmdet`` and ``mmseg`` (the bare backbone a detector / segmentor
loads through ``init_cfg=dict(type='Pretrained', ...)``). The key lists these rules produce are
checked against lists written by the real packages (``scripts/make_openmmlab_fixtures.py``).

A rule pairs a timm key template with an OpenMMLab one (:mod:`.key_rules`); the first rule that
matches wins, both ways.
"""
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from ...adapters import families
from ...engine.errors import UserError
from .key_rules import Rule, rename

__all__ = ['TOOLKITS', 'OpenMMLabKeyError', 'family_of', 'to_openmmlab', 'from_openmmlab']

TOOLKITS = ('mmcls', 'mmdet', 'mmseg')

_SWIN_BLOCK = [(f'layers.{{i}}.blocks.{{j}}.{t}', f'stages.{{i}}.blocks.{{j}}.{m}') for t, m in (
    ('attn.*', 'attn.w_msa.*'), ('mlp.fc1.*', 'ffn.layers.0.0.*'), ('mlp.fc2.*', 'ffn.layers.1.*'), ('*', '*'))]
_SWIN = [('patch_embed.proj.*', 'patch_embed.projection.*'), ('patch_embed.norm.*', 'patch_embed.norm.*'),
         *_SWIN_BLOCK, ('layers.{i}.downsample.*', 'stages.{i-1}.downsample.*'), ('norm.*', 'norm3.*')]
_VIT_BLOCK = [('blocks.{i}.norm1.*', 'layers.{i}.ln1.*'), ('blocks.{i}.norm2.*', 'layers.{i}.ln2.*'),
              ('blocks.{i}.mlp.fc1.*', 'layers.{i}.ffn.layers.0.0.*'), ('blocks.{i}.mlp.fc2.*', 'layers.{i}.ffn.layers.1.*')]
_VIT_ATTN = {  # mmcls / mmpretrain: its own qkv / proj; mmseg: mmcv's nn.MultiheadAttention
    'mmcls': [('blocks.{i}.attn.*', 'layers.{i}.attn.*')],
    'mmseg': [('blocks.{i}.attn.qkv.weight', 'layers.{i}.attn.attn.in_proj_weight'),
              ('blocks.{i}.attn.qkv.bias', 'layers.{i}.attn.attn.in_proj_bias'),
              ('blocks.{i}.attn.proj.*', 'layers.{i}.attn.attn.out_proj.*')],
}
_VIT = [('cls_token', 'cls_token'), ('pos_embed', 'pos_embed'), ('patch_embed.proj.*', 'patch_embed.projection.*'),
        *_VIT_BLOCK, ('norm.*', 'ln1.*')]
_MIXER = [('stem.proj.*', 'patch_embed.projection.*'), ('blocks.{i}.norm1.*', 'layers.{i}.ln1.*'),
          ('blocks.{i}.norm2.*', 'layers.{i}.ln2.*'),
          ('blocks.{i}.mlp_tokens.fc1.*', 'layers.{i}.token_mix.layers.0.0.*'),
          ('blocks.{i}.mlp_tokens.fc2.*', 'layers.{i}.token_mix.layers.1.*'),
          ('blocks.{i}.mlp_channels.fc1.*', 'layers.{i}.channel_mix.layers.0.0.*'),
          ('blocks.{i}.mlp_channels.fc2.*', 'layers.{i}.channel_mix.layers.1.*'), ('norm.*', 'ln1.*')]
_CONVNEXT = [('stem.*', 'downsample_layers.0.*'), ('stages.{i}.downsample.*', 'downsample_layers.{i}.*'),
             ('stages.{i}.blocks.{j}.conv_dw.*', 'stages.{i}.{j}.depthwise_conv.*'),
             ('stages.{i}.blocks.{j}.mlp.fc1.*', 'stages.{i}.{j}.pointwise_conv1.*'),
             ('stages.{i}.blocks.{j}.mlp.fc2.*', 'stages.{i}.{j}.pointwise_conv2.*'),
             ('stages.{i}.blocks.{j}.*', 'stages.{i}.{j}.*'), ('head.norm.*', 'norm3.*')]
_RESNET_DEEP_STEM = {  # timm's conv1 = Sequential(conv, bn, relu, conv, bn, relu, conv) + bn1
    'mmcls': [('conv1.0.*', 'stem.0.conv.*'), ('conv1.1.*', 'stem.0.bn.*'), ('conv1.3.*', 'stem.1.conv.*'),
              ('conv1.4.*', 'stem.1.bn.*'), ('conv1.6.*', 'stem.2.conv.*'), ('bn1.*', 'stem.2.bn.*')],
    'mmdet': [('bn1.*', 'stem.7.*'), ('conv1.{k}.*', 'stem.{k}.*')],
}
_RESNET_AVG_DOWN_MMCLS = [  # mmcls puts no pooling before layer1's shortcut conv (stride 1); timm an Identity
    ('layer1.0.downsample.1.*', 'layer1.0.downsample.0.*'), ('layer1.0.downsample.2.*', 'layer1.0.downsample.1.*')]
_RESNET = [('conv1.*', 'conv1.*'), ('bn1.*', 'bn1.*'), ('layer{s}.*', 'layer{s}.*')]


class OpenMMLabKeyError(UserError):
    """A model or state dict that the OpenMMLab key mapping cannot carry over whole."""


def family_of(model: nn.Module) -> str:
    """``model``'s family name when OpenMMLab key rules exist for it; an error for other models."""
    family = families.family_of(model)
    if family is None or not family.openmmlab:
        raise OpenMMLabKeyError(f'OpenMMLab key names are known for {families.describe("openmmlab")} students, '
                                f'not {type(model).__name__}')
    return family.name


def _rules(model: nn.Module, toolkit: str) -> List[Rule]:
    """The rules of ``model``'s family in ``toolkit``; classifier heads included for ``mmcls``."""
    if toolkit not in TOOLKITS:
        raise OpenMMLabKeyError(f'unknown OpenMMLab toolkit {toolkit!r}; choose from {", ".join(TOOLKITS)}')
    family = family_of(model)
    dense = toolkit != 'mmcls'
    if family == 'resnet':
        deep = not isinstance(model.conv1, nn.Conv2d)
        avg_down = isinstance(model.layer1[0].downsample, nn.Sequential) and len(model.layer1[0].downsample) == 3
        backbone = ((_RESNET_DEEP_STEM['mmdet' if dense else 'mmcls'] if deep else [])
                    + (_RESNET_AVG_DOWN_MMCLS if avg_down and not dense else []) + _RESNET)
        head = [('fc.*', 'head.fc.*')]
    elif family == 'swin':
        backbone, head = _SWIN, [('head.fc.*', 'head.fc.*')]
    elif family == 'vit':
        if toolkit == 'mmdet':
            raise OpenMMLabKeyError('mmdet has no plain ViT backbone; use --format mmseg (UperNet) for ViT students')
        backbone = _VIT_ATTN[toolkit] + _VIT
        head = [('head.*', 'head.layers.head.*'), ('head.*', 'head.fc.*')]
    elif dense:
        raise OpenMMLabKeyError(f'--format {toolkit} covers ResNet, Swin (and ViT for mmseg) backbones, '
                                f'not {family}; use --format timm')
    else:
        backbone = _CONVNEXT if family == 'convnext' else _MIXER
        head = [('head.fc.*', 'head.fc.*')] if family == 'convnext' else [('head.*', 'head.fc.*')]
    if dense:
        return backbone
    return head + [(t, 'backbone.' + m) for t, m in backbone]


def _unfold_order(channels: int) -> torch.Tensor:
    """Index of timm's PatchMerging channel for each of OpenMMLab's (nn.Unfold order: c, kh, kw)."""
    c = channels // 4
    m = torch.arange(channels)
    kh, kw = (m % 4) // 2, m % 2
    return (kw * 2 + kh) * c + m // 4


def to_openmmlab(model: nn.Module, toolkit: str,
                 state: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """``model``'s weights (or ``state``, its state dict) under ``toolkit``'s key names (``mmdet`` /
    ``mmseg``: the backbone alone)."""
    rules = _rules(model, toolkit)
    state = dict(state) if state is not None else {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    swin = family_of(model) == 'swin'
    if swin:  # timm keeps it out of the state dict; OpenMMLab's Swin stores it
        state.update({k: b.cpu() for k, b in model.named_buffers() if k.endswith('relative_position_index')})
    out = {}
    for key, value in state.items():
        new = rename(key, rules)
        if new is None:
            if toolkit != 'mmcls' and key.startswith(('fc.', 'head.')):
                continue  # the classifier is not part of a detection / segmentation backbone
            raise OpenMMLabKeyError(f'no {toolkit} name for the timm key {key!r}')
        if swin and '.downsample.' in key:  # patch merging: norm and reduction over 4C concatenated channels
            value = value.index_select(-1, _unfold_order(value.shape[-1])).contiguous()
        out[new] = value
    return out


def from_openmmlab(model: nn.Module, state: Dict[str, torch.Tensor], toolkit: str = 'mmcls') -> Dict[str, torch.Tensor]:
    """``state`` (``toolkit``'s key names) as a state dict that ``model`` loads strictly.

    Every tensor must find a home: an unmapped key, a missing timm key or a shape that differs is an
    error listing them. Swin's ``relative_position_index`` (a constant timm rebuilds) must equal timm's.
    """
    rules = _rules(model, toolkit)
    swin = family_of(model) == 'swin'
    target = model.state_dict()
    buffers = dict(model.named_buffers())
    out, homeless, wrong = {}, [], []
    for key, value in state.items():
        new = rename(key, rules, reverse=True)
        if new is None:
            homeless.append(key)
            continue
        if new.endswith('relative_position_index') and new not in target and new in buffers:
            if not torch.equal(value.to(buffers[new].dtype), buffers[new]):
                wrong.append(f'{key} (differs from timm\'s window index)')
            continue
        if new not in target:
            homeless.append(key)
        elif tuple(value.shape) != tuple(target[new].shape):
            wrong.append(f'{key} {tuple(value.shape)} -> {new} {tuple(target[new].shape)}')
        elif swin and '.downsample.' in new:
            out[new] = value.index_select(-1, torch.argsort(_unfold_order(value.shape[-1])))
        else:
            out[new] = value
    missing = sorted(set(target) - set(out))
    problems = [f'{len(v)} {what}: {", ".join(v[:8])}{" ..." if len(v) > 8 else ""}'
                for what, v in (('keys with no home in the timm model', homeless),
                                ('timm keys left without weights', missing), ('mismatched tensors', wrong)) if v]
    if problems:
        raise OpenMMLabKeyError(f'{type(model).__name__} cannot take these {toolkit} weights whole; ' + '; '.join(problems))
    return out
