"""``scalekd ablate``: the paper's ablations reproduced on the demo benchmark.

Each study trains its rows (option presets) and the two references every row is compared with (the
student alone and logit KD) for each student and seed, with the demo's recipe, subset and shipped
teacher; a row may set its own teacher, subset and epochs (the scale studies,
:mod:`~scalekd.tools.scale_studies`), and its references are then those of its setting. Runs that share
a seed see the same batches, so each row's difference to a reference is paired per seed: the table gives its mean and spread, beside the mean top-1 and its spread, and the
paper's number where it has one. The paper's order of the rows is printed beside ours, with the pairs
that disagree. Runs evaluate once, after their last epoch (the demo also draws a per-epoch curve).
Every run keeps its folder (``config.yaml``, ``metrics.jsonl``, ``result.json``); a finished run is not
trained again when a study is rerun. ``jobs`` runs train at once, each in a process of its own.
"""
import dataclasses
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..engine.inputs.config import RunConfig
from ..engine.errors import RunError, UserError
from ..engine.run_folder.files import holding
from ..engine.loop.run_logger import write_text_atomic
from ..method.options import ablation
from .demo import STUDENTS, DemoSettings, decisive, earlier_result, run_config, test_loader, train_and_test
from .plots import pyplot, save_figure
from .run_pool import train_runs
from .scale_studies import (DATA_ROWS, ROW_KEYS, AgainstDefault, Analysis, DataScale, TeacherScale, row_label,
                            scale_row)
from .seed_stats import paired, spread
from .teachers_study import SeveralTeachers

__all__ = ['Study', 'STUDIES', 'REFERENCES', 'TEACHER_SCALE', 'LARGE_SUBSET', 'data_scale_study', 'row_settings',
           'run_study', 'format_study']

REFERENCES = ('student', 'kd')  # every row is compared with these (of its own setting), seed by seed
TEACHER_SCALE = ('vit_2k', 'vit_6k', 'vit')  # the teacher_scale study's teachers, weakest first
SEVERAL_TEACHERS = ('vit', 'cnn')  # the teachers study's teachers (both at once: 'vit+cnn')
LARGE_SUBSET = 3000  # the data_scale study's larger subset (training images), by default
PROJECTOR_LR_SCALES = (0.05, 0.25, 4.0)  # the projector_lr study's distill.projector_lr_scale values beside 1


def _references(options: Dict[str, Any]) -> Dict[str, str]:
    """The labels of the rows a row of these options is paired with: the student alone and KD of its own
    teacher, subset and epochs."""
    setting = {k: options[k] for k in ROW_KEYS if k in options}
    return {ref: row_label(ref, **setting) for ref in REFERENCES}


@dataclass(frozen=True)
class Study:
    """Rows (label, distillation options, the paper's top-1 or None) trained for each student."""
    name: str
    paper: str  # where the paper reports it, and its setting
    students: Tuple[str, ...]
    rows: Tuple[Tuple[str, Dict[str, Any], Optional[float]], ...]
    paper_order: Tuple[str, ...]  # rows from the paper's worst to its best (its ties kept in this order)
    analysis: Analysis = Analysis()  # what it measures and reports beyond the rows

    def __post_init__(self) -> None:
        missing = {ref for _, options, _ in self.rows for ref in _references(options).values()} - \
            {label for label, _, _ in self.rows}
        if missing:
            raise ValueError(f'study {self.name}: no row {", ".join(sorted(missing))} to pair its rows with')


def data_scale_study(large_subset: int = LARGE_SUBSET, large_epochs: Optional[int] = None) -> Study:
    """The ``data_scale`` study: the rows of :data:`~scalekd.tools.scale_studies.DATA_ROWS` at the demo's
    subset and at ``large_subset`` images (for ``large_epochs``; ``None``: the same epochs)."""
    return Study('data_scale', 'Table 9(a) rows at a larger subset (the paper: 1.28 M ImageNet images; Table 4: '
                               'the data behind the teacher)', ('cnn', 'mlp', 'vit'),
                 (*(scale_row(r) for r in DATA_ROWS), *(scale_row(r, subset=large_subset, epochs=large_epochs)
                                                         for r in DATA_ROWS)),
                 (), DataScale(large_subset, large_epochs))


