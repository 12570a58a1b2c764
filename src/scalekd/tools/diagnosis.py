"""Why CAP trails FD on the demo benchmark: what the studies' run folders say (``python -m
scalekd.tools.diagnosis``).

For each student and row (default: FD and CAP+DFM+TPP, without and with logit KD) it reads the runs of
``scalekd ablate`` under ``<output>/runs/<student>/<row>/seed*/`` and reports, as means over seeds:

- the projectors' parameters beside the student's (the row's model built from its saved config);
- each feature term's train mean at the first and at the last epoch, and their ratio: how far the
  projectors fitted their targets (a term that hardly falls is a target the projector cannot reach);
- the last epoch's train task loss beside the test loss of the same epoch (the per-epoch test sample):
  a gap much larger than the student alone's is overfitting, a train loss above it underfitting.
"""
import argparse
import json
import statistics
from pathlib import Path
from typing import Any, Dict, List, Sequence

import torch

from ..engine.inputs.config import load_config
from ..engine.inputs.task_build import build_task
from ..task.report import param_counts

__all__ = ['ROWS', 'diagnose_run', 'diagnose', 'format_diagnosis']

ROWS = ('student', 'fd', 'cap_dfm_tpp', 'fd_kd', 'scalekd')


def _epochs(run: Path) -> List[Dict[str, Any]]:
    lines = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
    return [r for r in lines if 'train_task_loss' in r and 'epoch' in r]


def diagnose_run(run: Path) -> Dict[str, Any]:
    """One run's figures: each feature term at the first and last epoch, the last epoch's train task
    loss and test loss, its test top-1 (``result.json``)."""
    epochs = _epochs(run)
    first, last = epochs[0], epochs[-1]
    terms = sorted(k[len('train_'):] for k in last if k.startswith('train_') and k.endswith(('_ori', '_alt')))
    return dict(terms={t: (first[f'train_{t}'], last[f'train_{t}']) for t in terms},
                train_task=last['train_task_loss'], test_loss=last.get('val_loss'),
                top1=json.loads((run / 'result.json').read_text())['top1'])


def _mean(values: Sequence[float]) -> float:
    return statistics.mean(values) if values else float('nan')


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
                terms=terms, train_task=_mean([f['train_task'] for f in figures]),
                test_loss=_mean([f['test_loss'] for f in figures if f['test_loss'] is not None]),
                top1=_mean([f['top1'] for f in figures]))
    return result


def format_diagnosis(result: Dict[str, Dict[str, Any]]) -> str:
    """A markdown table per student."""
    lines = []
    for student, rows in result.items():
        lines += [f'**{student}**', '', '| row | seeds | projector / student params | feature terms: first -> last '
                  'epoch (last / first) | train task loss | test loss | gap | test top-1 |', '|---|---|---|---|---|---|---|---|']
        for row, r in rows.items():
            terms = '; '.join(f'{t} {a:.3g} -> {b:.3g} ({b / a:.2f})' for t, (a, b) in r['terms'].items()) or '-'
            lines.append(f'| {row} | {r["seeds"]} | {r["projector_params"]:,} / {r["student_params"]:,} | {terms} | '
                         f'{r["train_task"]:.3f} | {r["test_loss"]:.3f} | {r["test_loss"] - r["train_task"]:+.3f} | '
                         f'{r["top1"]:.2f} |')
        lines.append('')
    return '\n'.join(lines)


def main(argv: Sequence[str] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m scalekd.tools.diagnosis', description=__doc__.splitlines()[0])
    parser.add_argument('--output', default='runs/ablate', help='the studies\' output folder (default runs/ablate)')
    parser.add_argument('--students', default='mlp,vit', help='comma-separated demo students (default mlp,vit)')
    parser.add_argument('--rows', default=','.join(ROWS), help=f'comma-separated rows (default {",".join(ROWS)})')
    args = parser.parse_args(argv)
    print(format_diagnosis(diagnose(Path(args.output), args.students.split(','), args.rows.split(','))))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
