"""The output folder: one writer at a time, --force deletes only a run's own files, retention never
deletes a file the run did not write, best.pth stays consistent with the run after a kill."""
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from engine_fixtures import tiny_config
from run_tools import finish, metrics, start, step_lines, wait_for
from scalekd.engine.run_folder.checkpoint import checkpoints_by_age, load_checkpoint, save_checkpoint
from scalekd.cli import main
from scalekd.engine.run_folder.files import MARKER, RunFolder, RunFolderError
import scalekd.engine.run_folder.history as engine

EVERY_STEP = dict(checkpoint_every_steps=1, keep_checkpoints=20)


def _refused(capsys, *argv) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1, err
    return err


def _files(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


# -- one writer ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_second_run_on_a_live_folder_is_refused_and_the_first_finishes_intact(tmp_path, data_root, capsys):
    cfg = tiny_config(tmp_path, data_root, sched=dict(epochs=4))
    first = start(cfg)
    wait_for(tmp_path / 'run' / 'metrics.jsonl', first)
    for extra in ([], ['--resume', 'auto'], ['--force']):
        err = _refused(capsys, 'train', str(cfg), *extra)
        assert 'is in use by another scalekd run (pid' in err and f'pid {first.pid} on' in err, err
    finish(first)
    assert [r['step'] for r in step_lines(tmp_path / 'run')] == list(range(1, 13))  # each step once
    assert load_checkpoint(tmp_path / 'run' / 'checkpoint-0004.pth')['progress']['step'] == 12


def test_the_lock_of_a_killed_run_does_not_stick(tmp_path, data_root):
    folder = RunFolder(str(tmp_path / 'run'))
    folder.acquire()
    with pytest.raises(RunFolderError, match='in use by another scalekd run'):
        RunFolder(str(tmp_path / 'run')).acquire()
    folder.release()  # what the kernel does for a killed process
    again = RunFolder(str(tmp_path / 'run'))
    again.acquire()
    again.release()


# -- --force and where a run may write ------------------------------------------------------------
@pytest.mark.slow
def test_force_deletes_only_the_previous_runs_files(tmp_path, data_root):
    cfg = tiny_config(tmp_path, data_root, sched=dict(epochs=1), train=EVERY_STEP)
    assert main(['train', str(cfg)]) == 0
    run = tmp_path / 'run'
    (run / 'notes.md').write_text('what I tried')
    (run / 'results').mkdir()
    (run / 'results' / 'table.csv').write_text('a,b')
    (run / '.checkpoint-0000-000002.pth.x1.tmp').write_bytes(b'killed write')
    mine = {k: v for k, v in _files(run).items() if k in ('notes.md', 'results/table.csv')}
    cfg = tiny_config(tmp_path, data_root, sched=dict(epochs=1))
    assert main(['train', str(cfg), '--force']) == 0
    assert {k: v for k, v in _files(run).items() if k in mine} == mine
    assert [p.name for p in checkpoints_by_age(run)] == ['checkpoint-0001.pth']  # the old mid-epoch ones are gone
    assert not [f for f in os.listdir(run) if f.endswith('.tmp')]
    assert "--force removed the previous run's" in (run / 'train.log').read_text()


def test_files_that_no_run_wrote_are_never_overwritten(tmp_path, data_root, capsys):
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'config.yaml').write_text('my own notes, not a scalekd run\n')
    (run / 'data.csv').write_text('1,2,3')
    before = _files(run)
    cfg = tiny_config(tmp_path, data_root)
    for extra in ([], ['--force'], ['--resume', 'auto']):
        err = _refused(capsys, 'train', str(cfg), *extra)
        assert 'holds config.yaml, which no scalekd run wrote there' in err, err
    (run / 'train.log').write_text('my own log')  # a config.yaml beside a train.log is no run either
    before = _files(run)
    for extra in ([], ['--force'], ['--resume', 'auto']):
        err = _refused(capsys, 'train', str(cfg), *extra)
        assert 'holds config.yaml, train.log, which no scalekd run wrote there' in err, err
    assert _files(run) == before  # not even a lock file is left