STUDIES: Dict[str, Study] = {s.name: s for s in (
    Study('components', 'Table 9(a) (Swin-S -> ResNet-50, traditional recipe, ImageNet)', ('cnn', 'mlp', 'vit'), (
        ('student', ablation('student'), 76.55), ('kd', ablation('kd'), None), ('fd', ablation('fd'), 77.43),
        ('fd_kd', ablation('fd_kd'), None), ('cap', ablation('cap'), 77.87), ('cap_dfm', ablation('cap_dfm'), 78.51),
        ('cap_tpp', ablation('cap_tpp'), 78.62), ('cap_dfm_tpp', ablation('cap_dfm_tpp'), 79.30),
        ('scalekd', ablation('scalekd'), 79.62)),
        ('student', 'fd', 'cap', 'cap_dfm', 'cap_tpp', 'cap_dfm_tpp', 'scalekd')),
    Study('pilot', 'Table 1 (Swin-S -> ResNet-50, traditional recipe, no logit KD, ImageNet)', ('cnn', 'mlp'), (
        ('student', ablation('student'), 76.55), ('kd', ablation('kd'), None),
        ('fd', ablation('fd'), 77.43), ('fd_s3_s4', dict(ablation('fd'), stages=('s3', 's4')), 77.74),
        ('cap_dfm_tpp', ablation('cap_dfm_tpp'), 79.30)),
        ('student', 'fd', 'fd_s3_s4', 'cap_dfm_tpp')),
    Study('views', 'Table 9(c) and Table 17 (Swin-S -> ResNet-50, CAP on s4, ImageNet)', ('cnn',), (
        ('student', ablation('student'), 76.55), ('kd', ablation('kd'), None),
        ('cap', ablation('cap'), 77.87), ('cap_dual_no_phi', dict(ablation('cap'), views='dual'), 78.12),
        ('cap_dir_alt', dict(ablation('cap_dfm'), original_view='dc'), 78.23), ('cap_dfm', ablation('cap_dfm'), 78.51)),
        ('student', 'cap', 'cap_dual_no_phi', 'cap_dir_alt', 'cap_dfm')),
    Study('beta', 'Fig. 4 (ResNet-50, alpha fixed; best beta 0.6)', ('cnn',), (
        ('student', ablation('student'), None), ('kd', ablation('kd'), None),
        *((f'beta_{b}', dict(alpha=0.14, beta=b), None) for b in (0.0, 0.25, 0.5, 0.75, 1.0))),
        ()),
    Study('projector', "the CAP's size: faithful, a separable convolution, an FFN of a quarter of the teacher's "
                       "width, both (scalekd's options, not in the paper)",
          ('cnn', 'mlp', 'vit'), (
        ('student', ablation('student'), None), ('kd', ablation('kd'), None),
        ('scalekd', ablation('scalekd'), None), ('scalekd_separable', dict(cap_conv='separable'), None),
        ('scalekd_ffn_0.25', dict(cap_mlp_ratio=0.25), None),
        ('scalekd_small', dict(cap_conv='separable', cap_mlp_ratio=0.25), None)),
        (), AgainstDefault('scalekd')),
    Study('teacher_scale', 'Table 2 (Swin-S / B / L, 83.02 / 85.16 / 86.24, -> ResNet-50, traditional recipe, '
                           'ImageNet; here the shipped ViT trained on 2k / 6k / 60k images)', ('cnn', 'mlp', 'vit'), (
        scale_row('student', 76.55),
        *(scale_row(method, paper if method == 'scalekd' else None, teacher=teacher)
          for teacher, paper in zip(TEACHER_SCALE, (79.62, 79.80, 80.10)) for method in ('kd', 'scalekd'))),
        (), TeacherScale(TEACHER_SCALE)),
    data_scale_study(),
    Study('projector_lr', "the projectors' learning rate, a multiple of the student's (scalekd's option, not in the "
                          "paper: the release trains both at one rate)", ('cnn', 'mlp', 'vit'), (
        ('student', ablation('student'), None), ('kd', ablation('kd'), None), ('scalekd', ablation('scalekd'), None),
        *((f'scalekd_plr_{s:g}', dict(ablation('scalekd'), projector_lr_scale=s), None) for s in PROJECTOR_LR_SCALES)),
        (), AgainstDefault('scalekd')),
    Study('curves', 'every loss term on the train batches and the test sample, per epoch, for FD and CAP+DFM+TPP '
                    '(the CAP-vs-FD diagnosis, python -m scalekd.tools.diagnosis --plot)', ('vit',),
          tuple(scale_row(row, eval_terms=True) for row in ('student', 'kd', 'fd', 'cap_dfm_tpp')), ()),
    Study('teachers', 'several teachers at once (beyond the paper): the shipped ViT, the CNN teacher, both',
          ('cnn', 'mlp', 'vit'), (
        scale_row('student'),
        *(scale_row(method, teacher=teacher) for teacher in (*SEVERAL_TEACHERS, '+'.join(SEVERAL_TEACHERS))
          for method in ('kd', 'scalekd'))),
        (), SeveralTeachers(SEVERAL_TEACHERS)),
)}


