"""timm architectures the paper uses that timm does not name: registered on import.

Mixer-B/14 (the paper's student for the patch-14 BEiT-L/14 teacher): timm's ``mixer_b16_224``
fixes ``patch_size``, so it cannot be re-patched by a kwarg. Mixer-T/7 (the demo's MLP student
for 28x28 images) is a tiny Mixer whose sizes all take kwargs.
"""
from timm.models import generate_default_cfgs, register_model
from timm.models.mlp_mixer import MlpMixer, _cfg, _create_mixer

__all__ = ['mixer_b14_224', 'mixer_t7']

default_cfgs = generate_default_cfgs({
    'mixer_b14_224.untrained': _cfg(),
    'mixer_t7.untrained': _cfg(input_size=(1, 28, 28), mean=(0.5,), std=(0.5,)),
})


@register_model
def mixer_b14_224(pretrained: bool = False, **kwargs) -> MlpMixer:
    """Mixer-B/14 at 224 (16x16 tokens), no pretrained weights."""
    model_args = dict(patch_size=14, num_blocks=12, embed_dim=768)
    return _create_mixer('mixer_b14_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def mixer_t7(pretrained: bool = False, **kwargs) -> MlpMixer:
    """Mixer-T/7: patch 7, 4 blocks of width 128 (4x4 tokens at 28x28), no pretrained weights."""
    model_args = dict(patch_size=7, num_blocks=4, embed_dim=128, img_size=28)
    return _create_mixer('mixer_t7', pretrained=pretrained, **dict(model_args, **kwargs))