@pytest.mark.parametrize('output', ['', '.', '~', '/'])
def test_the_current_home_and_root_folders_are_refused_as_outputs(tmp_path, data_root, capsys, monkeypatch, output):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'keep.txt').write_text('mine')
    cfg = tiny_config(tmp_path, data_root, output=output)
    err = _refused(capsys, 'train', str(cfg), '--force')
    assert ('output is empty' in err) if output == '' else ('a run needs a folder of its own' in err), err
    assert sorted(os.listdir(tmp_path)) == ['config.yaml', 'keep.txt']


def test_an_output_under_a_file_is_refused(tmp_path, data_root, capsys):
    (tmp_path / 'taken').write_text('a file')
    cfg = tiny_config(tmp_path, data_root, output=str(tmp_path / 'taken' / 'run'))
    assert 'taken is a file' in _refused(capsys, 'train', str(cfg))


def test_a_failed_start_leaves_no_folder_behind(tmp_path, data_root, capsys):
    cfg = tiny_config(tmp_path, data_root, output=str(tmp_path / 'new' / 'run'), student=dict(model='resnet1800'))
    assert 'unknown student model' in _refused(capsys, 'train', str(cfg))
    assert not (tmp_path / 'new').exists()


# -- retention -------------------------------------------------------------------------------------
def test_pruning_keeps_good_checkpoints_when_damaged_ones_are_numbered_above(straight, data_root, tmp_path,
                                                                           monkeypatch):
    """Two damaged checkpoints numbered above the good one, keep 2, killed right after a mid-epoch
    checkpoint is written: every good checkpoint survives, the resume continues from the newest."""
    run = tmp_path / 'run'
    run.mkdir()
    save_checkpoint(load_checkpoint(straight / 'checkpoint-0001.pth'), run / 'checkpoint-0001.pth')
    for name in ('checkpoint-0009.pth', 'checkpoint-0009-000001.pth'):
        (run / name).write_bytes(b'damaged')
    cfg = tiny_config(tmp_path, data_root, train=dict(checkpoint_every_steps=1, keep_checkpoints=2))
    save = engine.save_checkpoint

    def killed_after(state, path):
        save(state, path)
        if Path(path).name == 'checkpoint-0001-000002.pth':
            raise _Killed()
    monkeypatch.setattr(engine, 'save_checkpoint', killed_after)
    with pytest.raises(_Killed):
        main(['train', str(cfg), '--resume', 'auto', '--deterministic'])
    monkeypatch.setattr(engine, 'save_checkpoint', save)
    assert main(['train', str(cfg), '--resume', 'auto', '--deterministic']) == 0
    log = (run / 'train.log').read_text()
    assert f'resumed from {run / "checkpoint-0001-000002.pth"} at epoch 1 + 2 updates, step 5' in log
    assert 'checkpoint-0009.pth cannot be loaded safely' in log  # passed over, named, set aside
    assert [p.name for p in checkpoints_by_age(run)] == [  # the copied one, the resumed-from one, the newest
        'checkpoint-0001.pth', 'checkpoint-0001-000002.pth', 'checkpoint-0002.pth']
    assert (run / 'abandoned-after-step-3' / 'checkpoint-0009.pth').read_bytes() == b'damaged'
    final, reference = load_checkpoint(run / 'checkpoint-0002.pth'), load_checkpoint(straight / 'checkpoint-0002.pth')
    for key, value in reference['student'].items():
        assert torch.equal(value, final['student'][key]), key


def test_retention_deletes_the_oldest_of_the_runs_own_series(tmp_path):
    folder = RunFolder(str(tmp_path / 'run'))
    folder.acquire()
    folder.mark(fresh=True, files=[])
    (folder.path / 'checkpoint-0000-000001.pth').write_bytes(b'not ours')
    deleted = []
    for step, name in enumerate(['checkpoint-0000-000002.pth', 'checkpoint-0001.pth', 'checkpoint-0001-000001.pth',
                                 'checkpoint-0001-000002.pth'], start=2):
        folder.record(folder.path / name, step)
        (folder.path / name).write_bytes(b'ours')
        deleted.append(folder.prune(keep=2, protect=[folder.path / 'checkpoint-0000-000002.pth']))
    folder.release()
    assert deleted == [[], [], [], ['checkpoint-0001.pth']]  # the protected one stays, the foreign one too
    assert [p.name for p in checkpoints_by_age(folder.path)] == [
        'checkpoint-0000-000001.pth', 'checkpoint-0000-000002.pth', 'checkpoint-0001-000001.pth',
        'checkpoint-0001-000002.pth']


