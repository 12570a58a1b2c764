"""``scalekd ablate``: the paper's ablations reproduced on the demo benchmark.

Each study trains its rows (option presets) and the two references every row is compared with (the
student alone and logit KD) for each student and seed, with the demo's recipe, subset and shipped
teacher. Runs that share a seed see the same batches, so each row's difference to a reference is
paired per seed: the table gives its mean and spread, beside the mean top-1 and its spread, and the
paper's number where it has one. The paper's order of the rows is printed beside ours, with the pairs
that disagree. Runs evaluate once, after their last epoch (the demo also draws a per-epoch curve).
Every run keeps its folder (``config.yaml``, ``metrics.jsonl``, ``result.json``); a finished run is not
trained again when a study is rerun. ``jobs`` runs train at once, each in a process of its own.
"""
import ctypes
import dataclasses
import json
import multiprocessing
import os
import signal
import statistics
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from ..engine.allocator import keep_freed_memory
from ..engine.config import RunConfig, config_from_dict, config_to_dict
from ..engine.distributed import DistEnv
from ..engine.errors import RunInterrupted
from ..engine.run_folder import holding
from ..engine.run_logger import write_text_atomic
from ..method.options import ablation
from .demo import STUDENTS, DemoSettings, run_config, test_loader, train_and_test
from .plots import pyplot, save_figure

__all__ = ['Study', 'STUDIES', 'REFERENCES', 'StudyStopped', 'run_study', 'format_study']

REFERENCES = ('student', 'kd')  # every row is compared with these, seed by seed


@dataclass(frozen=True)
class Study:
    """Rows (label, distillation options, the paper's top-1 or None) trained for each student."""
    name: str
    paper: str  # where the paper reports it, and its setting
    students: Tuple[str, ...]
    rows: Tuple[Tuple[str, Dict[str, Any], Optional[float]], ...]
    paper_order: Tuple[str, ...]  # rows from the paper's worst to its best (its ties kept in this order)


STUDIES: Dict[str, Study] = {s.name: s for s in (
    Study('components', 'Table 9(a) (Swin-S -> ResNet-50, traditional recipe, ImageNet)', ('cnn', 'mlp', 'vit'), (
        ('student', ablation('student'), 76.55), ('kd', ablation('kd'), None), ('fd', ablation('fd'), 77.43),
        ('cap', ablation('cap'), 77.87), ('cap_dfm', ablation('cap_dfm'), 78.51),
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
    Study('projector', "the CAP's convolution: faithful vs separable (scalekd's option, not in the paper)",
          ('cnn', 'mlp', 'vit'), (
        ('student', ablation('student'), None), ('kd', ablation('kd'), None),
        ('scalekd', ablation('scalekd'), None), ('scalekd_separable', dict(cap_conv='separable'), None)),
        ()),
)}


Run = Tuple[str, str, int]  # (student, row label, seed)


def _run_config(settings: DemoSettings, student: str, label: str, options: Dict[str, Any], seed: int) -> RunConfig:
    """The config of one row's run for one student and seed (evaluated once, after the last epoch)."""
    folder = Path(settings.output) / 'runs' / student / label / f'seed{seed}'
    options = dict(options)
    cfg = run_config(dataclasses.replace(settings, seed=seed), student, options.pop('method', 'scalekd'), options,
                     output=str(folder))
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, eval_every=cfg.sched.epochs))  # no curve


def _finished(cfg: RunConfig, label: str) -> Optional[Dict[str, Any]]:
    """The result of a finished earlier run of ``cfg`` (rows of the same label share their runs across
    studies); ``None`` when there is none; an error when the folder holds another config's run."""
    done = Path(cfg.output) / 'result.json'
    if not done.is_file():
        return None
    result = json.loads(done.read_text())
    if _decisive(config_from_dict(result['config'], where=str(done))) != _decisive(cfg):  # (keys added since: defaults)
        raise ValueError(f'{cfg.output} holds a run of another config (other settings for the label {label!r}): '
                         f'move it away or use another --output')
    return result


def _train(cfg: RunConfig, test, env: DistEnv) -> Dict[str, Any]:
    """Train and test one run; its ``result.json`` is written whole or not at all."""
    run = train_and_test(cfg, test, env)
    result = dict(top1=run['top1'], seconds=run['seconds'], config=_decisive(cfg))
    write_text_atomic(Path(cfg.output) / 'result.json', json.dumps(result))
    return result


