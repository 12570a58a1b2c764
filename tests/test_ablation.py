"""``scalekd ablate``: every study's rows train with their own options, on a tiny budget."""
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine_fixtures import make_fashion_mnist
from scalekd.cli import main
from scalekd.engine.inputs.config import load_config
from scalekd.engine.run_folder.files import RunFolder, RunFolderError
from scalekd.tools.ablation import STUDIES, format_study, run_study
from scalekd.tools.demo import DemoSettings

pytestmark = pytest.mark.slow  # 18 tiny training runs

# loss terms each row must log (and no others): the options reached the training
TERMS = {
    'student': set(), 'kd': {'kd_loss'}, 'fd': {'s4_ori'}, 'fd_kd': {'s4_ori', 'kd_loss'}, 'fd_s3_s4': {'s3_ori', 's4_ori'},
    'cap': {'s4_ori'}, 'cap_dfm': {'s4_ori', 's4_alt'}, 'cap_dual_no_phi': {'s4_ori', 's4_alt'},
    'cap_dir_alt': {'s4_ori', 's4_alt'}, 'cap_tpp': {'proxy_ori', 's4_ori'},
    'cap_dfm_tpp': {'proxy_ori', 'proxy_alt', 's4_ori', 's4_alt'},
    'scalekd': {'proxy_ori', 'proxy_alt', 's4_ori', 's4_alt', 'kd_loss'},
    **{label: {'proxy_ori', 'proxy_alt', 's4_ori', 's4_alt', 'kd_loss'}
       for label in ('scalekd_separable', 'scalekd_ffn_0.25', 'scalekd_small')},
    **{f'beta_{b}': {'proxy_ori', 'proxy_alt', 's4_ori', 's4_alt', 'kd_loss'} for b in (0.0, 0.25, 0.5, 0.75, 1.0)},
    **{f'scalekd_plr_{s}': {'proxy_ori', 'proxy_alt', 's4_ori', 's4_alt', 'kd_loss'} for s in ('0.05', '0.25', '4')},
}


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('ablate')
    data = make_fashion_mnist(tmp / 'fm', n_train=40, n_test=20)
    return DemoSettings(output=str(tmp / 'out'), subset=16, epochs=2, batch_size=8, test_sample=10, data=str(data),
                        progress=False, device=torch.device('cpu'))


def _terms(folder):
    steps = [json.loads(line) for line in (folder / 'metrics.jsonl').read_text().splitlines()]
    step = next(r for r in steps if 'task_loss' in r)
    return {k for k in step if k.endswith(('_ori', '_alt')) or k == 'kd_loss'}


@pytest.mark.parametrize('name', ['components', 'views', 'pilot', 'beta', 'projector', 'projector_lr'])
def test_every_row_of_a_study_trains_with_its_options(tiny, name):
    study = STUDIES[name]
    summary = run_study(study, tiny, seeds=(0,), students=('cnn',), say=lambda line: None)
    rows = summary['students']['cnn']['rows']
    assert list(rows) == [label for label, _, _ in study.rows]
    for label, row in rows.items():
        folder = Path(tiny.output) / 'runs' / 'cnn' / label / 'seed0'
        assert _terms(folder) == TERMS[label], label
        epochs = [json.loads(line) for line in (folder / 'metrics.jsonl').read_text().splitlines() if '"epoch"' in line]
        assert [('val_top1' in r) for r in epochs if 'train_task_loss' in r] == [False, True]  # evaluated once, at the end
        assert 0 <= row['mean'] <= 100 and row['spread'] == 0.0 and row['top1'] == [row['mean']]
        assert row['vs_student'] == pytest.approx(row['mean'] - rows['student']['mean'])
        options = load_config(folder / 'config.yaml').distill_options().resolve()
        if label in ('fd', 'fd_kd'):
            assert options.projector == 'linear' and options.stages == ('s4',) and options.kd == (label == 'fd_kd')
        if label == 'cap_dual_no_phi':
            assert options.views == 'dual'
        if label == 'cap_dir_alt':
            assert options.original_view == 'dc'
        if label.startswith('beta_'):
            beta = float(label[len('beta_'):])
            assert (options.w_ori, options.w_alt) == pytest.approx((0.14 * beta, 0.14 * (1 - beta)))
        assert options.cap_conv == ('separable' if label in ('scalekd_separable', 'scalekd_small') else 'full')
        assert options.cap_mlp_ratio == (0.25 if label in ('scalekd_ffn_0.25', 'scalekd_small') else 4.0)
        assert options.projector_lr_scale == (float(label.split('_')[-1]) if label.startswith('scalekd_plr_') else 1.0)
    out = Path(tiny.output)
    assert (out / f'{name}.png').read_bytes()[:4] == b'\x89PNG'
    table = (out / f'{name}.md').read_text()
    rows_table = table.split('\n#### ')[0]  # (an analysis adds its own tables after it)
    assert rows_table.count('\n| ') == len(rows) + 1 and format_study(study, summary) + '\n' == table
    if study.paper_order:
        assert 'paper order: ' + ' < '.join(study.paper_order) in table


