"""``scalekd inspect``: what a teacher-student pair distils, at what cost, and whether it trains."""
import time
from typing import Any, Dict, List

import torch
import torch.nn as nn
from timm.utils import unwrap_model

from ..engine.devices import model_device
from ..task.distiller import Distiller

__all__ = ['inspect_distiller', 'format_report', 'param_counts', 'tap_rows', 'count_params']


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def param_counts(distiller: Distiller) -> Dict[str, int]:
    """Parameters of the student, the teacher and the distillation modules (projectors)."""
    teacher = distiller.teacher
    return dict(student=count_params(distiller.student),
                teacher=count_params(teacher.model) if teacher is not None else 0,
                distill=count_params(distiller.distill_modules()))


def tap_rows(distiller: Distiller) -> List[Dict[str, Any]]:
    module = unwrap_model(distiller.trainable_module)
    taps = distiller.taps.taps
    opts = distiller.options
    teacher = distiller.teacher
    rows = []
    for name, mimicking, path, target in (
            ('s3', module.proxy.mimicking if module.proxy is not None else None, 'proxy', teacher and teacher.stage_input_shape),
            ('s3', module.s3, 'direct', teacher and teacher.stage_input_shape),
            ('s4', module.s4, 'direct', teacher and teacher.final_shape)):
        if mimicking is None:
            continue
        rows.append(dict(
            name=name, path=path, student_shape=list(getattr(taps, name)), target_shape=list(target),
            projector=opts.projector, views=[v.name for v in mimicking.views],
            queries='proxy' if name == 's4' and opts.adaptive_queries else 'learned',
            params=count_params(mimicking)))
    return rows


def _train_step(distiller: Distiller, batch: int) -> Dict[str, Any]:
    """One forward / backward / SGD step on a random batch (on the distiller's device); the loss terms and
    seconds taken."""
    size, device = distiller.img_size, model_device(distiller)
    params = [p for p in distiller.trainable_module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-3)
    num_classes = distiller.student.num_classes
    images = torch.randn(batch, distiller.in_chans, *size, device=device)
    targets = torch.randint(0, num_classes, (batch,), device=device)
    start = time.perf_counter()
    out = distiller(images, targets)
    out['loss'].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    losses = {k: float(v.detach()) for k, v in out.items() if k != 'output'}
    finite = all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    return dict(ok=bool(finite), seconds=round(time.perf_counter() - start, 3), losses=losses)


def inspect_distiller(distiller: Distiller, step: bool = True, batch: int = 2) -> Dict[str, Any]:
    """A JSON-ready report: models, taps with shapes and projector sizes, parameter counts, one step."""
    teacher = distiller.teacher
    report: Dict[str, Any] = dict(
        method=distiller.options.method,
        img_size=list(distiller.img_size),
        student=distiller.taps.label,
        teacher=teacher.label if teacher is not None else None,
        taps=tap_rows(distiller),
        params=param_counts(distiller),
    )
    if teacher is not None:
        report['teacher_last_stage'] = dict(input_shape=list(teacher.stage_input_shape),
                                            output_shape=list(teacher.final_shape))
    if step:
        report['train_step'] = _train_step(distiller, batch)
    return report


def _shape(s) -> str:
    return 'x'.join(str(v) for v in s)


def format_report(report: Dict[str, Any]) -> str:
    """The report as a short human-readable table."""
    lines = [f"method {report['method']} at {_shape(report['img_size'])}",
             f"teacher {report['teacher']}", f"student {report['student']}"]
    if 'teacher_last_stage' in report:
        st = report['teacher_last_stage']
        lines.append(f"teacher last stage {_shape(st['input_shape'])} -> {_shape(st['output_shape'])}")
    if report['taps']:
        lines.append(f"{'tap':<4} {'path':<7} {'student':>12} -> {'target':<12} {'projector':<9} "
                     f"{'views':<8} {'queries':<8} {'params':>12}")
        for t in report['taps']:
            lines.append(f"{t['name']:<4} {t['path']:<7} {_shape(t['student_shape']):>12} -> "
                         f"{_shape(t['target_shape']):<12} {t['projector']:<9} {'+'.join(t['views']):<8} "
                         f"{t['queries']:<8} {t['params']:>12,}")
    p = report['params']
    lines.append(f"params: student {p['student']:,}  teacher {p['teacher']:,}  distill {p['distill']:,}")
    if 'train_step' in report:
        s = report['train_step']
        terms = '  '.join(f'{k} {v:.4g}' for k, v in s['losses'].items())
        lines.append(f"train step: {'ok' if s['ok'] else 'NOT FINITE'} in {s['seconds']} s  ({terms})")
    return '\n'.join(lines)