class StudyStopped(RuntimeError):
    """A study stopped before its end (a signal, a run's process that died); its finished runs are kept."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


_worker: Dict[str, Any] = {}  # a pool process's environment and test loader (set by _start_worker)


def _start_worker(study: int, stop, threads: int, test_cfg: RunConfig, device: str) -> None:
    _worker.update(study=study, stop=stop)
    if sys.platform == 'linux':  # SIGTERM when the study's process dies, however it dies: no orphan trains on
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    _exit_if_orphaned()  # the study died before the line above
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the study's to act on (a run's trainer still takes it)
    torch.set_num_threads(threads)
    keep_freed_memory()
    try:
        _worker.update(env=DistEnv(device=torch.device(device)), test=test_loader(test_cfg))
    except Exception as e:  # (data that cannot be read): the first run's error, not a process that died
        _worker['error'] = e


def _exit_if_orphaned() -> None:
    """End this pool process when the study's process is gone."""
    if os.getppid() != _worker['study']:
        os._exit(1)


def _train_in_worker(cfg: RunConfig) -> Optional[Dict[str, Any]]:
    """One run in a pool process; ``None`` when the study stopped before it started. A run a signal
    stopped ends the process (the study asked, or is gone); so does a run that ends after its study
    died (the parent-death signal may have come while the run's trainer held the signal handlers)."""
    _exit_if_orphaned()
    if _worker['stop'].is_set():
        return None
    if 'error' in _worker:
        raise _worker['error']
    try:
        return _train(cfg, _worker['test'], _worker['env'])
    except RunInterrupted:
        os._exit(1)
    finally:
        _exit_if_orphaned()


def _end_processes(processes: Sequence[multiprocessing.process.BaseProcess], grace_s: float = 60) -> None:
    """SIGTERM to each (a run under way saves its step and stops), then SIGKILL to any left after ``grace_s``."""
    for process in processes:
        process.terminate()
    deadline = time.monotonic() + grace_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


class _Terminated(Exception):
    """SIGTERM reached the study's process (raised there by the handler :func:`_train_runs` installs)."""


def _raise_terminated(signum: int, frame) -> None:
    raise _Terminated()


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Inside the block (main thread only) SIGTERM raises :class:`_Terminated`, as SIGINT raises
    ``KeyboardInterrupt``, so the study stops its runs' processes before it ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stopped(error: BaseException, unfinished: int, total: int, output: str) -> StudyStopped:
    """What stopped the study, what it lost, and how to go on."""
    if isinstance(error, BrokenProcessPool):
        cause, code = ("a run's process ended abruptly (killed; by the out-of-memory killer if memory ran short: "
                       'then use fewer --jobs)'), 1
    else:
        signum = signal.SIGTERM if isinstance(error, _Terminated) else getattr(error, 'signum', None) or signal.SIGINT
        cause, code = f'stopped by {signal.Signals(signum).name}', 128 + signum
    return StudyStopped(f'{cause}; {unfinished} of {total} runs not finished. The finished ones are kept under '
                        f'{output}: the same command trains the rest', code)


def _train_here(settings: DemoSettings, pending: Sequence[Tuple[Run, RunConfig]],
                record: Callable[[Run, Dict[str, Any]], None]) -> None:
    """Train the pending runs one after the other in this process."""
    env = DistEnv(device=settings.device)
    test = test_loader(pending[0][1]) if pending else None
    for run, cfg in pending:
        record(run, _train(cfg, test, env))


def _train_in_pool(settings: DemoSettings, pending: Sequence[Tuple[Run, RunConfig]], jobs: int,
                   record: Callable[[Run, Dict[str, Any]], None]) -> None:
    """Train the pending runs ``jobs`` at a time, each in a process of its own with ``cores // jobs``
    threads. Any error or stop (a run's error, a signal, a process that died) ends every run's process
    before it is raised: the runs the pool had queued start no training, and a run under way stops
    (the rerun trains it afresh)."""
    threads = max(1, torch.get_num_threads() // jobs)
    context = multiprocessing.get_context('spawn')
    stop = context.Event()
    before = set(multiprocessing.active_children())
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_start_worker,
                             initargs=(os.getpid(), stop, threads, pending[0][1], str(settings.device))) as pool:
        try:
            futures = {pool.submit(_train_in_worker, dataclasses.replace(cfg, log=dataclasses.replace(cfg.log, progress=False))):
                       run for run, cfg in pending}
            for future in as_completed(futures):
                record(futures[future], future.result())
        except BaseException:
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)
            _end_processes(list(set(multiprocessing.active_children()) - before))
            raise


