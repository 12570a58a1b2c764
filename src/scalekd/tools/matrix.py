"""The model matrix: one model of every timm model module as a ScaleKD student (with a ViT and a Swin
teacher) and as a ScaleKD teacher (with a ResNet student), random weights, one training step each.

Each module is represented by its smallest model (fewest parameters among ``timm.list_models(module=m)``
in timm 1.0.31, counted on the meta device; :func:`smallest_models` recomputes it). A pair is tried at
64, 128, 224 px and the model's default size until it runs, with CAP heads that divide the teacher's widths;
the result is ``works`` or the reason it is refused.
"""
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn

from ..adapters import ScaleKDTeacher
from ..adapters.models import create_timm_model, default_img_size
from ..method.errors import UserError
from ..method.projectors import fitting_heads
from ..task.builder import build_distiller

__all__ = ['REPRESENTATIVES', 'CI_SAMPLE', 'MatrixRow', 'smallest_models', 'run_matrix', 'format_matrix']

REPRESENTATIVES: Dict[str, str] = {
    'beit': 'beit_base_patch16_224', 'byoanet': 'halonet_h1', 'byobnet': 'test_byobnet', 'cait': 'cait_xxs24_224',
    'coat': 'coat_tiny', 'convit': 'convit_tiny', 'convmixer': 'convmixer_768_32', 'convnext': 'test_convnext',
    'cpubone': 'cpubone_nano', 'crossvit': 'crossvit_tiny_240', 'csatv2': 'csatv2', 'cspnet': 'cs3darknet_focus_s',
    'cspnext': 'cspnext_tiny', 'davit': 'davit_tiny', 'deepseek_vit': 'deepseek_vit_412m',
    'deit': 'deit_tiny_patch16_224', 'densenet': 'densenet121', 'dla': 'dla46x_c', 'dpn': 'dpn48b',
    'edgenext': 'edgenext_xx_small', 'efficientformer': 'efficientformer_l1',
    'efficientformer_v2': 'efficientformerv2_s0', 'efficientnet': 'test_efficientnet',
    'efficientvim': 'efficientvim_m1', 'efficientvit_mit': 'efficientvit_b0', 'efficientvit_msra': 'efficientvit_m0',
    'eva': 'vit_tiny_patch16_dinov3_qkvb', 'fasternet': 'fasternet_t0', 'fastvit': 'fastvit_t8',
    'focalnet': 'focalnet_tiny_srf', 'gcvit': 'gcvit_xxtiny', 'gemma4_vit': 'gemma4_vit_167m',
    'ghostnet': 'ghostnet_050', 'hardcorenas': 'hardcorenas_b', 'hgnet': 'hgnetv2_b0', 'hiera': 'hiera_tiny_224',
    'hieradet_sam2': 'sam2_hiera_tiny', 'hrnet': 'hrnet_w18_small', 'iformer': 'iformer_t',
    'inception_next': 'inception_next_atto', 'inception_resnet_v2': 'inception_resnet_v2',
    'inception_v3': 'inception_v3', 'inception_v4': 'inception_v4', 'lcnetv2': 'lcnetv2_small',
    'levit': 'levit_128s', 'lowformer': 'lowformer_b0', 'mambaout': 'test_mambaout', 'maxxvit': 'test_coatnet',
    'metaformer': 'poolformerv2_s12', 'mlp_mixer': 'gmlp_ti16_224', 'mobilenetv3': 'mobilenetv3_small_050',
    'mobilenetv5': 'mobilenetv5_base', 'mobilevit': 'mobilevit_xxs', 'mvitv2': 'mvitv2_tiny',
    'naflexvit': 'naflexvit_base_patch16_parfac_gap', 'nasnet': 'nasnetalarge', 'nest': 'nest_tiny',
    'nextvit': 'nextvit_small', 'nfnet': 'test_nfnet', 'pit': 'pit_ti_224', 'pnasnet': 'pnasnet5large',
    'pvt_v2': 'pvt_v2_b0', 'qwen3_vit': 'qwen3_vit_88m', 'rdnet': 'rdnet_tiny', 'regnet': 'regnetx_002',
    'repghost': 'repghostnet_050', 'repvit': 'repvit_m1', 'res2net': 'res2next50', 'resnest': 'resnest14d',
    'resnet': 'test_resnet', 'resnetv2': 'resnetv2_18', 'rexnet': 'rexnet_100', 'selecsls': 'selecsls42',
    'senet': 'legacy_seresnet18', 'sequencer': 'sequencer2d_s', 'shvit': 'shvit_s1', 'sknet': 'skresnet18',
    'starnet': 'starnet_s050', 'swiftformer': 'swiftformer_xs', 'swin_transformer': 'swin_tiny_patch4_window7_224',
    'swin_transformer_v2': 'swinv2_tiny_window8_256', 'swin_transformer_v2_cr': 'swinv2_cr_tiny_224',
    'tiny_vit': 'tiny_vit_5m_224', 'tnt': 'tnt_s_legacy_patch16_224', 'tresnet': 'tresnet_m',
    'twins': 'twins_svt_small', 'vgg': 'vgg11', 'visformer': 'visformer_tiny', 'vision_transformer': 'test_vit',
    'vision_transformer_hybrid': 'vit_tiny_r_s16_p8_224', 'vision_transformer_relpos': 'test_vit_relpos',
    'vision_transformer_sam': 'samvit_base_patch16_224', 'vitamin': 'vitamin_small_224', 'volo': 'volo_d1_224',
    'vovnet': 'ese_vovnet19b_slim_dw', 'xception': 'legacy_xception', 'xception_aligned': 'xception41p',
    'xcit': 'xcit_nano_12_p8_224',
}

