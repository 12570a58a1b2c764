"""The ``scalekd`` command line."""
import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Dict, List, NoReturn, Optional, Sequence

import torch

from .engine.inputs.config import parse_key_value
from .engine.runtime.devices import DEVICE_HELP, resolve_device
from .engine.runtime.distributed import PeerFailure, RankError, lost_peer
from .engine.errors import TRACEBACK_ENV, UserError, error_line, traceback_wanted
from .method.options import ABLATIONS, METHODS, DistillOptions
from .task.builder import build_distiller, resolve_img_size
from .tools.inspection import format_report, inspect_distiller
from .tools.paper_pairs import PAPER_PAIRS

__all__ = ['main']

TRACEBACK_HELP = (f'print the traceback of every error, a user error (one line, exit code 2) too; or set '
                  f'{TRACEBACK_ENV}=1')
OOM_HINT = ('hint: out of memory: raise train.accum_steps or lower train.batch_size (each process holds '
            'train.batch_size / (processes x train.accum_steps) images; other commands: a smaller --batch), '
            'or set distill.activation_checkpointing=true or train.precision=bf16')


def _key_values(items: Optional[List[str]], flag: str) -> Dict[str, Any]:
    """``['a=1', 'b=[1,2]']`` -> ``{'a': 1, 'b': [1, 2]}`` (values parsed as YAML)."""
    return dict(parse_key_value(item, flag) for item in items or [])


def _add_device(p, note: str = '') -> None:
    p.add_argument('--device', default='auto', help=DEVICE_HELP + note)


