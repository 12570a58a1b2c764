"""Why CAP trails FD on the demo benchmark: what the studies' run folders say (``python -m
scalekd.tools.diagnosis``).

For each student and row (default: FD and CAP+DFM+TPP, without and with logit KD) it reads the runs of
``scalekd ablate`` under ``<output>/runs/<student>/<row>/seed*/`` and reports, as means over seeds:

- the projectors' parameters beside the student's (the row's model built from its saved config);
- each feature term's train mean at the first and at the last epoch, and their ratio: how far the
  projectors fitted their targets (a term that hardly falls is a target the projector cannot reach);
- the last epoch's train task loss beside the test loss of the same epoch (the per-epoch test sample):
  a gap much larger than the student alone's is overfitting, a train loss above it underfitting;
- for runs that logged their terms on the test sample (``train.eval_terms``: the ``curves`` study's
  ``<row>_curves`` runs), each feature term's last-epoch test mean beside its train mean, and with
  ``--plot`` every term's train and test curve per epoch.
"""
import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Sequence

import torch

from ..engine.inputs.config import load_config
from ..engine.inputs.task_build import build_task
from ..task.report import param_counts
from .plots import pyplot, save_figure

__all__ = ['ROWS', 'diagnose_run', 'diagnose', 'format_diagnosis', 'plot_term_curves']

ROWS = ('student', 'fd', 'cap_dfm_tpp', 'fd_kd', 'scalekd')


def _epochs(run: Path) -> List[Dict[str, Any]]:
    lines = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
    return [r for r in lines if 'train_task_loss' in r and 'epoch' in r]


def diagnose_run(run: Path) -> Dict[str, Any]:
    """One run's figures: each feature term at the first and last epoch (and on the test sample at the
    last, where logged), the last epoch's train task loss and test loss, its test top-1 (``result.json``),
    and every term's per-epoch curve (``train`` every epoch; ``test`` at the epochs evaluated)."""
    epochs = _epochs(run)
    first, last = epochs[0], epochs[-1]
    names = sorted(k[len('train_'):] for k in last if k.startswith('train_') and k.endswith(('_ori', '_alt', '_loss')))
    terms = [t for t in names if t.endswith(('_ori', '_alt'))]
    curves = {t: dict(train=[(r['epoch'], r[f'train_{t}']) for r in epochs],
                      test=[(r['epoch'], r[f'val_{t}']) for r in epochs if f'val_{t}' in r]) for t in names}
    return dict(terms={t: (first[f'train_{t}'], last[f'train_{t}']) for t in terms},
                test_terms={t: last[f'val_{t}'] for t in terms if f'val_{t}' in last},
                train_task=last['train_task_loss'], test_loss=last.get('val_loss'),
                top1=json.loads((run / 'result.json').read_text())['top1'], curves=curves)


def _mean(values: Sequence[float]) -> float:
    return statistics.mean(values) if values else float('nan')


def _mean_curves(runs: Sequence[Dict[str, Dict[str, List]]]) -> Dict[str, Dict[str, List]]:
    """Each term's curves averaged over runs, epoch by epoch (the epochs every run has)."""
    out: Dict[str, Dict[str, List]] = {}
    for term in runs[0]:
        out[term] = {}
        for part in ('train', 'test'):
            points = [dict(run[term][part]) for run in runs if term in run]
            common = sorted(set.intersection(*(set(p) for p in points))) if points else []
            out[term][part] = [(e, _mean([p[e] for p in points])) for e in common]
    return out