@pytest.mark.slow
def test_keep_checkpoints_zero_keeps_all_and_negative_is_refused(tmp_path, data_root, capsys):
    cfg = tiny_config(tmp_path, data_root, train=dict(checkpoint_every_steps=1, keep_checkpoints=0))
    err = _refused(capsys, 'train', str(cfg), '-o', 'train.keep_checkpoints=-1')
    assert 'train.keep_checkpoints in ' in err and 'must be >= 0 (0 keeps every checkpoint), got -1' in err
    assert main(['train', str(cfg)]) == 0
    assert len(checkpoints_by_age(tmp_path / 'run')) == 6
    listed = json.loads((tmp_path / 'run' / MARKER).read_text())['checkpoints']
    assert [e['step'] for e in listed] == [1, 2, 3, 4, 5, 6]


# -- best.pth -------------------------------------------------------------------------------------
class _Killed(BaseException):
    """Stands for SIGKILL inside the process."""


@pytest.mark.slow
def test_a_kill_between_the_epoch_checkpoint_and_best_pth_leaves_them_consistent(tmp_path, data_root, monkeypatch):
    cfg = tiny_config(tmp_path, data_root, train=EVERY_STEP)
    run = tmp_path / 'run'
    save = engine.save_checkpoint

    def killed_at_best(state, path):
        if Path(path).name == 'best.pth':
            raise _Killed()
        save(state, path)
    monkeypatch.setattr(engine, 'save_checkpoint', killed_at_best)
    with pytest.raises(_Killed):
        main(['train', str(cfg)])
    monkeypatch.setattr(engine, 'save_checkpoint', save)
    assert (run / 'checkpoint-0001.pth').is_file() and not (run / 'best.pth').exists()
    assert main(['train', str(cfg), '--resume', 'auto']) == 0
    assert 'best.pth rewritten from the resumed checkpoint (epoch 1)' in (run / 'train.log').read_text()
    final, best = load_checkpoint(run / 'checkpoint-0002.pth'), load_checkpoint(run / 'best.pth')
    assert best['progress']['best_step'] == final['progress']['best_step']
    at_best = load_checkpoint(run / ('checkpoint-0001.pth' if final['progress']['best_epoch'] == 1 else
                                     'checkpoint-0002.pth'))
    for key, value in at_best['student'].items():
        assert torch.equal(value, best['student'][key]), key
    assert set(best) == {'format_version', 'progress', 'student', 'ema', 'config'}  # what eval / export need


def test_best_pth_is_what_eval_and_export_need(straight, tmp_path, data_root):
    best, full = (straight / 'best.pth').stat().st_size, (straight / 'checkpoint-0002.pth').stat().st_size
    assert best < full / 3  # no optimizer, projectors, RNG
    assert main(['export', str(straight / 'best.pth'), '--out', str(tmp_path / 'export')]) == 0
    assert main(['eval', str(straight / 'best.pth'), '--data', str(data_root / 'val'), '--workers', '0']) == 0


@pytest.mark.slow
def test_resume_rewinds_metrics_to_the_checkpoint(straight, data_root, tmp_path):
    run = tmp_path / 'run'
    run.mkdir()
    save_checkpoint(load_checkpoint(straight / 'checkpoint-0000-000002.pth'), run / 'checkpoint-0000-000002.pth')
    lines = (straight / 'metrics.jsonl').read_text().splitlines()
    (run / 'metrics.jsonl').write_text('\n'.join(lines) + '\n{"step": 9, "torn')  # 6 steps logged, a torn line
    shutil.copytree(straight / 'tensorboard', run / 'tensorboard')  # and their TensorBoard events
    cfg = tiny_config(tmp_path, data_root, train=EVERY_STEP)
    assert main(['train', str(cfg), '--resume', 'auto', '--deterministic']) == 0
    assert [r['step'] for r in step_lines(run)] == [1, 2, 3, 4, 5, 6]
    assert len(metrics(run)) == len(lines)
    events = EventAccumulator(str(run / 'tensorboard'))
    events.Reload()
    assert [e.step for e in events.Scalars('train/loss')] == [1, 2, 3, 4, 5, 6]  # steps 3-6 purged, then redone


