"""The OpenMMLab mapping cases: full-size key lists and small numeric cases, shared by the fixture
generator (``scripts/make_openmmlab_fixtures.py``, run where mmdet / mmseg / mmpretrain are installed)
and ``tests/test_openmmlab.py`` (run anywhere, from the written fixtures)."""
from pathlib import Path
from typing import Dict, Sequence

import torch

FIXTURES = Path(__file__).parent / 'fixtures'
KEYS_FILE = FIXTURES / 'openmmlab_keys.json'
OUTPUTS_FILE = FIXTURES / 'openmmlab_outputs.json'

# name -> (toolkit, timm model, timm kwargs, OpenMMLab module spec): full-size key lists
KEY_CASES = {
    'mmdet/resnet50': ('mmdet', 'resnet50', {}, ('mmdet.ResNet', dict(depth=50))),
    'mmdet/resnet50d': ('mmdet', 'resnet50d', {}, ('mmdet.ResNetV1d', dict(depth=50))),
    'mmdet/swin_tiny': ('mmdet', 'swin_tiny_patch4_window7_224', {}, ('mmdet.SwinTransformer', {})),
    'mmseg/resnet50c': ('mmseg', 'resnet50c', {}, ('mmseg.ResNetV1c', dict(depth=50))),
    'mmseg/swin_tiny': ('mmseg', 'swin_tiny_patch4_window7_224', {}, ('mmseg.SwinTransformer', {})),
    'mmseg/vit_base': ('mmseg', 'vit_base_patch16_224', dict(img_size=512),
                       ('mmseg.VisionTransformer', dict(img_size=512, patch_bias=True, final_norm=True,
                                                        norm_cfg=dict(type='LN', eps=1e-6)))),
    'mmcls/resnet50d': ('mmcls', 'resnet50d', {}, ('mmpretrain.ResNetV1d', dict(depth=50), ('LinearClsHead', 2048))),
    'mmcls/deit_small': ('mmcls', 'deit_small_patch16_224', {},
                         ('mmpretrain.VisionTransformer', dict(arch='deit-small'), ('VisionTransformerClsHead', 384))),
    'mmcls/swin_tiny': ('mmcls', 'swin_tiny_patch4_window7_224', {},
                        ('mmpretrain.SwinTransformer', dict(arch='tiny'), ('LinearClsHead', 768))),
    'mmcls/convnext_tiny': ('mmcls', 'convnext_tiny', {},
                            ('mmpretrain.ConvNeXt', dict(arch='tiny'), ('LinearClsHead', 768))),
    'mmcls/mixer_b16': ('mmcls', 'mixer_b16_224', {}, ('mmpretrain.MlpMixer', dict(arch='b'), ('LinearClsHead', 768))),
}

