"""``scalekd inspect``: what a teacher-student pair distils, at what cost, and whether it trains."""
import math
import time
from typing import Any, Dict

import torch

from ..engine.loop.synthetic_step import synthetic_batch, training_step
from ..task.distiller import Distiller
from ..task.report import param_counts, tap_rows, teacher_rows

__all__ = ['inspect_distiller', 'format_report']


def _train_step(distiller: Distiller, batch: int) -> Dict[str, Any]:
    """One synthetic SGD step; the loss terms, whether all are finite, and the seconds taken."""
    params = [p for p in distiller.trainable_module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-3)
    images, targets = synthetic_batch(distiller, batch)
    start = time.perf_counter()
    losses = training_step(distiller, optimizer, images, targets)
    return dict(ok=all(math.isfinite(v) for v in losses.values()), seconds=round(time.perf_counter() - start, 3),
                losses=losses)


def inspect_distiller(distiller: Distiller, step: bool = True, batch: int = 2) -> Dict[str, Any]:
    """A JSON-ready report: models, each teacher, taps with shapes and projector sizes, parameter counts,
    one step."""
    teacher = distiller.teacher
    report: Dict[str, Any] = dict(
        method=distiller.options.method,
        img_size=list(distiller.img_size),
        student=distiller.taps.label,
        teacher=', '.join(t.label for t in distiller.teachers.values()) or None,
        teachers=teacher_rows(distiller),
        taps=tap_rows(distiller),
        params=param_counts(distiller),
    )
    if len(distiller.teachers) == 1 and teacher.last_stage is not None:  # a feature teacher (not logit KD's)
        report['teacher_last_stage'] = dict(input_shape=list(teacher.stage_input_shape),
                                            output_shape=list(teacher.final_shape))
    if step:
        report['train_step'] = _train_step(distiller, batch)
    return report


def _shape(s) -> str:
    return 'x'.join(str(v) for v in s)


def _teacher_line(t: Dict[str, Any]) -> str:
    stage = f", last stage {_shape(t['last_stage'][0])} -> {_shape(t['last_stage'][1])}" if 'last_stage' in t else ''
    return (f"teacher {t['name']}: {t['model']} at {_shape(t['img_size'])}, weight {t['weight']:g}, "
            f"kd {'on' if t['kd'] else 'off'}, tpp {'on' if t['tpp'] else 'off'}, {t['params']:,} params{stage}")


def format_report(report: Dict[str, Any]) -> str:
    """The report as a short human-readable table."""
    several = len(report['teachers']) > 1
    lines = [f"method {report['method']} at {_shape(report['img_size'])}"]
    lines += [_teacher_line(t) for t in report['teachers']] if several else [f"teacher {report['teacher']}"]
    lines.append(f"student {report['student']}")
    if 'teacher_last_stage' in report:
        st = report['teacher_last_stage']
        lines.append(f"teacher last stage {_shape(st['input_shape'])} -> {_shape(st['output_shape'])}")
    if report['taps']:
        who = f"{'teacher':<12} " if several else ''
        lines.append(f"{who}{'tap':<4} {'path':<7} {'student':>12} -> {'target':<12} {'projector':<9} "
                     f"{'views':<8} {'queries':<8} {'params':>12}")
        for t in report['taps']:
            who = f"{t['teacher']:<12} " if several else ''
            lines.append(f"{who}{t['name']:<4} {t['path']:<7} {_shape(t['student_shape']):>12} -> "
                         f"{_shape(t['target_shape']):<12} {t['projector']:<9} {'+'.join(t['views']):<8} "
                         f"{t['queries']:<8} {t['params']:>12,}")
    p = report['params']
    lines.append(f"params: student {p['student']:,}  teacher{'s' if several else ''} {p['teacher']:,}  "
                 f"distill {p['distill']:,}")
    if 'train_step' in report:
        s = report['train_step']
        terms = '  '.join(f'{k} {v:.4g}' for k, v in s['losses'].items())
        lines.append(f"train step: {'ok' if s['ok'] else 'NOT FINITE'} in {s['seconds']} s  ({terms})")
    return '\n'.join(lines)
