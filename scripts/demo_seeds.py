#!/usr/bin/env python
"""The demo's acceptance numbers: ``scalekd demo --baselines`` on several seeds, per seed and mean.

    .venv/bin/python scripts/demo_seeds.py                         # seeds 0 1 2 -> runs/demo-seeds/
    .venv/bin/python scripts/demo_seeds.py --option cap_conv=separable --output runs/demo-seeds-separable

Prints a markdown table (test top-1 of each student alone / KD / ScaleKD per seed, the means and
the mean gain) and writes it, with every seed's results.json, under ``--output``.
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

from scalekd.engine.runtime.allocator import keep_freed_memory
from scalekd.cli import _key_values
from scalekd.tools.demo import DemoSettings, format_table, run_demo


def markdown(per_seed: dict) -> str:
    seeds = sorted(per_seed)
    students = list(per_seed[seeds[0]]['students'])
    lines = ['| student | seed | alone | KD | ScaleKD | ScaleKD - alone | ScaleKD - KD |', '|---|---|---|---|---|---|---|']
    for name in students:
        rows = [per_seed[s]['students'][name] for s in seeds]
        for seed, row in zip(seeds, rows):
            lines.append(f"| {name} | {seed} | {row['alone_top1']:.2f} | {row['kd_top1']:.2f} | "
                         f"{row['scalekd_top1']:.2f} | {row['gain']:+.2f} | {row['scalekd_top1'] - row['kd_top1']:+.2f} |")
        mean = {k: statistics.mean(r[k] for r in rows) for k in ('alone_top1', 'kd_top1', 'scalekd_top1')}
        lines.append(f"| **{name}** | mean | {mean['alone_top1']:.2f} | {mean['kd_top1']:.2f} | "
                     f"{mean['scalekd_top1']:.2f} | **{mean['scalekd_top1'] - mean['alone_top1']:+.2f}** | "
                     f"{mean['scalekd_top1'] - mean['kd_top1']:+.2f} |")
    teacher = per_seed[seeds[0]]['teacher_top1']
    return f'teacher test top-1 {teacher:.2f}\n\n' + '\n'.join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--output', default='runs/demo-seeds')
    parser.add_argument('--option', action='append', metavar='KEY=VALUE', help='distillation option of ScaleKD')
    parser.add_argument('--students', default='cnn,mlp,vit')
    parser.add_argument('--reuse', action='store_true', help="keep a seed's finished results.json instead of rerunning")
    args = parser.parse_args()
    keep_freed_memory()
    per_seed = {}
    for seed in args.seeds:
        settings = DemoSettings(output=str(Path(args.output) / f'seed{seed}'), seed=seed, baselines=True,
                                students=args.students.split(','), progress=False,
                                distill=_key_values(args.option, '--option'))
        done = Path(settings.output) / 'results.json'
        if args.reuse and done.is_file():
            per_seed[seed] = json.loads(done.read_text())
            continue
        per_seed[seed] = run_demo(settings, say=lambda m, s=seed: print(f'seed {s}: {m}', file=sys.stderr, flush=True))
        print(format_table(per_seed[seed]), file=sys.stderr, flush=True)
    table = markdown(per_seed)
    Path(args.output, 'seeds.md').write_text(table + '\n')
    Path(args.output, 'seeds.json').write_text(json.dumps(per_seed, indent=2))
    print(table)
    return 0


if __name__ == '__main__':
    sys.exit(main())