def test_a_rerun_reuses_finished_runs_and_refuses_another_config_under_a_label(tiny, capsys):
    again = run_study(STUDIES['views'], tiny, seeds=(0,), students=('cnn',), say=print)
    assert capsys.readouterr().out == ''  # nothing trained again
    assert again['students']['cnn']['rows']['cap']['mean'] == json.loads(
        (Path(tiny.output) / 'runs' / 'cnn' / 'cap' / 'seed0' / 'result.json').read_text())['top1']
    assert main(['ablate', 'views', '--seeds', '0', '--students', 'cnn', '--output', tiny.output, '--epochs', '3',
                 '--subset', '16', '--data', tiny.data, '--no-progress']) == 2
    assert 'holds a run of another config' in capsys.readouterr().err


def test_runs_trained_in_parallel_processes_equal_runs_one_at_a_time(tiny, tmp_path):
    """--jobs 2: each run in a process of its own with one thread gives the result of the same run
    trained in this process with one thread; every run keeps its folder and a whole result.json."""
    study = STUDIES['pilot']
    parallel = run_study(study, dataclasses.replace(tiny, output=str(tmp_path / 'parallel')), seeds=(0,),
                         students=('cnn',), say=lambda line: None, jobs=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = run_study(study, dataclasses.replace(tiny, output=str(tmp_path / 'alone')), seeds=(0,),
                          students=('cnn',), say=lambda line: None, jobs=1)
    finally:
        torch.set_num_threads(threads)
    rows = parallel['students']['cnn']['rows']
    assert list(rows) == [label for label, _, _ in study.rows]
    assert {k: r['top1'] for k, r in rows.items()} == {k: r['top1'] for k, r in alone['students']['cnn']['rows'].items()}
    for label in rows:
        folder = tmp_path / 'parallel' / 'runs' / 'cnn' / label / 'seed0'
        assert sorted(p.name for p in folder.glob('*.json')) == ['result.json', 'scalekd-run.json']
        assert _terms(folder) == TERMS[label]


def test_ablate_refuses_a_jobs_count_below_one(capsys):
    assert main(['ablate', 'pilot', '--jobs', '0']) == 2
    assert '--jobs takes a positive number of runs, got 0' in capsys.readouterr().err


def test_a_second_study_on_the_output_of_a_live_one_is_refused_and_a_failed_one_leaves_nothing(tiny, tmp_path):
    """Studies share runs (the references, rows of the same label): a second command on a live output is
    refused at once, naming the holder, instead of meeting the first in a run folder; a study that fails
    before writing leaves no folder or lock behind."""
    settings = dataclasses.replace(tiny, output=str(tmp_path / 'out'))
    live = RunFolder(settings.output)
    live.acquire()  # as a live `scalekd ablate` does
    try:
        with pytest.raises(RunFolderError, match=rf'out is in use by another scalekd run \(pid {os.getpid()} on '):
            run_study(STUDIES['pilot'], settings, seeds=(0,), students=('cnn',), say=lambda line: None)
    finally:
        live.release()
    assert [p.name for p in (tmp_path / 'out').iterdir()] == ['.scalekd.lock']
    broken = dataclasses.replace(tiny, output=str(tmp_path / 'new' / 'out'), data=str(tmp_path / 'no-data'))
    with pytest.raises(Exception, match='no-data'):
        run_study(STUDIES['pilot'], broken, seeds=(0,), students=('cnn',), say=lambda line: None)
    assert not (tmp_path / 'new').exists()


def _pool_processes(pid: int):
    """The study's run processes (its spawned children; not the resource tracker)."""
    try:
        children = Path(f'/proc/{pid}/task/{pid}/children').read_text().split()
    except OSError:
        return []
    return [int(c) for c in children if b'spawn_main' in Path(f'/proc/{c}/cmdline').read_bytes()]


def _alive(pid: int) -> bool:
    try:
        return Path(f'/proc/{pid}/stat').read_text().split()[2] != 'Z'
    except OSError:
        return False


def _wait_until(condition, timeout: float, what: str):
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f'timed out waiting for {what}'
        time.sleep(0.2)


@pytest.mark.skipif(not Path(f'/proc/{os.getpid()}/task/{os.getpid()}/children').exists(),
                    reason='reads the process tree from /proc (CONFIG_PROC_CHILDREN)')
@pytest.mark.parametrize('stop', ['ctrl-c', 'ctrl-c while the run processes start', 'sigterm to the study',
                                  'a run process killed', 'the study killed'])
def test_a_study_stopped_while_runs_train_in_processes_leaves_no_process_and_keeps_finished_runs(tmp_path, stop):
    """``ablate --jobs 2`` stopped mid-way: Ctrl-C (exit 130; also while the run processes still import,
    before they could ignore it), SIGTERM (143) or a run's process killed (the out-of-memory killer; 1)
    end with one line that says how to go on, and no run starts after it; a killed study takes its run
    processes with it. No run process outlives the study, a finished run's result.json is whole and the
    output is free for the rerun."""
    data = make_fashion_mnist(tmp_path / 'fm', n_train=40, n_test=2000)
    out = tmp_path / 'out'
    study = subprocess.Popen(
        [sys.executable, '-m', 'scalekd.cli', 'ablate', 'pilot', '--students', 'cnn', '--seeds', '0', '--subset',
         '32', '--epochs', '30', '--data', str(data), '--output', str(out), '--no-progress', '--jobs', '2'],
        stdout=subprocess.DEVNULL, stderr=(tmp_path / 'stderr').open('w'),  # (not a pipe a stray process holds)
        start_new_session=True,  # its own process group, as a terminal gives it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # Ctrl-C live (a background shell ignores it)
    workers = []
    try:
        starting = stop == 'ctrl-c while the run processes start'
        _wait_until(lambda: len(_pool_processes(study.pid)) == 2 and (starting or any(
            p.stat().st_size for p in out.glob('runs/cnn/*/seed0/metrics.jsonl'))), 120, 'two runs training')
        workers = _pool_processes(study.pid)
        if starting:  # (importing torch takes seconds: the signal comes before a run process's first line)
            assert not list(out.glob('runs/cnn/*/seed0/metrics.jsonl'))
            os.killpg(study.pid, signal.SIGINT)
        elif stop == 'ctrl-c':
            os.killpg(study.pid, signal.SIGINT)  # the terminal sends it to every process of the group
        elif stop == 'sigterm to the study':
            study.send_signal(signal.SIGTERM)
        elif stop == 'a run process killed':
            os.kill(workers[0], signal.SIGKILL)
        else:
            study.kill()
        code = study.wait(60)
        _wait_until(lambda: not any(_alive(w) for w in workers), 30, 'the run processes to end')
    finally:
        for pid in [study.pid, *workers]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        study.wait()
    err = (tmp_path / 'stderr').read_text()
    if stop == 'the study killed':
        assert code == -signal.SIGKILL
    else:
        expected = {'ctrl-c': (130, 'stopped by SIGINT'), 'ctrl-c while the run processes start': (
            130, 'stopped by SIGINT'), 'sigterm to the study': (143, 'stopped by SIGTERM'),
                    'a run process killed': (1, "a run's process ended abruptly")}[stop]
        assert code == expected[0] and f'scalekd ablate: {expected[1]}' in err and 'Traceback' not in err, err
        assert err.rstrip().endswith('the same command trains the rest'), err
        unfinished, total = map(int, re.search(r'; (\d+) of (\d+) runs not finished', err).groups())
        assert len(list(out.glob('runs/cnn/*/seed0/result.json'))) == total - unfinished  # none trained after
    for done in out.glob('runs/cnn/*/seed0/result.json'):
        assert 0 <= json.loads(done.read_text())['top1'] <= 100
    free = RunFolder(str(out))
    free.acquire()  # no process holds the output
    free.release()


def test_data_that_cannot_be_read_is_the_runs_error_with_jobs_too(tiny, tmp_path, capsys):
    """The run processes' test loader fails: the study reports the data error in one line (exit 2), as
    in one process, not a process that died, and writes nothing."""
    assert main(['ablate', 'pilot', '--students', 'cnn', '--seeds', '0', '--data', str(tmp_path / 'missing'),
                 '--output', str(tmp_path / 'out'), '--jobs', '2', '--no-progress']) == 2
    err = capsys.readouterr().err
    assert err.startswith('scalekd ablate: error: Fashion-MNIST was not found') and 'Traceback' not in err
    assert not (tmp_path / 'out').exists()