def _train_runs(settings: DemoSettings, study: Study, runs: Sequence[Run], jobs: int,
                say: Callable[[str], None]) -> Dict[Run, Dict[str, Any]]:
    """Every run's result: finished ones read back, the others trained, ``jobs`` at a time (several
    one-thread runs use a small CPU better than one run on every core). A signal or a run's process that
    died stops the study with :class:`StudyStopped`; the finished runs' results stay on disk."""
    options = {label: opts for label, opts, _ in study.rows}
    configs = {run: _run_config(settings, run[0], run[1], options[run[1]], run[2]) for run in runs}
    results = {run: _finished(cfg, run[1]) for run, cfg in configs.items()}

    def record(run: Run, result: Dict[str, Any]) -> None:
        results[run] = result
        say(f'{study.name}: {run[0]} {run[1]} seed {run[2]}: test top-1 {result["top1"]:.2f} ({result["seconds"]:.0f} s)')
    work = [(run, configs[run]) for run in results if results[run] is None]
    with _sigterm_raises():
        try:
            if jobs <= 1 or len(work) <= 1:
                _train_here(settings, work, record)
            else:
                _train_in_pool(settings, work, jobs, record)
        except (KeyboardInterrupt, _Terminated, RunInterrupted, BrokenProcessPool) as e:
            unfinished = sum(result is None for result in results.values())
            raise _stopped(e, unfinished, len(results), settings.output) from None
    return results


def _decisive(cfg: RunConfig) -> Dict[str, Any]:
    """What decides a run's result: its config without the logging."""
    return {k: v for k, v in config_to_dict(cfg).items() if k != 'log'}


def _spread(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _paired(a: Sequence[float], b: Sequence[float]) -> Tuple[float, float]:
    diffs = [x - y for x, y in zip(a, b)]
    return statistics.mean(diffs), _spread(diffs)


def _disagreements(order: Sequence[str], means: Dict[str, float]) -> List[Tuple[str, str]]:
    """Pairs (a, b) the paper ranks a below b that ours ranks the other way."""
    return [(a, b) for i, a in enumerate(order) for b in order[i + 1:] if means[a] > means[b]]


def run_study(study: Study, settings: DemoSettings, seeds: Sequence[int] = (0, 1, 2),
              students: Optional[Sequence[str]] = None, say: Callable[[str], None] = print,
              jobs: int = 1) -> Dict[str, Any]:
    """Train (or reuse) every run of ``study``, ``jobs`` at a time; write ``<study>.json``, ``<study>.md``
    and ``<study>.png`` under ``settings.output`` and return the summary."""
    start = time.perf_counter()
    students = tuple(students or study.students)
    unknown = [s for s in students if s not in STUDENTS]
    if unknown:
        raise ValueError(f'unknown demo student(s) {", ".join(unknown)}; choose from {", ".join(STUDENTS)}')
    with holding(settings.output):  # a second command on this output is refused, not met in a run folder
        return _run_study(study, settings, seeds, students, say, jobs, start)


def _run_study(study: Study, settings: DemoSettings, seeds: Sequence[int], students: Sequence[str],
               say: Callable[[str], None], jobs: int, start: float) -> Dict[str, Any]:
    summary: Dict[str, Any] = dict(study=study.name, paper=study.paper, seeds=list(seeds), students={},
                                   settings=dict(subset=settings.subset, epochs=settings.epochs, lr=settings.lr,
                                                 batch_size=settings.batch_size, device=str(settings.device)))
    results = _train_runs(settings, study, [(student, label, seed) for student in students
                                            for label, _, _ in study.rows for seed in seeds], jobs, say)
    for student in students:
        top1 = {label: [results[student, label, seed]['top1'] for seed in seeds] for label, _, _ in study.rows}
        rows = {}
        for label, _, paper in study.rows:
            row = dict(mean=statistics.mean(top1[label]), spread=_spread(top1[label]), top1=top1[label], paper=paper)
            for ref in REFERENCES:
                row[f'vs_{ref}'], row[f'vs_{ref}_spread'] = _paired(top1[label], top1[ref])
            rows[label] = row
        means = {label: row['mean'] for label, row in rows.items()}
        summary['students'][student] = dict(
            model=STUDENTS[student]['model'], rows=rows,
            ours_order=sorted(means, key=means.get),
            disagree=_disagreements(study.paper_order, means))
    summary['seconds'] = time.perf_counter() - start
    out = Path(settings.output)
    write_text_atomic(out / f'{study.name}.json', json.dumps(summary, indent=2))
    write_text_atomic(out / f'{study.name}.md', format_study(study, summary) + '\n')
    plot_study(summary, out / f'{study.name}.png')
    return summary


def format_study(study: Study, summary: Dict[str, Any]) -> str:
    """A markdown table per student (mean top-1 +- spread over seeds, paired differences to the student
    alone and to KD), then the paper's order beside ours and where they disagree."""
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
