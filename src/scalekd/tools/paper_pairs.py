"""The eleven teacher-student pairs of the paper's Table 3, with the reference release's settings."""
from dataclasses import dataclass, field
from typing import Any, Dict

__all__ = ['PaperPair', 'PAPER_PAIRS']

SWIN_L = 'swin_large_patch4_window7_224.ms_in22k_ft_in1k'
EVA_L = 'eva_large_patch14_196.in22k_ft_in22k_in1k'  # the paper's "BEiT-L/14 pre-trained by EVA"
_SWIN_L_OPTS = dict(s3_heads=16, s4_heads=24, w_ori=0.08, w_alt=0.06)
_EVA_L_OPTS = dict(w_ori=0.016, w_alt=0.008)


@dataclass(frozen=True)
class PaperPair:
    """One row of Table 3: timm names, kwargs, resolution and distillation options."""
    teacher: str
    student: str
    img_size: int = 224
    student_kwargs: Dict[str, Any] = field(default_factory=dict)
    options: Dict[str, Any] = field(default_factory=dict)
    baseline_top1: float = 0.0
    scalekd_top1: float = 0.0


PAPER_PAIRS: Dict[str, PaperPair] = {
    'swin_l-mobilenet_v1': PaperPair(SWIN_L, 'mobilenetv1_100', options=_SWIN_L_OPTS,
                                     baseline_top1=72.10, scalekd_top1=75.15),
    # the release's ResNet-50 student was ResNet-50-D
    'swin_l-resnet50': PaperPair(SWIN_L, 'resnet50d', options=_SWIN_L_OPTS, baseline_top1=78.64, scalekd_top1=82.03),
    'swin_l-convnext_t': PaperPair(SWIN_L, 'convnext_tiny', options=_SWIN_L_OPTS, baseline_top1=82.14, scalekd_top1=84.16),
    'swin_l-mixer_s16': PaperPair(SWIN_L, 'mixer_s16_224', options=_SWIN_L_OPTS, baseline_top1=74.02, scalekd_top1=78.63),
    'swin_l-mixer_b16': PaperPair(SWIN_L, 'mixer_b16_224', options=dict(_SWIN_L_OPTS, student_s3_block=10),
                                  baseline_top1=76.44, scalekd_top1=81.96),
    'swin_l-vit_s16': PaperPair(SWIN_L, 'deit_small_patch16_224', options=_SWIN_L_OPTS,
                                baseline_top1=79.90, scalekd_top1=83.93),
    'swin_l-swin_t': PaperPair(SWIN_L, 'swin_tiny_patch4_window7_224', options=_SWIN_L_OPTS,
                               baseline_top1=81.18, scalekd_top1=83.80),
    'swin_l-vit_b16': PaperPair(SWIN_L, 'deit_base_patch16_224', options=_SWIN_L_OPTS,
                                baseline_top1=81.80, scalekd_top1=85.53),
    'beit_l-resnet50': PaperPair(EVA_L, 'resnet50d', options=_EVA_L_OPTS, baseline_top1=78.64, scalekd_top1=82.34),
    'beit_l-mixer_b14': PaperPair(EVA_L, 'mixer_b14_224', options=dict(_EVA_L_OPTS, student_s3_block=10),
                                  baseline_top1=76.62, scalekd_top1=82.89),
    'beit_l-vit_b14': PaperPair(EVA_L, 'deit_base_patch16_224', student_kwargs=dict(patch_size=14),
                                options=_EVA_L_OPTS, baseline_top1=82.02, scalekd_top1=86.43),
}