# the fixed sample CI runs (fast): students beyond the paper's families, and the hierarchical teachers
CI_SAMPLE: Dict[str, Tuple[str, ...]] = {
    'student': ('mobilenetv3', 'regnet', 'fastvit', 'swin_transformer_v2'),
    'teacher': ('swin_transformer_v2', 'convnext', 'efficientnet', 'maxxvit', 'ghostnet', 'hiera'),
}

SIZES = (64, 128, 224)
NUM_CLASSES = 10
# tiny random partners: (timm name, kwargs); Swin's window divides every grid at 64 / 128 px (4) and 224 (7)
PARTNER_TEACHERS: Dict[str, Callable[[int], Tuple[str, dict]]] = {
    'vit': lambda img: ('vit_tiny_patch16_224', dict(patch_size=8, embed_dim=64, depth=4, num_heads=2)),
    'swin': lambda img: ('swin_tiny_patch4_window7_224', dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1),
                                                             window_size=7 if img % 7 == 0 else 4)),
}
PARTNER_STUDENT = ('resnet18', dict(layers=[1, 1, 1, 1]))


@dataclass(frozen=True)
class MatrixRow:
    """One model in one role: ``works`` at ``img`` px with each partner, or the reason it is refused."""
    module: str
    model: str
    role: str
    results: Tuple[Tuple[str, str], ...]  # (partner, 'works' or the reason)
    img: Optional[int]
    seconds: float

    @property
    def works(self) -> bool:
        return all(r == 'works' for _, r in self.results)


def smallest_models(modules: Optional[Iterable[str]] = None) -> Dict[str, str]:
    """Each timm model module's model with the fewest parameters (built on the meta device: minutes)."""
    out = {}
    for module in modules or timm.list_modules():
        counts = {}
        for name in timm.list_models(module=module):
            try:
                with torch.device('meta'):
                    counts[name] = sum(p.numel() for p in timm.create_model(name).parameters())
            except Exception:  # a model that cannot be built on meta is not a candidate
                continue
        if counts:
            out[module] = min(counts, key=counts.get)
    return out


