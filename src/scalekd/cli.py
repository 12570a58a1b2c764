"""The ``scalekd`` command line."""
import argparse
import json
import sys
from typing import Any, Dict, List, Optional

import yaml

from .builder import build_distiller
from .inspection import format_report, inspect_distiller
from .options import METHODS
from .paper_pairs import PAPER_PAIRS

__all__ = ['main']


def _key_values(items: Optional[List[str]], flag: str) -> Dict[str, Any]:
    """``['a=1', 'b=[1,2]']`` -> ``{'a': 1, 'b': [1, 2]}`` (values parsed as YAML)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition('=')
        if not sep or not key:
            raise ValueError(f'{flag} expects KEY=VALUE, got {item!r}')
        out[key.strip()] = yaml.safe_load(value)
    return out


def _add_inspect(sub) -> None:
    p = sub.add_parser('inspect', help='build a teacher-student pair with random weights and report its taps, '
                                       'projector sizes and whether one training step runs')
    p.add_argument('--pair', choices=sorted(PAPER_PAIRS), help="one of the paper's Table 3 pairs")
    p.add_argument('--teacher', help='timm teacher name')
    p.add_argument('--student', help='timm student name')
    p.add_argument('--method', choices=METHODS, help='distillation method (default scalekd)')
    p.add_argument('--img-size', type=int, help='input resolution (default: the pair / teacher default)')
    p.add_argument('--num-classes', type=int, help='classes of both models (default: timm default)')
    p.add_argument('--teacher-kwarg', action='append', metavar='KEY=VALUE', help='timm.create_model kwarg, repeatable')
    p.add_argument('--student-kwarg', action='append', metavar='KEY=VALUE', help='timm.create_model kwarg, repeatable')
    p.add_argument('--option', action='append', metavar='KEY=VALUE',
                   help='distillation option (projector, tpp, beta, s3_heads, ...), repeatable')
    p.add_argument('--batch', type=int, default=2, help='batch of the training step (default 2)')
    p.add_argument('--no-step', action='store_true', help='skip the training step')
    p.add_argument('--json', action='store_true', help='print one JSON object')
    p.add_argument('--list-pairs', action='store_true', help='list the Table 3 pairs and exit')
    p.set_defaults(func=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> int:
    if args.list_pairs:
        for name, pair in PAPER_PAIRS.items():
            print(f'{name:<22} {pair.teacher} -> {pair.student} '
                  f'(paper: {pair.baseline_top1:.2f} -> {pair.scalekd_top1:.2f})')
        return 0
    student_kwargs = _key_values(args.student_kwarg, '--student-kwarg')
    options = _key_values(args.option, '--option')
    img_size = args.img_size
    if args.pair:
        if args.teacher or args.student:
            raise ValueError('give either --pair or --teacher/--student, not both')
        pair = PAPER_PAIRS[args.pair]
        teacher, student = pair.teacher, pair.student
        student_kwargs = {**pair.student_kwargs, **student_kwargs}
        options = {**pair.options, **options}
        img_size = img_size or pair.img_size
    elif args.teacher and args.student:
        teacher, student = args.teacher, args.student
    else:
        raise ValueError('give --pair NAME, or both --teacher and --student')
    if args.method:
        options['method'] = args.method
    distiller = build_distiller(
        teacher, student, img_size=img_size, num_classes=args.num_classes,
        teacher_kwargs=_key_values(args.teacher_kwarg, '--teacher-kwarg'), student_kwargs=student_kwargs,
        **options)
    report = inspect_distiller(distiller, step=not args.no_step, batch=args.batch)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if report.get('train_step', {}).get('ok', True) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='scalekd', description='ScaleKD: distil a vision transformer teacher '
                                                                 'into a CNN, MLP or ViT student')
    sub = parser.add_subparsers(dest='command', required=True)
    _add_inspect(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``scalekd`` command; errors print one line and exit with 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError) as e:
        print(f'scalekd {args.command}: error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
