"""The scale studies of ``scalekd ablate``: does a stronger teacher (``teacher_scale``) or more training data
(``data_scale``) make the distilled student better, as the paper claims?

Their rows are the component presets (:data:`~scalekd.method.options.ABLATIONS`) at a setting: a demo teacher
(a key of :data:`~scalekd.tools.demo.DEMO_TEACHERS`), a training subset and epochs, carried in the row's
options under :data:`ROW_KEYS` and named by :func:`row_label`. A row at the study's own setting (the shipped
teacher, the demo's subset and epochs) keeps the plain label, so it is the same run as in the other studies.
Each study's :class:`Analysis` adds what it measures beyond the rows (the teachers' own accuracy), its
verdict on the paper's claim, a table and a figure; :class:`AgainstDefault` serves the studies of one option
(``projector_lr``).
"""
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..engine.errors import UserError
from ..engine.loop.run_logger import write_text_atomic
from ..engine.runtime.distributed import DistEnv
from ..method.options import ablation
from .demo import DEFAULT_TEACHER, STUDENTS, DemoSettings, run_config, teacher_top1, test_loader
from .plots import pyplot, save_figure
from .seed_stats import paired

__all__ = ['ROW_KEYS', 'row_setting', 'row_label', 'scale_row', 'Analysis', 'TeacherStudy', 'TeacherScale', 'DataScale',
           'AgainstDefault', 'teacher_accuracies', 'gain_slopes']

ROW_KEYS = ('teacher', 'subset', 'epochs', 'eval_terms')  # row options that set the run's demo settings, not its distillation
TEACHERS_FILE = 'teachers.json'  # the teachers' own accuracy, in the study's output


def row_setting(base: str, teacher: Optional[str] = None, subset: Optional[int] = None,
                epochs: Optional[int] = None, eval_terms: bool = False) -> Dict[str, Any]:
    """The row options (of :data:`ROW_KEYS`) of preset ``base`` at a setting: none for the shipped teacher,
    the study's subset and epochs (``None``) and no per-epoch curves of the terms, and no teacher for the
    student alone."""
    if base == 'student' or teacher == DEFAULT_TEACHER:
        teacher = None
    return {k: v for k, v in dict(teacher=teacher, subset=subset, epochs=epochs, eval_terms=eval_terms or None).items()
            if v is not None}


def row_label(base: str, **setting: Any) -> str:
    """The label of preset ``base`` at a setting (see :func:`row_setting`): ``kd_vit_2k``, ``fd_n3000``,
    ``fd_n3000_e30``, ``fd_curves`` (the terms on the test sample every epoch); ``kd`` for the shipped
    teacher at the study's subset and epochs."""
    s = row_setting(base, **setting)
    return base + (f'_{s["teacher"]}' if 'teacher' in s else '') + (f'_n{s["subset"]}' if 'subset' in s else '') \
        + (f'_e{s["epochs"]}' if 'epochs' in s else '') + ('_curves' if 'eval_terms' in s else '')


def scale_row(base: str, paper: Optional[float] = None, **setting: Any) -> Tuple[str, Dict[str, Any], Optional[float]]:
    """A study row (label, options, the paper's top-1): preset ``base`` at a setting."""
    return row_label(base, **setting), dict(ablation(base), **row_setting(base, **setting)), paper