def _add_inspect(sub) -> None:
    p = sub.add_parser('inspect', help='build a teacher-student pair with random weights and report its taps, '
                                       'projector sizes and whether one training step runs')
    p.add_argument('--pair', choices=sorted(PAPER_PAIRS), help="one of the paper's Table 3 pairs")
    p.add_argument('--config', help='a run config (YAML): its teachers, student, method and size, built with random '
                                    'weights (several teachers too)')
    p.add_argument('--teacher', help='timm teacher name')
    p.add_argument('--student', help='timm student name')
    p.add_argument('--method', choices=METHODS, help='distillation method (default scalekd)')
    p.add_argument('--img-size', type=int, help='input resolution (default: the pair / teacher default)')
    p.add_argument('--num-classes', type=int, help='classes of both models (default: timm default)')
    p.add_argument('--in-chans', type=int, default=3, help='input channels of both models (default 3)')
    p.add_argument('--teacher-kwarg', action='append', metavar='KEY=VALUE', help='timm.create_model kwarg, repeatable')
    p.add_argument('--student-kwarg', action='append', metavar='KEY=VALUE', help='timm.create_model kwarg, repeatable')
    p.add_argument('--option', action='append', metavar='KEY=VALUE',
                   help='distillation option (projector, tpp, beta, s3_heads, ...), repeatable')
    p.add_argument('--batch', type=int, default=2, help='batch of the training step (default 2)')
    p.add_argument('--no-step', action='store_true', help='skip the training step')
    _add_device(p)
    p.add_argument('--json', action='store_true', help='print one JSON object')
    p.add_argument('--list-pairs', action='store_true', help='list the Table 3 pairs and exit')
    p.set_defaults(func=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> int:
    if args.list_pairs:
        for name, pair in PAPER_PAIRS.items():
            print(f'{name:<22} {pair.teacher} -> {pair.student} '
                  f'(paper: {pair.baseline_top1:.2f} -> {pair.scalekd_top1:.2f})')
        return 0
    device = resolve_device(args.device)
    student_kwargs = _key_values(args.student_kwarg, '--student-kwarg')
    options = _key_values(args.option, '--option')
    img_size = args.img_size
    if args.config:
        if args.pair or args.teacher or args.student:
            raise UserError('give either --config or --pair or --teacher/--student, not several')
        return _inspect_config(args, device)
    if args.pair:
        if args.teacher or args.student:
            raise UserError('give either --pair or --teacher/--student, not both')
        pair = PAPER_PAIRS[args.pair]
        teacher, student = pair.teacher, pair.student
        student_kwargs = {**pair.student_kwargs, **student_kwargs}
        options = {**pair.options, **options}
        img_size = img_size or pair.img_size
    elif args.teacher and args.student:
        teacher, student = args.teacher, args.student
    else:
        raise UserError('give --pair NAME, or both --teacher and --student')
    if args.method:
        options['method'] = args.method
    if img_size is None:
        img_size = resolve_img_size(None, teacher, student)[0]
        if img_size != 224:  # an unexpected size (DINOv2's 518 builds slowly): said before the build
            DistillOptions.from_kwargs(**options).resolve()  # a bad option is refused first, in one line
            print(f'scalekd inspect: building at {img_size}x{img_size}, the pretrained input size of the models '
                  f'(--img-size N for another)', file=sys.stderr)
    distiller = build_distiller(
        teacher, student, img_size=img_size, num_classes=args.num_classes, in_chans=args.in_chans,
        teacher_kwargs=_key_values(args.teacher_kwarg, '--teacher-kwarg'), student_kwargs=student_kwargs,
        device=device, **options)
    return _report_inspection(distiller, args)


def _inspect_config(args: argparse.Namespace, device) -> int:
    """``inspect --config``: the config's models at full size with random weights (nothing loaded)."""
    from .engine.inputs.config import load_config
    from .engine.inputs.task_build import build_task
    given = [flag for flag, value in (('--method', args.method), ('--img-size', args.img_size),
                                      ('--teacher-kwarg', args.teacher_kwarg), ('--student-kwarg', args.student_kwarg),
                                      ('--option', args.option), ('--num-classes', args.num_classes)) if value]
    if given:
        raise UserError(f'{", ".join(given)} do(es) not apply with --config: the config says it (override it there)')
    return _report_inspection(build_task(load_config(args.config), device, random_weights=True), args)


def _report_inspection(distiller, args: argparse.Namespace) -> int:
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
    p.add_argument('--no-progress', action='store_true', help='no progress bars or lines (same as -o log.progress=false)')
    _add_device(p, '; under torchrun, cuda means cuda:LOCAL_RANK')
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from .engine.runtime.allocator import keep_freed_memory
    from .engine.inputs.config import load_config
    from .engine.runtime.distributed import barrier, cleanup, init_distributed
    from .engine.loop.dry_run import dry_run
    from .engine.errors import RunInterrupted
    from .engine.loop.trainer import Trainer
    overrides = list(args.override or [])
    if args.deterministic:
        overrides.append('train.deterministic=true')
    if args.max_nan_skips is not None:
        overrides.append(f'train.max_nan_skips={args.max_nan_skips}')
    if args.no_progress:
        overrides.append('log.progress=false')
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
            if env.is_main:  # every rank stopped at the same step: one line
                print(f'scalekd train: {e}', file=sys.stderr)
            return 130
        barrier(env)  # every rank: none tears its process group down while the main process still writes
        return 0
    finally:
        cleanup(env)


def _add_eval(sub) -> None:
    p = sub.add_parser('eval', help='top-1 / top-5 of a checkpoint or exported student on an image folder')
    p.add_argument('checkpoint', help='training checkpoint (.pth) or export folder')
    p.add_argument('--data', required=True, help='folder with one sub-folder per class, or the Fashion-MNIST IDX files')
    p.add_argument('--batch', type=int, default=64, help='images per batch (default 64)')
    p.add_argument('--workers', type=int, default=min(4, os.cpu_count() or 1), help='loader workers (default: up to 4, at most one per CPU)')
    p.add_argument('--skip-unreadable', action='store_true',
                   help='decode every image first and leave out (and count) unreadable ones; default: stop at one')
    _add_device(p)
    p.add_argument('--json', action='store_true', help='print one JSON object')
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from .tools.evaluation import evaluate_path
    device = resolve_device(args.device)
    metrics = evaluate_path(args.checkpoint, args.data, args.batch, args.workers, device, args.skip_unreadable)
    skipped = f", {metrics['skipped']} unreadable skipped" if metrics['skipped'] else ''
    print(json.dumps(metrics) if args.json else
          f"top-1 {metrics['top1']:.2f}  top-5 {metrics['top5']:.2f}  ({metrics['count']} images{skipped})")
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser('export', help='write the student (EMA if present) as model.safetensors + config.json')
    p.add_argument('checkpoint', help='training checkpoint (.pth)')
    p.add_argument('--out', required=True, help='output folder')
    p.add_argument('--no-ema', action='store_true', help='export the raw weights even when an EMA exists')
    p.add_argument('--dtype', default='float32', choices=('float32', 'float16', 'bfloat16'),
                   help='dtype of the stored weights (default float32; they load into float32 models)')
    p.add_argument('--format', default='timm', choices=('timm', 'torchvision', 'mmdet', 'mmseg'),
                   help='key names of the written weights (default timm: model.safetensors + config.json; '
                        'torchvision: model.pth for torchvision\'s ResNet / ViT; mmdet / mmseg: model.pth for '
                        'their ResNet / Swin (mmseg also ViT) backbones, see docs/downstream.md)')
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from .tools.export import export_checkpoint
    path, ema = export_checkpoint(args.checkpoint, args.out, use_ema=not args.no_ema, dtype=args.dtype,
                                  fmt=args.format)
    print(f"exported {'EMA ' if ema else ''}student to {path}")
    return 0


def _add_import_mmcls(sub) -> None:
    p = sub.add_parser('import-mmcls', help="convert a ScaleKD release student (mmcls checkpoint, keys under "
                                            "'student.') into a timm export folder")
    p.add_argument('checkpoint', help='mmcls / mmengine checkpoint (.pth) of a distiller or a plain classifier')
    p.add_argument('--model', required=True, help='timm name of the student, e.g. resnet50d, deit_small_patch16_224, '
                                                  'swin_tiny_patch4_window7_224, convnext_tiny, mixer_b16_224')
    p.add_argument('--out', required=True, help='output folder (model.safetensors + config.json)')
    p.add_argument('--img-size', type=int, default=224, help='input resolution of the student (default 224)')
    p.add_argument('--model-kwarg', action='append', metavar='KEY=VALUE', help='timm.create_model kwarg, repeatable')
    p.set_defaults(func=_run_import_mmcls)


def _run_import_mmcls(args: argparse.Namespace) -> int:
    import timm

    from .tools.export import export_student
    from .tools.transfer import import_mmcls
    kwargs = _key_values(args.model_kwarg, '--model-kwarg')
    model, report = import_mmcls(args.checkpoint, args.model, args.img_size, kwargs)
    size = (kwargs.get('in_chans', 3), args.img_size, args.img_size)
    path = export_student(model, args.out, timm.data.resolve_data_config(dict(input_size=size), model=model))
    left = ', '.join(f'{k} ({n})' for k, n in sorted(report['left_out'].items())) or 'nothing'
    print(f"imported {report['tensors']} student tensors into {args.model} ({report['num_classes']} classes); "
          f"left out: {left}; wrote {path}")
    return 0


BENCH_PAIR = ('swin_small_patch4_window7_224', 'resnet50')  # bench's teacher and student when none is named


def _add_bench(sub) -> None:
    p = sub.add_parser('bench', help='training-step time and peak memory of each ScaleKD component '
                                     '(the paper\'s Table 15b), side by side')
    p.add_argument('--teacher', help=f'timm teacher name (default {BENCH_PAIR[0]})')
    p.add_argument('--student', help=f'timm student name (default {BENCH_PAIR[1]})')
    p.add_argument('--config', help='a run config (YAML) instead of --teacher / --student: its method beside the '
                                    'student alone, its teachers (several too) and student with random weights, its '
                                    'image size, distill and train settings unless given here; per teacher, the '
                                    'time and peak memory of its forward and projectors')
    p.add_argument('--img-size', type=int, help='input resolution (default 224; with --config: data.img_size)')
    p.add_argument('--batch', type=int, help="images per training step (default 8; with --loader: the config's "
                                             'batch per process on one process)')
    p.add_argument('--steps', type=int, default=3, help='timed steps per variant, after one warm-up step')
    p.add_argument('--precision', choices=('fp32', 'bf16', 'fp16', 'auto'),
                   help='the step\'s precision, as train.precision (default fp32; with --config: train.precision)')
    p.add_argument('--teacher-precision', choices=('fp32', 'bf16', 'fp16', 'auto'),
                   help="the teacher forward's own precision (train.teacher_precision; default: --precision)")
    p.add_argument('--channels-last', action='store_true', help='channels-last memory format, as train.channels_last')
    p.add_argument('--compile', action='store_true', help='compile as train.compile does (teacher and each piece)')
    p.add_argument('--compile-backend', default='inductor', help='torch.compile backend of --compile (default '
                                                                 'inductor; eager only traces: a check of the graphs)')
    _add_device(p)
    p.add_argument('--variants', help=f'comma-separated subset of: {", ".join(ABLATIONS)} (with --config: student '
                                      "and the config's method)")
    p.add_argument('--option', action='append', metavar='KEY=VALUE', help='distillation option for every variant '
                                                                          '(with --config: distill.KEY)')
    p.add_argument('--in-process', action='store_true', help='measure the variants one after the other in this '
                   'process, not each in its own (quicker to start; the same peak memory on CUDA, but on CPU a '
                   "variant's peak then includes what the earlier ones left)")
    p.add_argument('--loader', metavar='CONFIG', help='time the training data loader of this run config alone, in '
                                                      'images/s for each number of --workers, instead of the step')
    p.add_argument('-o', '--override', action='append', metavar='KEY=VALUE',
                   help='with --loader or --config: dotted override of the config, repeatable (e.g. '
                        'data.root=/data/imagenet)')
    p.add_argument('--workers', help='with --loader: comma-separated numbers of loader workers (default 0, then '
                                     'powers of two up to the CPU count)')
    p.add_argument('--batches', type=int, default=20, help='with --loader: batches timed per number of workers, '
                                                           'after the first (default 20)')
    p.add_argument('--json', action='store_true', help='print one JSON object')
    p.set_defaults(func=_run_bench)


def _add_demo(sub) -> None:
    p = sub.add_parser('demo', help='offline quick start: the shipped ViT teacher trains tiny CNN, MLP-Mixer and ViT '
                                    'students on Fashion-MNIST, alone vs with ScaleKD')
    p.add_argument('--students', help='comma-separated subset of cnn, mlp, vit (default all; --quick cnn,mlp)')
    p.add_argument('--baselines', action='store_true', help='also train each student with logit KD only')
    p.add_argument('--quick', action='store_true', help='CNN and MLP students, fewer images and epochs (under 3 minutes)')
    p.add_argument('--seed', type=int, default=0, help='seed of the subset, the weights and the augmentations (default 0)')
    p.add_argument('--subset', type=int, help='training images per student (default 800; --quick 500)')
    p.add_argument('--epochs', type=int, help='epochs per student (default 15; --quick 8)')
    p.add_argument('--batch-size', type=int, help='batch size (default 32)')
    p.add_argument('--test-sample', type=int, help='test images behind the per-epoch curve (default 2000; --quick 500)')
    p.add_argument('--data', help='folder with the Fashion-MNIST IDX files (default: $SCALEKD_DATA, '
                                  '/usr/share/datasets/fashion-mnist, else download)')
    p.add_argument('--teacher-weights', help='teacher weights to use instead of the shipped ones')
    p.add_argument('--option', action='append', metavar='KEY=VALUE', help='distillation option of the ScaleKD runs')
    p.add_argument('--output', default='runs/demo', help='output folder (default runs/demo)')
    p.add_argument('--no-progress', action='store_true', help='no progress bars')
    _add_device(p)
    p.set_defaults(func=_run_demo)


def _demo_settings(args: argparse.Namespace, overrides: Sequence[str], quick: bool = False, **fields: Any):
    """The demo settings of the arguments ``demo`` and ``ablate`` share (output, data, progress, device),
    ``fields``, the ``quick`` budget, then each argument of ``overrides`` that was given."""
    from .tools.demo import DemoSettings
    settings = DemoSettings(output=args.output, data=args.data, progress=not args.no_progress,
                            device=resolve_device(args.device), **fields)
    if quick:
        settings.quick()
    for name in overrides:
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    return settings


def _run_demo(args: argparse.Namespace) -> int:
    from .engine.runtime.allocator import keep_freed_memory
    from .engine.errors import RunInterrupted, stop_signal
    from .tools.demo import format_table, run_demo
    settings = _demo_settings(args, ('subset', 'epochs', 'batch_size', 'test_sample'), args.quick, seed=args.seed,
                              baselines=args.baselines, distill=_key_values(args.option, '--option'))
    if args.students:
        settings.students = [s for s in args.students.split(',') if s]
    if args.teacher_weights:
        settings.teacher_weights = args.teacher_weights
    keep_freed_memory()
    try:
        results = run_demo(settings)
    except (RunInterrupted, KeyboardInterrupt) as e:
        signum = stop_signal(e)
        print(f'scalekd demo: stopped by {signum.name}; finished runs are kept: the same command trains the rest',
              file=sys.stderr)
        return 128 + signum
    print(format_table(results))
    print(f'results: {Path(args.output) / "results.json"}, plot: {Path(args.output) / "accuracy.png"}')
    return 0


def _add_ablate(sub) -> None:
    from .tools.ablation import LARGE_SUBSET, STUDIES
    p = sub.add_parser('ablate', help="the paper's ablations on the demo benchmark (Table 9, Table 1, Table 17, "
                                      'Fig. 4, the CAP kernel, Table 2\'s teacher scale, more data), each row on '
                                      'several seeds with paired differences')
    p.add_argument('study', choices=sorted(STUDIES), help='which study')
    p.add_argument('--seeds', default='0,1,2', help='comma-separated seeds (default 0,1,2)')
    p.add_argument('--students', help="comma-separated subset of the study's students (cnn, mlp, vit)")
    p.add_argument('--subset', type=int, help='training images per run (default: the demo\'s 800)')
    p.add_argument('--epochs', type=int, help='epochs per run (default: the demo\'s 15)')
    p.add_argument('--large-subset', type=int, help=f'data_scale: training images of the larger subset (default '
                                                    f'{LARGE_SUBSET})')
    p.add_argument('--large-epochs', type=int, help='data_scale: epochs on the larger subset (default: --epochs)')
    p.add_argument('--data', help='folder with the Fashion-MNIST IDX files (default as for demo)')
    p.add_argument('--output', default='runs/ablate', help='output folder (default runs/ablate; finished runs are reused)')
    p.add_argument('--jobs', type=int, help='runs trained at once, each in its own process with cores / jobs threads '
                                            '(default: one per core, at most 8, on a CPU; 1 on a GPU)')
    p.add_argument('--no-progress', action='store_true', help='no progress bars')
    _add_device(p)
    p.set_defaults(func=_run_ablate)


def _run_ablate(args: argparse.Namespace) -> int:
    from .engine.runtime.allocator import keep_freed_memory
    from .tools.ablation import STUDIES, format_study, run_study
    from .tools.run_pool import StudyStopped
    settings = _demo_settings(args, ('subset', 'epochs'))
    try:
        seeds = [int(s) for s in args.seeds.split(',') if s]
    except ValueError:
        raise UserError(f'--seeds takes comma-separated integers, got {args.seeds!r}') from None
    students = [s for s in args.students.split(',') if s] if args.students else None
    if args.jobs is not None and args.jobs < 1:
        raise UserError(f'--jobs takes a positive number of runs, got {args.jobs}')
    jobs = args.jobs or (min(torch.get_num_threads(), 8) if settings.device.type == 'cpu' else 1)
    keep_freed_memory()
    study = _ablate_study(args, settings.subset, settings.epochs)
    try:
        summary = run_study(study, settings, seeds, students, jobs=jobs)
    except StudyStopped as e:
        print(f'scalekd ablate: {e}', file=sys.stderr)
        return e.exit_code
    print(format_study(study, summary))
    return 0


def _ablate_study(args: argparse.Namespace, subset: int, epochs: int):
    """The study ``ablate`` runs: data_scale at its --large-subset and --large-epochs."""
    from .tools.ablation import LARGE_SUBSET, STUDIES, data_scale_study
    if args.study != 'data_scale':
        if args.large_subset is not None or args.large_epochs is not None:
            raise UserError(f'--large-subset and --large-epochs set the data_scale study, not {args.study}')
        return STUDIES[args.study]
    large = LARGE_SUBSET if args.large_subset is None else args.large_subset
    if large < 1 or large == subset:
        raise UserError(f'--large-subset takes a number of training images other than the study\'s {subset}, got {large}')
    if args.large_epochs is not None and args.large_epochs < 1:
        raise UserError(f'--large-epochs takes a positive number of epochs, got {args.large_epochs}')
    return data_scale_study(large, None if args.large_epochs == epochs else args.large_epochs)


def _add_config(sub) -> None:
    p = sub.add_parser('config', help='run configs: show one resolved')
    actions = p.add_subparsers(dest='action', required=True, metavar='ACTION')
    show = actions.add_parser('show', help='print a config as a run would use it, as YAML: every default (the '
                                           'defaults of the distill method), base: file and -o override resolved')
    show.add_argument('config', help='YAML run config')
    show.add_argument('-o', '--override', action='append', metavar='KEY=VALUE', help='dotted override, repeatable')
    show.set_defaults(func=_run_config_show)


def _run_config_show(args: argparse.Namespace) -> int:
    import dataclasses

    import yaml

    from .engine.inputs.config import config_to_dict, load_config
    cfg = load_config(args.config, args.override)
    resolved = dataclasses.replace(cfg, distill=cfg.distill_options())  # the method's defaults filled in
    print(yaml.safe_dump(config_to_dict(resolved), sort_keys=False), end='')
    return 0


def _add_matrix(sub) -> None:
    p = sub.add_parser('matrix', help="one model of every timm model module as a ScaleKD student (ViT and Swin "
                                      'teachers) and as a teacher (ResNet student): random weights, one training '
                                      'step each; prints a markdown table of what works and why the rest is refused')
    p.add_argument('--role', choices=('student', 'teacher', 'both'), default='both', help='which role (default both)')
    p.add_argument('--modules', help='comma-separated timm model modules (default: all 98)')
    p.add_argument('--output', help='also write the table to this markdown file')
    p.set_defaults(func=_run_matrix)


def _run_matrix(args: argparse.Namespace) -> int:
    import warnings
    from .engine.loop.run_logger import write_text_atomic
    from .tools.matrix import format_matrix, run_matrix
    roles = ('student', 'teacher') if args.role == 'both' else (args.role,)
    modules = [m for m in args.modules.split(',') if m] if args.modules else None

    def progress(row) -> None:
        state = 'works' if row.works else '; '.join(f'{p}: {r}' for p, r in row.results if r != 'works')
        print(f'{row.role} {row.module} ({row.model}, {row.img} px, {row.seconds:.1f} s): {state}', file=sys.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # models' own deprecation / size warnings; refusals are in the table
        table = format_matrix(run_matrix(roles, modules, progress))
    if args.output:
        write_text_atomic(Path(args.output), table)
    print(table)
    return 0


def _add_model_args(p) -> None:
    p.add_argument('--model', help='timm name (hub weights unless --checkpoint is a plain weight file)')
    p.add_argument('--checkpoint', help='scalekd checkpoint (.pth), export folder, or a weight file for --model')
    p.add_argument('--model-kwarg', action='append', metavar='KEY=VALUE', help='timm.create_model kwarg, repeatable')
    _add_device(p)


def _load_model(args: argparse.Namespace):
    """The model of ``--model`` / ``--checkpoint`` on ``--device``, and its data config."""
    from .tools.model_files import load_model
    device = resolve_device(args.device)
    loaded = load_model(args.checkpoint, args.model, **_key_values(args.model_kwarg, '--model-kwarg'))
    return loaded.model.to(device), loaded.data_config


def _add_spectrum(sub) -> None:
    p = sub.add_parser('spectrum', help="frequency spectrum of a model's feature maps (the paper's Fig. 2 / 5)")
    _add_model_args(p)
    p.add_argument('--data', required=True, help='Fashion-MNIST IDX folder (test split) or one sub-folder per class')
    p.add_argument('--samples', type=int, default=500, help='images (default 500)')
    p.add_argument('--stage', type=int, default=-1, help='forward_intermediates index of the maps (default -1: last)')
    p.add_argument('--out', required=True, help='PNG to write; the numbers go to the same name with .json')
    p.set_defaults(func=_run_spectrum)


def _run_spectrum(args: argparse.Namespace) -> int:
    from .tools.analysis import feature_maps, feature_spectrum, image_dataset, plot_spectrum
    model, data_config = _load_model(args)
    dataset, _ = image_dataset(args.data, data_config, limit=args.samples)
    maps, _ = feature_maps(model, dataset, args.stage)
    spectrum = dict(model=args.model or str(args.checkpoint), stage=args.stage, samples=len(dataset),
                    **feature_spectrum(maps))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_spectrum(spectrum, out, title=f"{spectrum['model']}: stage {args.stage}, {len(dataset)} images")
    out.with_suffix('.json').write_text(json.dumps(spectrum, indent=2))
    print(f"maps {'x'.join(map(str, spectrum['shape']))}: DC share {spectrum['dc_share']:.1%} of the mean |DCT| "
          f"response; wrote {out} and {out.with_suffix('.json')}")
    return 0


def _add_linear_probe(sub) -> None:
    p = sub.add_parser('linear-probe', help='top-1 of a linear classifier on frozen features (the paper\'s Table 12)')
    _add_model_args(p)
    p.add_argument('--train', required=True, help='training images: Fashion-MNIST IDX folder or class folders')
    p.add_argument('--val', required=True, help='evaluation images: Fashion-MNIST IDX folder (test split) or class folders')
    p.add_argument('--shots', type=int, help='K training images per class (default: all)')
    p.add_argument('--limit', type=int, help='at most N training images (evenly spaced; before --shots)')
    p.add_argument('--seed', type=int, default=0, help='seed of the --shots draw (default 0)')
    p.add_argument('--json', action='store_true', help='print one JSON object')
    p.set_defaults(func=_run_linear_probe)


def _run_linear_probe(args: argparse.Namespace) -> int:
    from .tools.analysis import image_dataset, linear_probe
    model, data_config = _load_model(args)
    train, classes = image_dataset(args.train, data_config, split='train', limit=args.limit)
    val, val_classes = image_dataset(args.val, data_config, split='test')
    if list(classes) != list(val_classes):
        raise UserError(f'--train has classes {list(classes)[:5]}... but --val has {list(val_classes)[:5]}...')
    report = linear_probe(model, train, val, len(classes), shots=args.shots, seed=args.seed)
    print(json.dumps(report) if args.json else
          f"linear probe ({'all' if args.shots is None else f'{args.shots}-shot'}: {report['train_images']} "
          f"training images, {report['dim']}-d features): top-1 {report['top1']:.2f} on {report['val_images']} images")
    return 0


def _add_feature_distance(sub) -> None:
    p = sub.add_parser('feature-distance', help='teacher-student feature distances in the alternative (DC-removed), '
                                                'direct and original components (the paper\'s Fig. 3 / 6)')
    p.add_argument('--students', nargs='+', required=True, metavar='CKPT', help='training checkpoints (fd / scalekd)')
    p.add_argument('--teacher', help="teacher weight file (default: the one in each checkpoint's config)")
    p.add_argument('--data', required=True, help='Fashion-MNIST IDX folder (test split) or one sub-folder per class')
    p.add_argument('--samples', type=int, default=1000, help='images (default 1000)')
    p.add_argument('--out', required=True, help='PNG to write; the numbers go to the same name with .json')
    _add_device(p)
    p.set_defaults(func=_run_feature_distance)


def _run_feature_distance(args: argparse.Namespace) -> int:
    from .tools.analysis import feature_distances, image_dataset, plot_feature_distances, task_from_checkpoint
    device = resolve_device(args.device)
    rows = []
    for path in args.students:
        task, data_config = task_from_checkpoint(path, args.teacher, device)
        dataset, _ = image_dataset(args.data, data_config, limit=args.samples)
        rows.append(dict(label=Path(path).parent.name or str(path), checkpoint=str(path),
                         distances=feature_distances(task, dataset)))
        print(f"{path}: " + '  '.join(f'{k} {v:.4g}' for k, v in rows[-1]['distances'].items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_feature_distances(rows, out)
    out.with_suffix('.json').write_text(json.dumps(rows, indent=2))
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


def _run_bench(args: argparse.Namespace) -> int:
    if args.loader:
        return _run_loader_bench(args)
    from .tools.bench import format_table, run_bench, run_config_bench
    if args.config and (args.teacher or args.student):
        raise UserError('give either --config or --teacher/--student, not both')
    common = dict(batch=args.batch or 8, steps=args.steps, device=str(resolve_device(args.device)),
                  variants=args.variants.split(',') if args.variants else None,
                  progress=None if args.json else lambda m: print(m, file=sys.stderr),
                  teacher_precision=args.teacher_precision, compile_backend=args.compile_backend,
                  isolate=not args.in_process)
    if args.config:  # the config's settings unless given here
        report = run_config_bench(args.config, [*(args.override or []), *(f'distill.{o}' for o in args.option or [])],
                                  img_size=args.img_size, precision=args.precision,
                                  channels_last=args.channels_last or None, compile=args.compile or None, **common)
    else:
        report = run_bench(args.teacher or BENCH_PAIR[0], args.student or BENCH_PAIR[1], args.img_size or 224,
                           precision=args.precision or 'fp32', channels_last=args.channels_last,
                           options=_key_values(args.option, '--option'), compile=args.compile, **common)
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0


def _run_loader_bench(args: argparse.Namespace) -> int:
    from .engine.inputs.config import load_config
    from .tools.loader_bench import default_worker_counts, format_loader_table, run_loader_bench
    try:
        workers = [int(w) for w in args.workers.split(',')] if args.workers else default_worker_counts()
    except ValueError:
        raise UserError(f'--workers takes comma-separated numbers of workers, got {args.workers!r}') from None
    report = run_loader_bench(load_config(args.loader, args.override), workers, args.batches, args.batch,
                              str(resolve_device(args.device)),
                              progress=None if args.json else lambda m: print(m, file=sys.stderr))
    print(json.dumps(report, indent=2) if args.json else format_loader_table(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='scalekd', description='ScaleKD: distil a vision transformer teacher '
                                                                 'into a CNN, MLP or ViT student')
    parser.add_argument('--traceback', action='store_true', help=TRACEBACK_HELP)
    sub = parser.add_subparsers(dest='command', required=True)
    _add_inspect(sub)
    _add_train(sub)
    _add_config(sub)
    _add_eval(sub)
    _add_export(sub)
    _add_import_mmcls(sub)
    _add_bench(sub)
    _add_demo(sub)
    _add_ablate(sub)
    _add_matrix(sub)
    _add_spectrum(sub)
    _add_linear_probe(sub)
    _add_feature_distance(sub)
    for command in sub.choices.values():  # after the command's arguments too
        command.add_argument('--traceback', action='store_true', default=argparse.SUPPRESS, help=TRACEBACK_HELP)
    return parser


def _report(command: str, error: BaseException, message: str, code: int, stack: bool) -> int:
    """Print ``message`` as the command's one error line (after the traceback with ``stack``); ``code``."""
    if stack:
        traceback.print_exception(error)
    rank = int(os.environ.get('RANK') or 0)  # under torchrun
    print(f'scalekd {command}: error: {f"rank {rank}: " if rank else ""}{message}', file=sys.stderr)
    return code


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``scalekd`` command: a user error (:class:`~scalekd.engine.errors.UserError`)
    prints one line and exits with 2, a lost or failed peer process one line and 1; any other error keeps
    its traceback (exit 1), out of memory followed by a hint. ``--traceback`` or ``SCALEKD_TRACEBACK=1``
    print the traceback of every error."""
    args = build_parser().parse_args(argv)
    stack = args.traceback or traceback_wanted()
    try:
        return args.func(args)
    except RankError as e:  # the main process's refusal: printed there alone
        return 2 if not stack else _report(args.command, e, error_line(e), 2, stack)
    except UserError as e:
        return _report(args.command, e, error_line(e), 2, stack)
    except PeerFailure as e:
        return _report(args.command, e, str(e), 1, stack)
    except torch.OutOfMemoryError:
        traceback.print_exc()
        print(OOM_HINT, file=sys.stderr)
        return 1
    except RuntimeError as e:
        lost = lost_peer(e)
        if lost is None:
            raise
        return _report(args.command, e, lost, 1, stack)


def console() -> NoReturn:
    """The installed ``scalekd`` command: :func:`main`, then its exit status through
    :func:`~scalekd.engine.runtime.distributed.exit_process` (safe after a process group); an unexpected error
    prints its traceback and exits with 1."""
    from .engine.runtime.distributed import exit_process
    try:
        code = main()
    except Exception:
        traceback.print_exc()
        code = 1
    exit_process(code)


if __name__ == '__main__':
    console()
