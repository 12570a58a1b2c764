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


def _add_train(sub) -> None:
    p = sub.add_parser('train', help='train a student from a YAML config (torchrun for several processes)')
    p.add_argument('config', help='YAML run config')
    p.add_argument('-o', '--override', action='append', metavar='KEY=VALUE', help='dotted override, repeatable')
    p.add_argument('--resume', metavar='auto|PATH', help="continue the newest run in the output folder ('auto') "
                                                        'or from a checkpoint')
    p.add_argument('--force', action='store_true', help='start afresh in an output folder that holds another run')
    p.add_argument('--dry-run', action='store_true', help='build at full size with random weights, run one step '
                                                          'on a synthetic batch, write nothing')
    p.add_argument('--dry-run-batch', type=int, default=2, help='batch of the dry-run step (default 2)')
    p.add_argument('--deterministic', action='store_true', help='deterministic algorithms (same as '
                                                                '-o train.deterministic=true)')
    p.add_argument('--max-nan-skips', type=int, metavar='N', help='skip up to N batches whose loss is not finite')
    p.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda'))
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .distributed import cleanup, init_distributed
    from .allocator import keep_freed_memory
    from .engine import RunInterrupted, Trainer, dry_run
    overrides = list(args.override or [])
    if args.deterministic:
        overrides.append('train.deterministic=true')
    if args.max_nan_skips is not None:
        overrides.append(f'train.max_nan_skips={args.max_nan_skips}')
    cfg = load_config(args.config, overrides)
    env = init_distributed(args.device, cfg.train.dist_timeout_s)
    if env.device.type == 'cpu':
        keep_freed_memory()
    try:
        if args.dry_run:
            report = dry_run(cfg, env.device, args.dry_run_batch)
            if env.is_main:
                print(json.dumps(report, indent=2))
            return 0 if report['finite'] else 1
        try:
            Trainer(cfg, env, resume=args.resume, force=args.force).fit()
        except RunInterrupted as e:
            print(f'scalekd train: {e}', file=sys.stderr)
            return 130
        return 0
    finally:
        cleanup(env)


def _add_eval(sub) -> None:
    p = sub.add_parser('eval', help='top-1 / top-5 of a checkpoint or exported student on an image folder')
    p.add_argument('checkpoint', help='training checkpoint (.pth) or export folder')
    p.add_argument('--data', required=True, help='folder with one sub-folder per class')
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--workers', type=int, default=4)
    p.add_argument('--device', default='cpu')
    p.add_argument('--json', action='store_true')
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_path
    metrics = evaluate_path(args.checkpoint, args.data, args.batch, args.workers, args.device)
    print(json.dumps(metrics) if args.json else
          f"top-1 {metrics['top1']:.2f}  top-5 {metrics['top5']:.2f}  ({metrics['count']} images)")
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser('export', help='write the student (EMA if present) as model.safetensors + config.json')
    p.add_argument('checkpoint', help='training checkpoint (.pth)')
    p.add_argument('--out', required=True, help='output folder')
    p.add_argument('--no-ema', action='store_true', help='export the raw weights even when an EMA exists')
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from .export import export_checkpoint
    path, ema = export_checkpoint(args.checkpoint, args.out, use_ema=not args.no_ema)
    print(f"exported {'EMA ' if ema else ''}student to {path}")
    return 0


def _add_bench(sub) -> None:
    p = sub.add_parser('bench', help='training-step time and peak memory of each ScaleKD component '
                                     '(the paper\'s Table 15b), side by side')
    p.add_argument('--teacher', default='swin_small_patch4_window7_224')
    p.add_argument('--student', default='resnet50')
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--steps', type=int, default=3, help='timed steps per variant, after one warm-up step')
    p.add_argument('--precision', default='fp32', choices=('fp32', 'bf16', 'fp16', 'auto'))
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--device', default='cuda' if _cuda() else 'cpu')
    p.add_argument('--variants', help='comma-separated subset of: student, kd, fd, cap, cap_dfm, cap_tpp, '
                                      'cap_dfm_tpp, scalekd')
    p.add_argument('--option', action='append', metavar='KEY=VALUE', help='distillation option for every variant')
    p.add_argument('--json', action='store_true', help='print one JSON object')
    p.set_defaults(func=_run_bench)


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def _run_bench(args: argparse.Namespace) -> int:
    from .bench import format_table, run_bench
    report = run_bench(args.teacher, args.student, args.img_size, args.batch, args.steps, args.precision,
                       args.channels_last, args.device, args.variants.split(',') if args.variants else None,
                       _key_values(args.option, '--option'),
                       progress=None if args.json else lambda m: print(m, file=sys.stderr))
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='scalekd', description='ScaleKD: distil a vision transformer teacher '
                                                                 'into a CNN, MLP or ViT student')
    sub = parser.add_subparsers(dest='command', required=True)
    _add_inspect(sub)
    _add_train(sub)
    _add_eval(sub)
    _add_export(sub)
    _add_bench(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``scalekd`` command; errors print one line and exit with 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, FloatingPointError, FileNotFoundError) as e:
        print(f'scalekd {args.command}: error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