Run = Tuple[str, str, int]  # (student, row label, seed)


def row_settings(settings: DemoSettings, options: Dict[str, Any]) -> Tuple[DemoSettings, Dict[str, Any]]:
    """A row's demo settings and distillation options: its options under
    :data:`~scalekd.tools.scale_studies.ROW_KEYS` (teacher, subset, epochs, eval_terms) replace the study's settings."""
    options = dict(options)
    return dataclasses.replace(settings, **{k: options.pop(k) for k in ROW_KEYS if k in options}), options


def _run_config(settings: DemoSettings, student: str, label: str, options: Dict[str, Any], seed: int) -> RunConfig:
    """The config of one row's run for one student and seed (evaluated once, after the last epoch; every
    epoch where the row logs its terms on the test sample)."""
    folder = Path(settings.output) / 'runs' / student / label / f'seed{seed}'
    settings, options = row_settings(dataclasses.replace(settings, seed=seed), options)
    cfg = run_config(settings, student, options.pop('method', 'scalekd'), options, output=str(folder))
    every = 1 if settings.eval_terms else cfg.sched.epochs
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, eval_every=every))


def _finished(cfg: RunConfig, label: str) -> Optional[Dict[str, Any]]:
    """The result of a finished earlier run of ``cfg`` (rows of the same label share their runs across
    studies); ``None`` when there is none; an error when the folder holds another config's run."""
    result = earlier_result(cfg)
    if result is not None and result['config'] != decisive(cfg):
        raise RunError(f'{cfg.output} holds a run of another config (other settings for the label {label!r}): '
                       f'move it away or use another --output')
    return result


def _train_runs(settings: DemoSettings, study: Study, runs: Sequence[Run], jobs: int,
                say: Callable[[str], None]) -> Dict[Run, Dict[str, Any]]:
    """Every run's result: finished ones read back, the others trained, ``jobs`` at a time (see
    :func:`~scalekd.tools.run_pool.train_runs`: a stop raises :class:`~scalekd.tools.run_pool.StudyStopped`;
    the finished runs' results stay on disk)."""
    options = {label: opts for label, opts, _ in study.rows}
    configs = {run: _run_config(settings, run[0], run[1], options[run[1]], run[2]) for run in runs}
    results = {run: _finished(cfg, run[1]) for run, cfg in configs.items()}

    def record(run: Run, result: Dict[str, Any]) -> None:
        results[run] = result
        say(f'{study.name}: {run[0]} {run[1]} seed {run[2]}: test top-1 {result["top1"]:.2f} ({result["seconds"]:.0f} s)')
    train_runs([(run, configs[run]) for run in results if results[run] is None], jobs, settings.device, test_loader,
               train_and_test, record, len(results), settings.output)
    return results


def _disagreements(order: Sequence[str], means: Dict[str, float]) -> List[Tuple[str, str]]:
    """Pairs (a, b) the paper ranks a below b that ours ranks the other way."""
    return [(a, b) for i, a in enumerate(order) for b in order[i + 1:] if means[a] > means[b]]


def run_study(study: Study, settings: DemoSettings, seeds: Sequence[int] = (0, 1, 2),
              students: Optional[Sequence[str]] = None, say: Callable[[str], None] = print,
              jobs: int = 1) -> Dict[str, Any]:
    """Train (or reuse) every run of ``study``, ``jobs`` at a time; write ``<study>.json``, ``<study>.md``
    and ``<study>.png`` (and the analysis's ``<study>_gain.png``) under ``settings.output`` and return the
    summary."""
    start = time.perf_counter()
    students = tuple(students or study.students)
    unknown = [s for s in students if s not in STUDENTS]
    if unknown:
        raise UserError(f'unknown demo student(s) {", ".join(unknown)}; choose from {", ".join(STUDENTS)}')
    with holding(settings.output):  # a second command on this output is refused, not met in a run folder
        return _run_study(study, settings, seeds, students, say, jobs, start)