class Analysis:
    """What a study reports beyond its rows' table and bars: nothing, unless a subclass says."""

    def measure(self, settings: DemoSettings, say: Callable[[str], None]) -> Dict[str, Any]:
        """Measured before the runs train (the summary's ``measured``)."""
        return {}

    def analyse(self, summary: Dict[str, Any]) -> Dict[str, Any]:
        """The verdict per student from the study's summary (the summary's ``analysis``)."""
        return {}

    def format(self, summary: Dict[str, Any]) -> str:
        """Markdown after the rows' tables."""
        return ''

    def plot(self, summary: Dict[str, Any], path: Path) -> Optional[Path]:
        """A figure of its own (written to ``path``), or ``None``."""
        return None


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def teacher_accuracies(settings: DemoSettings, teachers: Sequence[str],
                       say: Callable[[str], None]) -> Dict[str, Dict[str, Any]]:
    """Each demo teacher's own top-1 on all 10,000 test images (fp32, as the demo measures it): measured once
    and kept in ``teachers.json`` of the output beside its weights' sha256 (weights that changed are measured
    again)."""
    path = Path(settings.output) / TEACHERS_FILE
    try:
        cache = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError as e:
        raise UserError(f'{path} is not the JSON a study wrote ({e}): move it away') from None
    measured, test, env = {}, None, DistEnv(device=settings.device)
    for key in teachers:
        one = dataclasses.replace(settings, teacher=key, teacher_weights=None)
        model = one.teacher_model
        digest = _sha256(model['checkpoint'])
        if cache.get(key, {}).get('sha256') != digest:
            test = test or test_loader(run_config(one, next(iter(STUDENTS)), 'none'))
            cache[key] = dict(model=model['model'], kwargs=model['kwargs'], weights=model['checkpoint'],
                              sha256=digest, top1=teacher_top1(one, test, env))
            write_text_atomic(path, json.dumps(cache, indent=2))
            say(f'teacher {key} ({model["model"]} {model["kwargs"]}): test top-1 {cache[key]["top1"]:.2f}')
        measured[key] = cache[key]
    return measured


def _slope(xs: Sequence[float], ys: Sequence[float]) -> Optional[float]:
    """The least-squares slope of ys on xs; ``None`` when the xs are all equal."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else None


def gain_slopes(points: Sequence[Dict[str, float]]) -> Dict[str, Any]:
    """The criterion of :class:`TeacherScale` on points (``teacher_top1``, ``kd`` and ``scalekd``: the mean
    paired gains over the student alone): each method's slope and whether the claim holds."""
    xs = [p['teacher_top1'] for p in points]
    kd, scalekd = _slope(xs, [p['kd'] for p in points]), _slope(xs, [p['scalekd'] for p in points])
    holds = None if kd is None else scalekd > 0 and scalekd > kd
    return dict(kd_slope=kd, scalekd_slope=scalekd, holds=holds)


@dataclass(frozen=True)
class TeacherStudy(Analysis):
    """A study of demo teachers: it measures each one's own test top-1 first (:func:`teacher_accuracies`)."""
    teachers: Tuple[str, ...]

    def measure(self, settings: DemoSettings, say: Callable[[str], None]) -> Dict[str, Any]:
        return teacher_accuracies(settings, self.teachers, say)