# name -> (toolkit, timm model, timm kwargs, OpenMMLab module spec, input shape): small numeric cases.
# mmcls cases go OpenMMLab -> timm (import: logits); mmdet / mmseg cases timm -> OpenMMLab (export: last features).
# mmdet's Swin keeps shifting windows on a map no larger than a window (timm and mmpretrain do not): its
# case runs at 448 so that every stage is larger than its 7x7 windows, as detection inputs are.
OUTPUT_CASES = {
    'mmcls/resnet50d': ('mmcls', 'resnet50d', dict(num_classes=5, stem_width=8, channels=(16, 32, 64, 128)),
                        ('mmpretrain.ResNetV1d', dict(depth=50, stem_channels=16, base_channels=16),
                         ('LinearClsHead', 512)), (2, 3, 64, 64)),
    'mmcls/deit': ('mmcls', 'deit_small_patch16_224', dict(num_classes=5, patch_size=8, embed_dim=32,
                                                            depth=2, num_heads=2),
                   ('mmpretrain.VisionTransformer', dict(arch=dict(embed_dims=32, num_layers=2, num_heads=2,
                                                                   feedforward_channels=128), img_size=32, patch_size=8),
                    ('VisionTransformerClsHead', 32)), (2, 3, 32, 32)),
    'mmcls/swin': ('mmcls', 'swin_tiny_patch4_window7_224', dict(num_classes=5, embed_dim=16, depths=(2, 2, 2, 2),
                                                                 num_heads=(1, 1, 2, 2)),
                   ('mmpretrain.SwinTransformer', dict(arch=dict(embed_dims=16, depths=[2, 2, 2, 2],
                                                                 num_heads=[1, 1, 2, 2])), ('LinearClsHead', 128)),
                   (1, 3, 224, 224)),
    'mmcls/convnext': ('mmcls', 'convnext_tiny', dict(num_classes=5, depths=(1, 1, 1, 1), dims=(8, 16, 32, 64)),
                       ('mmpretrain.ConvNeXt', dict(arch=dict(depths=[1, 1, 1, 1], channels=[8, 16, 32, 64])),
                        ('LinearClsHead', 64)), (2, 3, 64, 64)),
    'mmcls/mixer': ('mmcls', 'mixer_t7', dict(num_classes=5, in_chans=3, embed_dim=32, num_blocks=2,
                                              mlp_ratio=(0.5, 2.0)),
                    ('mmpretrain.MlpMixer', dict(arch=dict(embed_dims=32, num_layers=2, tokens_mlp_dims=16,
                                                           channels_mlp_dims=64), img_size=28, patch_size=7),
                     ('LinearClsHead', 32)), (2, 3, 28, 28)),
    'mmdet/resnet50d': ('mmdet', 'resnet50d', dict(stem_width=8, channels=(16, 32, 64, 128)),
                        ('mmdet.ResNetV1d', dict(depth=50, stem_channels=16, base_channels=16)), (2, 3, 64, 64)),
    'mmdet/swin': ('mmdet', 'swin_tiny_patch4_window7_224', dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2)),
                   ('mmdet.SwinTransformer', dict(embed_dims=16, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2),
                                                  out_indices=(3,))), (1, 3, 448, 448)),
    'mmseg/vit': ('mmseg', 'vit_base_patch16_224', dict(patch_size=8, embed_dim=32, depth=2, num_heads=2),
                  ('mmseg.VisionTransformer', dict(img_size=32, patch_size=8, embed_dims=32, num_layers=2, num_heads=2,
                                                   patch_bias=True, final_norm=True, norm_cfg=dict(type='LN', eps=1e-6))),
                  (2, 3, 32, 32)),
}


def seeded_state(shapes: Dict[str, Sequence[int]], seed: int = 0) -> Dict[str, torch.Tensor]:
    """Reproducible weights for a key -> shape list: normal(0, 0.1) floats, positive running variances,
    zero batch counters; window index constants are left out (each side rebuilds its own)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key in sorted(shapes):
        shape = tuple(shapes[key])
        if key.endswith('relative_position_index'):
            continue
        if key.endswith('num_batches_tracked'):
            state[key] = torch.zeros(shape, dtype=torch.long)
        elif key.endswith('running_var'):
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            state[key] = torch.randn(shape, generator=g) * 0.1
    return state


def seeded_input(shape: Sequence[int], seed: int = 1) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))


def build_timm(name: str, kwargs: dict, size: int = 224):
    """The timm side of a case (``img_size`` in ``kwargs`` overrides ``size``)."""
    from scalekd.adapters.models import create_timm_model
    kwargs = dict(kwargs)
    side = kwargs.pop('img_size', size)
    return create_timm_model(name, (side, side), **kwargs).eval()


def timm_output(model, toolkit: str, x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """What the case's OpenMMLab model outputs, computed by the timm model: logits (mmcls), or the last
    feature map as NCHW (mmdet / mmseg backbones)."""
    with torch.no_grad():
        if toolkit == 'mmcls':
            return model(x)
        feats = model.forward_features(x)
        if feats.dim() == 3:  # ViT tokens: drop the class token, to NCHW
            return feats[:, model.num_prefix_tokens:].transpose(1, 2).reshape(tuple(shape))
        if feats.shape[1:] != tuple(shape[1:]):  # Swin: NHWC
            return feats.permute(0, 3, 1, 2)
        return feats