def diagnose(output: Path, students: Sequence[str], rows: Sequence[str] = ROWS) -> Dict[str, Dict[str, Any]]:
    """Every student's and row's figures, means over the seeds found (rows without runs are left out)."""
    result: Dict[str, Dict[str, Any]] = {}
    for student in students:
        result[student] = {}
        for row in rows:
            runs = sorted((Path(output) / 'runs' / student / row).glob('seed*/result.json'))
            if not runs:
                continue
            figures = [diagnose_run(r.parent) for r in runs]
            params = param_counts(build_task(load_config(runs[0].parent / 'config.yaml'), torch.device('cpu'),
                                             random_weights=True))
            terms = {t: (_mean([f['terms'][t][0] for f in figures]), _mean([f['terms'][t][1] for f in figures]))
                     for t in figures[0]['terms']}
            result[student][row] = dict(
                seeds=len(figures), student_params=params['student'], projector_params=params['distill'],
                terms=terms, test_terms={t: _mean([f['test_terms'][t] for f in figures if t in f['test_terms']])
                                         for t in figures[0]['test_terms']},
                curves=_mean_curves([f['curves'] for f in figures]), train_task=_mean([f['train_task'] for f in figures]),
                test_loss=_mean([f['test_loss'] for f in figures if f['test_loss'] is not None]),
                top1=_mean([f['top1'] for f in figures]))
    return result


def format_diagnosis(result: Dict[str, Dict[str, Any]]) -> str:
    """A markdown table per student."""
    lines = []
    for student, rows in result.items():
        lines += [f'**{student}**', '', '| row | seeds | projector / student params | feature terms: first -> last '
                  'epoch (last / first) | feature terms on the test sample, last epoch (test / train) | train task '
                  'loss | test loss | gap | test top-1 |', '|---|---|---|---|---|---|---|---|---|']
        for row, r in rows.items():
            terms = '; '.join(f'{t} {a:.3g} -> {b:.3g} ({b / a:.2f})' for t, (a, b) in r['terms'].items()) or '-'
            test = '; '.join(f'{t} {v:.3g} ({v / r["terms"][t][1]:.2f})' for t, v in r['test_terms'].items()) or '-'
            lines.append(f'| {row} | {r["seeds"]} | {r["projector_params"]:,} / {r["student_params"]:,} | {terms} | '
                         f'{test} | {r["train_task"]:.3f} | {r["test_loss"]:.3f} | '
                         f'{r["test_loss"] - r["train_task"]:+.3f} | {r["top1"]:.2f} |')
        lines.append('')
    return '\n'.join(lines)


def plot_term_curves(result: Dict[str, Dict[str, Any]], path: Path, columns: int = 3) -> Path:
    """Every loss term per epoch, mean over seeds: one panel per student and term (``columns`` to a line),
    one colour per row of the diagnosis; train solid, test sample dashed (where the runs logged it)."""
    plt = pyplot()
    panels = [(student, term) for student, rows in result.items()
              for term in sorted({t for r in rows.values() for t in r['curves']}, key=lambda t: (t != 'task_loss', t))]
    lines = -(-len(panels) // columns)
    fig, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 3.0 * lines), squeeze=False)
    for ax, (student, term) in zip(axes.flat, panels):
        for colour, (row, r) in enumerate(result[student].items()):
            curve = r['curves'].get(term)
            for part, style in (('train', '-'), ('test', '--')):
                if curve and curve[part]:
                    ax.plot(*zip(*curve[part]), style, color=f'C{colour}', label=f'{row} {part}')
        ax.set_title(f'{student}: {term}', fontsize=9)
        ax.set_xlabel('epoch', fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle('loss terms per epoch, mean over seeds: train (solid), test sample (dashed)', fontsize=9)
    return save_figure(fig, path)


def main(argv: Sequence[str] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m scalekd.tools.diagnosis', description=__doc__.splitlines()[0])
    parser.add_argument('--output', default='runs/ablate', help='the studies\' output folder (default runs/ablate)')
    parser.add_argument('--students', default='mlp,vit', help='comma-separated demo students (default mlp,vit)')
    parser.add_argument('--rows', default=','.join(ROWS), help=f'comma-separated rows (default {",".join(ROWS)})')
    parser.add_argument('--plot', default=None, help='also draw every term\'s train and test curves to this file')
    args = parser.parse_args(argv)
    result = diagnose(Path(args.output), args.students.split(','), args.rows.split(','))
    if not any(result.values()):
        print(f'{parser.prog}: no finished runs of the rows {args.rows} under {args.output}/runs/<student>/',
              file=sys.stderr)
        return 2
    print(format_diagnosis(result))
    if args.plot:
        print(f'curves: {plot_term_curves(result, Path(args.plot))}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