@dataclass(frozen=True)
class TeacherScale(TeacherStudy):
    """The paper's Table 2: KD and ScaleKD from teachers of increasing accuracy.

    Claim tested (per student): ScaleKD's gain grows with the teacher, and grows more than KD's.
    Criterion: over the teachers, the least-squares slope of a method's mean paired gain over the student
    alone against the teacher's own test top-1 (points of gain per point of teacher accuracy); the claim
    holds when ScaleKD's slope is above zero and above KD's (undecided when the teachers' accuracies are
    all equal).
    """
    claim = "ScaleKD's gain grows with the teacher, and more than KD's"

    def analyse(self, summary: Dict[str, Any]) -> Dict[str, Any]:
        verdicts = {}
        for student, result in summary['students'].items():
            rows = result['rows']
            points = [dict(teacher=t, teacher_top1=summary['measured'][t]['top1'],
                           **{m: rows[row_label(m, teacher=t)]['vs_student'] for m in ('kd', 'scalekd')},
                           **{f'{m}_spread': rows[row_label(m, teacher=t)]['vs_student_spread'] for m in ('kd', 'scalekd')})
                      for t in self.teachers]
            points.sort(key=lambda p: p['teacher_top1'])
            verdicts[student] = dict(points=points, **gain_slopes(points))
        return verdicts

    def format(self, summary: Dict[str, Any]) -> str:
        lines = [f'#### The claim: {self.claim}', '',
                 'gain: mean paired difference to the student alone (same seed) +- its spread; ScaleKD vs KD: '
                 'the same teacher; slope: least-squares gain per point of teacher top-1.']
        for student, verdict in summary['analysis'].items():
            rows = summary['students'][student]['rows']
            lines += ['', f'**{student}**', '', '| teacher | teacher top-1 | KD top-1 | KD gain | ScaleKD top-1 | '
                      'ScaleKD gain | ScaleKD vs KD |', '|---|---|---|---|---|---|---|']
            for p in verdict['points']:
                kd, skd = rows[row_label('kd', teacher=p['teacher'])], rows[row_label('scalekd', teacher=p['teacher'])]
                lines.append(f'| {p["teacher"]} | {p["teacher_top1"]:.2f} | {kd["mean"]:.2f} +- {kd["spread"]:.2f} | '
                             f'{p["kd"]:+.2f} +- {p["kd_spread"]:.2f} | {skd["mean"]:.2f} +- {skd["spread"]:.2f} | '
                             f'{p["scalekd"]:+.2f} +- {p["scalekd_spread"]:.2f} | {skd["vs_kd"]:+.2f} +- '
                             f'{skd["vs_kd_spread"]:.2f} |')
            if verdict['holds'] is None:
                lines += ['', 'slopes: undecided (the teachers are equally accurate)']
            else:
                lines += ['', f'slope of the gain: KD {verdict["kd_slope"]:+.3f}, ScaleKD {verdict["scalekd_slope"]:+.3f}'
                          f' per point of teacher top-1: the claim {"holds" if verdict["holds"] else "does not hold"}']
        return '\n'.join(lines)

    def plot(self, summary: Dict[str, Any], path: Path) -> Path:
        """Paired gain over the student alone against the teacher's top-1, KD and ScaleKD, per student; error
        bars: the spread of the gain over seeds."""
        plt = pyplot()
        verdicts = summary['analysis']
        fig, axes = plt.subplots(1, len(verdicts), figsize=(3.8 * len(verdicts), 3.4), squeeze=False)
        for ax, (student, verdict) in zip(axes[0], verdicts.items()):
            xs = [p['teacher_top1'] for p in verdict['points']]
            for method, name in (('kd', 'KD'), ('scalekd', 'ScaleKD')):
                ax.errorbar(xs, [p[method] for p in verdict['points']], yerr=[p[f'{method}_spread'] for p in verdict['points']],
                            marker='o', capsize=3, label=name)
            for p in verdict['points']:
                ax.annotate(p['teacher'], (p['teacher_top1'], p['scalekd']), fontsize=7, textcoords='offset points',
                            xytext=(3, 4))
            ax.axhline(0, color='k', linewidth=0.8)
            ax.set_title(f'{student}: {summary["students"][student]["model"]}', fontsize=9)
            ax.set_xlabel('teacher test top-1 (%)')
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        axes[0][0].set_ylabel('gain over the student alone (points)')
        fig.suptitle(f'{summary["study"]}: mean paired gain over seeds {summary["seeds"]} +- spread', fontsize=9)
        return save_figure(fig, path)


DATA_ROWS = ('student', 'kd', 'fd', 'fd_kd', 'cap_dfm_tpp', 'scalekd')
CONTRASTS = (('cap_dfm_tpp', 'fd'), ('scalekd', 'fd_kd'))  # CAP against FD: without KD, with KD


