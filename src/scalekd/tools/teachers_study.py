"""The ``teachers`` study of ``scalekd ablate``: several teachers at once (beyond the paper).

Each student learns with KD and with ScaleKD from the shipped ViT teacher, from the CNN teacher, and from
both at once (a ``teachers:`` list: each teacher its own projectors, both at weight 1, the KD target the mean
of the two teachers' softened distributions). The question: does the student gain from a second teacher of
another architecture over the better of the two alone? Reported per student and method: the paired
difference (same seed, same batches) of the two-teacher row to each one-teacher row.
"""
from dataclasses import dataclass
from typing import Any, Dict

from .scale_studies import TeacherStudy, row_label
from .seed_stats import paired

__all__ = ['SeveralTeachers']


@dataclass(frozen=True)
class SeveralTeachers(TeacherStudy):
    """Two teachers against each alone: ``both`` is their ``+``-joined key (``vit+cnn``)."""

    @property
    def both(self) -> str:
        return '+'.join(self.teachers)

    def analyse(self, summary: Dict[str, Any]) -> Dict[str, Any]:
        verdicts = {}
        for student, result in summary['students'].items():
            rows = result['rows']
            verdicts[student] = {}
            for method in ('kd', 'scalekd'):
                both = rows[row_label(method, teacher=self.both)]['top1']
                verdicts[student][method] = {
                    t: dict(zip(('mean', 'spread'), paired(both, rows[row_label(method, teacher=t)]['top1'])))
                    for t in self.teachers}
        return verdicts

    def format(self, summary: Dict[str, Any]) -> str:
        accuracy = ', '.join(f'{t} {summary["measured"][t]["top1"]:.2f}' for t in self.teachers)
        lines = ['#### Both teachers against each alone', '',
                 f'The teachers\' own test top-1: {accuracy}. "both - X": the mean paired difference (same seed) of '
                 f'the two-teacher row to the row of teacher X alone, +- its spread.', '',
                 '| student | method | ' + ' | '.join(f'from {t}' for t in (*self.teachers, self.both)) + ' | '
                 + ' | '.join(f'both - {t}' for t in self.teachers) + ' |',
                 '|---|---|' + '---|' * (2 * len(self.teachers) + 1)]
        for student, verdict in summary['analysis'].items():
            rows = summary['students'][student]['rows']
            for method in ('kd', 'scalekd'):
                tops = [rows[row_label(method, teacher=t)] for t in (*self.teachers, self.both)]
                diffs = [verdict[method][t] for t in self.teachers]
                lines.append(f'| {student} | {method} | ' + ' | '.join(f'{r["mean"]:.2f} +- {r["spread"]:.2f}' for r in tops)
                             + ' | ' + ' | '.join(f'{d["mean"]:+.2f} +- {d["spread"]:.2f}' for d in diffs) + ' |')
        return '\n'.join(lines)