def _model(name: str, kwargs: dict, img: int) -> nn.Module:
    return create_timm_model(name, (img, img), num_classes=NUM_CLASSES, **kwargs)


def _one_step(teacher: nn.Module, student: nn.Module, img: int) -> None:
    """Build the ScaleKD task and take one SGD step; raises with the reason when it does not work. The CAP
    heads divide the teacher's widths (``s3_heads`` / ``s4_heads``, as a user would set them)."""
    torch.manual_seed(0)
    probe = ScaleKDTeacher(teacher, (img, img))
    heads = dict(s3_heads=fitting_heads(probe.stage_input_shape[0], 8), s4_heads=fitting_heads(probe.final_shape[0], 8))
    task = build_distiller(teacher, student, 'scalekd', img_size=img, **heads)
    params = [p for p in task.trainable_module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01)
    task.train()
    out = task(torch.randn(2, 3, img, img), torch.tensor([1, 2]))
    bad = [k for k, v in out.items() if not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f'non-finite {", ".join(bad)}')
    out['loss'].backward()
    stem = next(p for p in task.student.parameters() if p.requires_grad)
    if stem.grad is None or not stem.grad.abs().sum() > 0:
        raise ValueError("no gradient reaches the student's first weight")
    optimizer.step()


def _reason(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text if isinstance(error, (UserError, ValueError)) else f'{type(error).__name__}: {text}'


def _try(module: str, model: str, role: str, partners: Sequence[str]) -> MatrixRow:
    """``model`` in ``role`` with each partner, at the first size where the first partner's pair builds."""
    start, results, used = time.perf_counter(), [], None
    for img in dict.fromkeys(SIZES + (default_img_size(model) or SIZES[-1],)):
        results = []
        for partner in partners:
            try:
                if role == 'student':
                    _one_step(_model(*PARTNER_TEACHERS[partner](img), img), _model(model, {}, img), img)
                else:
                    _one_step(_model(model, {}, img), _model(*PARTNER_STUDENT, img), img)
                results.append((partner, 'works'))
            except Exception as e:  # the matrix records every failure as a reason, whatever its kind
                results.append((partner, _reason(e)))
        used = img
        if any(r == 'works' for _, r in results):
            break
    return MatrixRow(module, model, role, tuple(results), used, time.perf_counter() - start)


def run_matrix(roles: Sequence[str] = ('student', 'teacher'), modules: Optional[Sequence[str]] = None,
               progress: Optional[Callable[[MatrixRow], None]] = None) -> List[MatrixRow]:
    """Every (or the given) module's representative in each role; ``progress`` is called per row."""
    unknown = sorted(set(modules or ()) - set(REPRESENTATIVES))
    if unknown:
        raise UserError(f'unknown timm model module(s) {", ".join(unknown)}; known: {", ".join(REPRESENTATIVES)}')
    rows = []
    for role in roles:
        partners = tuple(PARTNER_TEACHERS) if role == 'student' else ('resnet',)
        for module in modules or REPRESENTATIVES:
            row = _try(module, REPRESENTATIVES[module], role, partners)
            rows.append(row)
            if progress:
                progress(row)
    return rows


def format_matrix(rows: Sequence[MatrixRow]) -> str:
    """A markdown table per role, with the counts."""
    out = []
    for role in dict.fromkeys(r.role for r in rows):
        mine = [r for r in rows if r.role == role]
        partners = [p for p, _ in mine[0].results]
        out.append(f'### As a {role} ({sum(r.works for r in mine)} of {len(mine)} modules work)\n')
        out.append('| module | model | px | ' + ' | '.join(f'with {p}' for p in partners) + ' |')
        out.append('|---|---|---|' + '---|' * len(partners))
        for r in mine:
            cells = [res.replace('|', '/') for _, res in r.results]
            out.append(f'| {r.module} | {r.model} | {r.img} | ' + ' | '.join(cells) + ' |')
        out.append('')
    return '\n'.join(out)