@dataclass(frozen=True)
class DataScale(Analysis):
    """The component rows that matter at the demo's subset and a larger one.

    Question (per student): does CAP overtake FD as data grows? Contrasts, each a mean paired difference
    at each subset: CAP+DFM+TPP - FD (no KD) and ScaleKD - FD+KD (both with KD). Criterion: CAP overtakes
    FD when the difference is above zero at the larger subset and larger there than at the smaller one.
    """
    large_subset: int
    large_epochs: Optional[int] = None  # None: the study's epochs

    @property
    def settings(self) -> List[Dict[str, Any]]:
        """The row settings compared, the smaller data first."""
        return [{}, row_setting('fd', subset=self.large_subset, epochs=self.large_epochs)]

    def analyse(self, summary: Dict[str, Any]) -> Dict[str, Any]:
        verdicts = {}
        for student, result in summary['students'].items():
            rows = result['rows']
            at = [dict(subset=s.get('subset', summary['settings']['subset']),
                       epochs=s.get('epochs', summary['settings']['epochs']),
                       **{f'{a}-{b}': paired(rows[row_label(a, **s)]['top1'], rows[row_label(b, **s)]['top1'])
                          for a, b in CONTRASTS}) for s in self.settings]
            verdicts[student] = dict(at=at, overtakes={f'{a}-{b}': at[-1][f'{a}-{b}'][0] > 0 and
                                                       at[-1][f'{a}-{b}'][0] > at[0][f'{a}-{b}'][0] for a, b in CONTRASTS})
        return verdicts

    def format(self, summary: Dict[str, Any]) -> str:
        lines = ['#### Does CAP overtake FD as data grows?', '',
                 'top-1 means over seeds; the contrasts: mean paired difference (same seed) +- its spread.']
        for student, verdict in summary['analysis'].items():
            rows = summary['students'][student]['rows']
            lines += ['', f'**{student}**', '', '| subset | epochs | ' + ' | '.join(DATA_ROWS) + ' | ' +
                      ' | '.join(f'{a} - {b}' for a, b in CONTRASTS) + ' |', '|---' * (len(DATA_ROWS) + 4) + '|']
            for s, at in zip(self.settings, verdict['at']):
                tops = ' | '.join(f'{rows[row_label(r, **s)]["mean"]:.2f}' for r in DATA_ROWS)
                diffs = ' | '.join(f'{at[f"{a}-{b}"][0]:+.2f} +- {at[f"{a}-{b}"][1]:.2f}' for a, b in CONTRASTS)
                lines.append(f'| {at["subset"]} | {at["epochs"]} | {tops} | {diffs} |')
            lines.append('')
            for a, b in CONTRASTS:
                d = [at[f'{a}-{b}'][0] for at in verdict['at']]
                lines.append(f'{a} - {b}: {d[0]:+.2f} at {verdict["at"][0]["subset"]}, {d[-1]:+.2f} at '
                             f'{verdict["at"][-1]["subset"]}: {"overtakes" if verdict["overtakes"][f"{a}-{b}"] else "does not overtake"}')
        return '\n'.join(lines)


@dataclass(frozen=True)
class AgainstDefault(Analysis):
    """Other settings of one option against its default, for every student.

    Each row after ``default`` (the row of the default setting) in the study is paired seed by seed with
    it. A row would change the default only if it wins every pair: ahead of the default on every seed of
    every student (the bar the CAP-vs-FD diagnosis sets for a default).
    """
    default: str

    def analyse(self, summary: Dict[str, Any]) -> Dict[str, Any]:
        top1 = {student: result['rows'] for student, result in summary['students'].items()}
        labels = list(next(iter(top1.values())))
        others = labels[labels.index(self.default) + 1:]
        return dict(diffs={s: {row: paired(rows[row]['top1'], rows[self.default]['top1']) for row in others}
                           for s, rows in top1.items()},
                    ahead={row: all(a > b for rows in top1.values()
                                    for a, b in zip(rows[row]['top1'], rows[self.default]['top1'])) for row in others})

    def format(self, summary: Dict[str, Any]) -> str:
        verdict = summary['analysis']
        students = list(verdict['diffs'])
        lines = [f'#### Against {self.default}', '', f'mean paired difference to {self.default} (same seed) +- its '
                 f'spread; a row ahead on every seed of every student would change the default.', '',
                 '| row | ' + ' | '.join(students) + ' | ahead on every seed |', '|---' * (len(students) + 2) + '|']
        for row, ahead in verdict['ahead'].items():
            diffs = ' | '.join(f'{verdict["diffs"][s][row][0]:+.2f} +- {verdict["diffs"][s][row][1]:.2f}' for s in students)
            lines.append(f'| {row} | {diffs} | {"yes" if ahead else "no"} |')
        return '\n'.join(lines)