def _run_study(study: Study, settings: DemoSettings, seeds: Sequence[int], students: Sequence[str],
               say: Callable[[str], None], jobs: int, start: float) -> Dict[str, Any]:
    summary: Dict[str, Any] = dict(study=study.name, paper=study.paper, seeds=list(seeds), students={},
                                   settings=dict(subset=settings.subset, epochs=settings.epochs, lr=settings.lr,
                                                 batch_size=settings.batch_size, device=str(settings.device)))
    summary['measured'] = study.analysis.measure(settings, say)
    results = _train_runs(settings, study, [(student, label, seed) for student in students
                                            for label, _, _ in study.rows for seed in seeds], jobs, say)
    for student in students:
        top1 = {label: [results[student, label, seed]['top1'] for seed in seeds] for label, _, _ in study.rows}
        rows = {}
        for label, options, paper in study.rows:
            row = dict(mean=statistics.mean(top1[label]), spread=spread(top1[label]), top1=top1[label], paper=paper)
            for ref, ref_label in _references(options).items():
                row[f'vs_{ref}'], row[f'vs_{ref}_spread'] = paired(top1[label], top1[ref_label])
            rows[label] = row
        means = {label: row['mean'] for label, row in rows.items()}
        summary['students'][student] = dict(
            model=STUDENTS[student]['model'], rows=rows,
            ours_order=sorted(means, key=means.get),
            disagree=_disagreements(study.paper_order, means))
    summary['analysis'] = study.analysis.analyse(summary)
    summary['seconds'] = time.perf_counter() - start
    out = Path(settings.output)
    write_text_atomic(out / f'{study.name}.json', json.dumps(summary, indent=2))
    write_text_atomic(out / f'{study.name}.md', format_study(study, summary) + '\n')
    plot_study(summary, out / f'{study.name}.png')
    study.analysis.plot(summary, out / f'{study.name}_gain.png')
    return summary


def format_study(study: Study, summary: Dict[str, Any]) -> str:
    """A markdown table per student (mean top-1 +- spread over seeds, paired differences to the student
    alone and to KD), then the paper's order beside ours and where they disagree, then the analysis's part."""
    seeds = summary['seeds']
    lines = [f'### {study.name}: {study.paper}', '',
             f'Fashion-MNIST test top-1 (%), {len(seeds)} seed(s) ({", ".join(map(str, seeds))}); spread: standard '
             f'deviation over seeds; vs: mean paired difference (same seed, same batches) +- its spread.']
    for student, result in summary['students'].items():
        lines += ['', f'**{student}** ({result["model"]})', '',
                  '| row | top-1 | vs student | vs KD | paper (ImageNet) |', '|---|---|---|---|---|']
        for label, row in result['rows'].items():
            paper = f'{row["paper"]:.2f}' if row['paper'] is not None else ''
            lines.append(f'| {label} | {row["mean"]:.2f} +- {row["spread"]:.2f} | {row["vs_student"]:+.2f} +- '
                         f'{row["vs_student_spread"]:.2f} | {row["vs_kd"]:+.2f} +- {row["vs_kd_spread"]:.2f} | {paper} |')
        if study.paper_order:
            disagree = ', '.join(f'{a} > {b}' for a, b in result['disagree']) or 'none'
            ours = [label for label in result['ours_order'] if label in study.paper_order]
            lines += ['', f'paper order: {" < ".join(study.paper_order)}', f'our order: {" < ".join(ours)}',
                      f'disagreements (ours): {disagree}']
    extra = study.analysis.format(summary)
    lines += ['', extra] if extra else []
    lines += ['', f'{summary["seconds"]:.0f} s']
    return '\n'.join(lines)


def plot_study(summary: Dict[str, Any], path: Path) -> Path:
    """Mean top-1 per row with its spread over seeds: one panel per student."""
    plt = pyplot()
    students = summary['students']
    fig, axes = plt.subplots(1, len(students), figsize=(0.6 * max(len(r['rows']) for r in students.values()) * len(students) + 2,
                                                          3.6), squeeze=False)
    for ax, (student, result) in zip(axes[0], students.items()):
        labels = list(result['rows'])
        means = [result['rows'][label]['mean'] for label in labels]
        spreads = [result['rows'][label]['spread'] for label in labels]
        ax.bar(range(len(labels)), means, yerr=spreads, capsize=3, color='tab:blue', alpha=0.8)
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha='right', fontsize=8)
        low = min(m - s for m, s in zip(means, spreads))
        ax.set_ylim(low - 2, max(m + s for m, s in zip(means, spreads)) + 1)
        ax.set_title(f'{student}: {result["model"]}', fontsize=9)
        ax.grid(axis='y', alpha=0.3)
    axes[0][0].set_ylabel('test top-1 (%)')
    fig.suptitle(f'{summary["study"]}: mean over seeds {summary["seeds"]} +- spread', fontsize=9)
    return save_figure(fig, path)
