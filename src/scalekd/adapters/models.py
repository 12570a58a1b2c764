"""Creating timm models by name, with errors that say what is wrong."""
import difflib
from typing import Any, Dict, Optional, Sequence, Tuple

import timm
import torch.nn as nn
from timm.layers import to_2tuple
from timm.models import get_pretrained_cfg_value, split_model_name_tag

from ..method.errors import UserError
from .common import normalization_from_pretrained_cfg

__all__ = ['create_timm_model', 'default_img_size', 'normalization_from_model_name', 'classes_kwargs', 'ModelError',
           'UnknownModelError']


class ModelError(UserError):
    """A timm model that cannot be created as asked: a keyword it does not take, hub weights out of reach,
    an image size its patches do not tile."""


class UnknownModelError(ModelError):
    """A model name that timm does not know."""


def _check_name(name: str, role: str) -> None:
    arch, _ = split_model_name_tag(name)
    if timm.is_model(arch):
        return
    close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
    hint = f'; did you mean {", ".join(close)}?' if close else '; see timm.list_models()'
    raise UnknownModelError(f'unknown {role} model {name!r}: timm has no architecture {arch!r}{hint}')


def default_img_size(name: str, role: str = 'model') -> Optional[int]:
    """The input size of a timm name's pretrained config, if it has one."""
    _check_name(name, role)
    size = get_pretrained_cfg_value(name, 'input_size')
    return int(size[-1]) if size else None


def create_timm_model(
        name: str,
        img_size: Tuple[int, int],
        role: str = 'model',
        pretrained: bool = False,
        size_key: str = 'data.img_size',
        **kwargs: Any,
) -> nn.Module:
    """``timm.create_model`` that passes ``img_size`` to fixed-size models (ViT, Swin, Mixer, EVA, ...).

    Convolutional models adapt to any input and get no ``img_size``. A keyword the model does not take,
    and an image size its patches do not tile, are errors naming them (``size_key``: the setting of the size).
    """
    _check_name(name, role)
    if get_pretrained_cfg_value(name, 'fixed_input_size') and 'img_size' not in kwargs:
        kwargs['img_size'] = tuple(img_size)
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:
        if 'unexpected keyword argument' not in str(e):
            raise
        raise ModelError(f'{role} model {name!r} does not take {str(e).split("argument ")[-1]} (its kwargs): '
                         f'{e}') from None
    except OSError as e:  # the hub's weights not reachable (no network, no cache) or not there
        if not pretrained:
            raise
        raise ModelError(f'cannot load the hub weights of the {role} {name!r} ({str(e).splitlines()[0]}): without '
                         f'network, give local weights (teacher.checkpoint in a config, --checkpoint PATH in a '
                         f'command)') from None
    check_patches(model, name, role, tuple(img_size), size_key)
    return model


def classes_kwargs(role: str, pretrained: bool, num_classes: Optional[int]) -> Dict[str, int]:
    """The ``num_classes`` kwarg a model is created with. A pretrained teacher gets none: it keeps its own
    classifier (none for DINOv2 / EVA-02 MIM, 1000 classes for an ImageNet one), since a head made for the
    dataset's classes would be random and logit KD would silently teach noise."""
    if num_classes is None or (role == 'teacher' and pretrained):
        return {}
    return dict(num_classes=num_classes)


def check_patches(model: nn.Module, name: str, role: str, img_size: Tuple[int, int],
                  size_key: str = 'data.img_size') -> None:
    """A patch embedding that would silently drop the pixels past the last whole patch is refused, in a
    line naming ``size_key``."""
    embed = getattr(model, 'patch_embed', None)
    patch = getattr(embed, 'patch_size', None)
    if patch is None or getattr(embed, 'dynamic_img_pad', False):
        return
    for size, step in zip(img_size, to_2tuple(patch)):
        if size % step:
            lower, upper = size - size % step, size - size % step + step
            raise ModelError(f'image size {size} is not a multiple of the {role} {name!r} patch size {step}: the '
                             f'last {size % step} pixel rows and columns would be dropped ({size_key}: use '
                             f'{lower} or {upper})')


def normalization_from_model_name(name: Optional[str], in_chans: int, mean: Optional[Sequence[float]] = None,
                                   std: Optional[Sequence[float]] = None) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """:func:`scalekd.adapters.common.normalization_from_pretrained_cfg` of the timm model ``name`` (its
    pretrained cfg without building it)."""
    cfg = {k: get_pretrained_cfg_value(name, k) for k in ('mean', 'std')} if name else None
    return normalization_from_pretrained_cfg(cfg, in_chans, mean, std)