def test_an_output_that_cannot_be_written_is_one_line(tmp_path, data_root, capsys, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(30, 'Read-only file system')
    monkeypatch.setattr('scalekd.engine.run_folder.files._open_lock', read_only)
    err = _refused(capsys, 'train', str(tiny_config(tmp_path, data_root)))
    assert f'output folder {tmp_path / "run"} cannot be written: Read-only file system' in err


def test_force_leaves_a_link_the_run_did_not_write(tmp_path, data_root):
    cfg = tiny_config(tmp_path, data_root, sched=dict(epochs=1), log=dict(tensorboard=False))
    assert main(['train', str(cfg)]) == 0
    assert json.loads((tmp_path / 'run' / MARKER).read_text())['files'] == [
        'best.pth', 'config.yaml', 'metrics.jsonl', 'train.log']  # no tensorboard/: it was off
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    (elsewhere / 'events').write_text('keep')
    (tmp_path / 'run' / 'tensorboard').symlink_to(elsewhere)
    assert main(['train', str(cfg), '--force']) == 0
    assert (elsewhere / 'events').read_text() == 'keep' and (tmp_path / 'run' / 'tensorboard').is_symlink()


def test_resume_of_a_folder_says_what_to_give(tmp_path, data_root, capsys):
    err = _refused(capsys, 'train', str(tiny_config(tmp_path, data_root)), '--resume', str(tmp_path))
    assert 'is a folder: give one of its checkpoint-*.pth' in err


# -- rewinding and changing settings ------------------------------------------------------------------
@pytest.mark.slow
def test_resuming_an_older_checkpoint_sets_the_later_history_aside(straight, data_root, tmp_path):
    run = tmp_path / 'run'
    shutil.copytree(straight, run)
    cfg = tiny_config(tmp_path, data_root, train=EVERY_STEP)
    later = ['checkpoint-0001-000001.pth', 'checkpoint-0001-000002.pth', 'checkpoint-0002.pth']
    old = {n: (run / n).read_bytes() for n in later}
    assert main(['train', str(cfg), '--resume', str(run / 'checkpoint-0001.pth'), '--deterministic']) == 0
    aside = run / 'abandoned-after-step-3'
    assert {n: (aside / n).read_bytes() for n in later} == old  # kept, out of the way
    assert 'abandoned history moved to' in (run / 'train.log').read_text()
    series = [e['file'] for e in json.loads((run / MARKER).read_text())['checkpoints']]
    assert series[-3:] == later and all((run / n).read_bytes() != old[n] for n in later)  # rewritten anew
    assert [r['step'] for r in step_lines(run)] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_a_resumed_run_uses_the_learning_rate_and_length_it_is_given(straight, data_root, tmp_path):
    run = tmp_path / 'run'
    run.mkdir()
    save_checkpoint(load_checkpoint(straight / 'checkpoint-0001.pth'), run / 'checkpoint-0001.pth')
    cfg = tiny_config(tmp_path, data_root, optim=dict(lr=0.5), sched=dict(epochs=3))
    assert main(['train', str(cfg), '--resume', 'auto']) == 0
    lrs = {r['step']: r['lr'] for r in step_lines(run)}
    assert sorted(lrs) == list(range(4, 10))  # 3 epochs of 3 steps now
    for step, lr in lrs.items():  # timm's cosine from 0.5 over 9 updates, by hand
        assert lr == pytest.approx(0.25 * (1 + math.cos(math.pi * step / 9)), abs=1e-9), step
    assert 'settings changed since the checkpoint, applied: optim.lr: 0.05 -> 0.5; sched.epochs: 2 -> 3' in \
        (run / 'train.log').read_text()


def test_a_best_epoch_that_cannot_be_restored_is_tracked_afresh(straight, data_root, tmp_path):
    run = tmp_path / 'run'
    run.mkdir()
    save_checkpoint(load_checkpoint(straight / 'checkpoint-0001-000001.pth'), run / 'checkpoint-0001-000001.pth')
    cfg = tiny_config(tmp_path, data_root)
    assert main(['train', str(cfg), '--resume', 'auto']) == 0
    assert 'the best epoch is tracked afresh from here' in (run / 'train.log').read_text()
    best, final = load_checkpoint(run / 'best.pth'), load_checkpoint(run / 'checkpoint-0002.pth')
    assert best['progress']['best_epoch'] == final['progress']['best_epoch'] == 2
    for key, value in final['student'].items():
        assert torch.equal(value, best['student'][key]), key
