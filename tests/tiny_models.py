"""Tiny variants of every teacher and student family of the paper, for fast CPU tests."""
import timm
import timm.models.efficientnet as timm_efficientnet
from timm.models.mlp_mixer import MlpMixer

NUM_CLASSES = 10
IMG = 32        # plain-ViT teachers: 4x4 patch grid of patch 8
SWIN_IMG = 64   # Swin teachers: 16 -> 8 -> 4 -> 2 grids

TEACHERS = {
    'swin': ('swin_tiny_patch4_window7_224', dict(embed_dim=32, depths=(1, 1, 2, 2), num_heads=(2, 2, 2, 2), window_size=4)),
    'vit': ('vit_tiny_patch16_224', dict(patch_size=8, embed_dim=64, depth=4, num_heads=2)),
    'deit': ('deit_tiny_distilled_patch16_224', dict(patch_size=8, embed_dim=64, depth=4, num_heads=2)),
    'beit': ('beit_base_patch16_224', dict(patch_size=8, embed_dim=64, depth=4, num_heads=2)),
    'beit_shared_bias': ('beit_base_patch16_224', dict(patch_size=8, embed_dim=64, depth=4, num_heads=2,
                                                       use_rel_pos_bias=False, use_shared_rel_pos_bias=True)),
    'eva': ('eva_large_patch14_196', dict(patch_size=8, embed_dim=64, depth=4, num_heads=2)),
    'eva02': ('eva02_tiny_patch14_224', dict(patch_size=8, embed_dim=64, depth=4, num_heads=2)),
}

_STUDENT_NAMES = {
    'eva02': ('eva02_tiny_patch14_224', dict(patch_size=8, embed_dim=64, depth=4, num_heads=2)),
    'resnet': ('resnet18', dict(layers=[1, 1, 1, 1])),
    'resnet_d': ('resnet18d', dict(layers=[1, 1, 1, 1])),
    'convnext': ('convnext_tiny', dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128))),
    'vit': ('vit_tiny_patch16_224', dict(patch_size=8, embed_dim=64, depth=4, num_heads=2)),
    'deit': ('deit_tiny_distilled_patch16_224', dict(patch_size=8, embed_dim=64, depth=4, num_heads=2)),
    'swin': ('swin_tiny_patch4_window7_224', dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 2), window_size=4)),
}
STUDENTS = sorted(list(_STUDENT_NAMES) + ['mobilenet_v1', 'mixer'])


def teacher_img(teacher: str) -> int:
    return SWIN_IMG if teacher.startswith('swin') else IMG


def make_teacher(family: str, img: int):
    name, kwargs = TEACHERS[family]
    return timm.create_model(name, img_size=img, num_classes=NUM_CLASSES, **kwargs)


def make_student(family: str, img: int):
    """A fresh tiny student; the same call twice gives the same architecture."""
    if family == 'mobilenet_v1':  # timm's mobilenetv1_100 fixes its width; build a 0.25x one
        return timm_efficientnet._gen_mobilenet_v1('mobilenetv1_100', 0.25, pretrained=False, num_classes=NUM_CLASSES)
    if family == 'mixer':  # timm's mixer entry points fix patch_size
        return MlpMixer(img_size=img, patch_size=8, embed_dim=64, num_blocks=4, num_classes=NUM_CLASSES)
    name, kwargs = _STUDENT_NAMES[family]
    if timm.models.get_pretrained_cfg_value(name, 'fixed_input_size'):
        kwargs = dict(kwargs, img_size=img)
    return timm.create_model(name, num_classes=NUM_CLASSES, **kwargs)
