"""The output folder as a trust boundary: a forced run that cannot start loses nothing; no process but
the run holds its lock; retention and --force delete only what the marker says the run wrote (never
outside the folder, never a link, nothing of a folder without a marker); a lock path that is no lock
file is refused untouched; killed and damaged records recover; a resume says what it finds."""
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from engine_fixtures import tiny_config
from run_tools import start, wait_for
from scalekd.engine.run_folder.checkpoint import checkpoints_by_age, load_checkpoint
from scalekd.engine.run_folder.files import LOCK, MARKER, RunFolder, RunFolderError
from scalekd.engine.errors import RunError
from scalekd.engine.run_folder.history import RunOutput
from test_run_folder import EVERY_STEP, _refused

WRITES = ('config.yaml', 'train.log', 'metrics.jsonl', 'tensorboard')  # what the `straight` run writes


def _files(folder: Path) -> dict:
    """Every file under ``folder`` but the lock (whose holder line each run rewrites), with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob('*'))
            if p.is_file() and p.name != LOCK}


def _open(run: Path, resume=None, force=False, keep=20, writes=WRITES):
    notes = []
    out = RunOutput(str(run), keep, notes.append, writes)
    out.open(resume, force)
    return out, notes


def _copy(straight: Path, tmp_path: Path) -> Path:
    run = tmp_path / 'run'
    shutil.copytree(straight, run)
    return run


# -- 1. --force replaces the previous run only once the new one is built -----------------------------
@pytest.mark.parametrize('override', ['student.model=resnet1800', 'data.root={tmp}/no-data',
                                      'teacher.checkpoint={tmp}/teacher.pth'])
@pytest.mark.slow
def test_a_forced_run_that_cannot_start_keeps_the_previous_run(straight, data_root, tmp_path, capsys, override):
    run = _copy(straight, tmp_path)
    (tmp_path / 'teacher.pth').write_bytes(b'not a weights file')
    before = _files(run)
    cfg = tiny_config(tmp_path, data_root, train=EVERY_STEP)
    _refused(capsys, 'train', str(cfg), '--force', '-o', override.format(tmp=tmp_path))
    assert _files(run) == before


# -- 2. the lock is the run's alone -----------------------------------------------------------------
def test_a_forked_child_does_not_keep_the_lock(tmp_path):
    folder = RunFolder(str(tmp_path / 'run'))
    folder.acquire()
    up, (hold, release) = os.pipe(), os.pipe()
    child = os.fork()
    if child == 0:  # a loader worker, say: says it runs, then lives on until its pipe closes
        os.close(release)
        os.write(up[1], b'1')
        os.read(hold, 1)
        os._exit(0)
    os.close(hold)
    try:
        assert os.read(up[0], 1) == b'1'
        folder.release()  # the parent ends; its child lives on
        again = RunFolder(str(tmp_path / 'run'))
        again.acquire()
        again.release()
    finally:
        os.close(release)
        os.waitpid(child, 0)
        os.close(up[0])
        os.close(up[1])


def _children(pid: int) -> list:
    tasks = Path(f'/proc/{pid}/task')
    return [int(c) for t in tasks.iterdir() for c in (t / 'children').read_text().split()]


def _alive(pid: int) -> bool:
    try:
        return Path(f'/proc/{pid}/stat').read_text().split(') ')[1][0] != 'Z'
    except OSError:
        return False


@pytest.mark.slow
def test_the_loader_workers_of_a_killed_run_do_not_hold_its_folder(tmp_path, data_root):
    """SIGKILL to the run's process alone (an OOM kill): its loader workers live on for a while, and
    an immediate --resume auto (an elastic restart) takes the folder."""
    cfg = tiny_config(tmp_path, data_root, data=dict(workers=2), sched=dict(epochs=100),
                      train=dict(batch_size=4, accum_steps=2))
    proc = start(cfg)
    workers = []
    try:
        wait_for(tmp_path / 'run' / 'metrics.jsonl', proc)
        deadline = time.time() + 60
        while not workers and time.time() < deadline:
            workers = _children(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert [w for w in workers if _alive(w)], 'no loader worker outlived the run'
        folder = RunFolder(str(tmp_path / 'run'))
        folder.acquire()
        folder.release()
    finally:
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)
        proc.kill()
        proc.communicate()


# -- 6. --resume auto sets aside what it passed over -------------------------------------------------
def test_resume_auto_sets_aside_the_newer_checkpoints_it_passed_over(straight, tmp_path):
    run = _copy(straight, tmp_path)
    (run / 'checkpoint-0002.pth').write_bytes(b'unreadable now')
    out, notes = _open(run, 'auto')
    out.start(fresh=False)
    out.release()
    assert out.resumed_from == run / 'checkpoint-0001-000002.pth'
    aside = run / 'abandoned-after-step-5'
    assert (aside / 'checkpoint-0002.pth').read_bytes() == b'unreadable now'
    assert not (run / 'checkpoint-0002.pth').exists()
    series = [e['file'] for e in json.loads((run / MARKER).read_text())['checkpoints']]
    assert series[-1] == 'checkpoint-0001-000002.pth'
    assert any(n.startswith('passed over checkpoint') for n in notes) and any(str(aside) in n for n in notes)


# -- 8. retention deletes the run's own checkpoints only ---------------------------------------------
def test_retention_leaves_what_a_marker_lists_besides_its_own_checkpoints(tmp_path):
    run = tmp_path / 'a' / 'run'
    folder = RunFolder(str(run))
    folder.acquire()
    folder.mark(fresh=True, files=[])
    (tmp_path / 'notes.txt').write_text('mine')
    (run / 'notes.txt').write_text('mine too')
    (tmp_path / 'kept.pth').write_text('a checkpoint kept elsewhere')
    (run / 'checkpoint-0000-000001.pth').symlink_to(tmp_path / 'kept.pth')
    (run / 'checkpoint-0000-000003.pth').mkdir()
    (run / 'checkpoint-0000-000003.pth' / 'notes.txt').write_text('a folder of mine')
    marker = json.loads((run / MARKER).read_text())
    marker['checkpoints'] = [dict(file='../../notes.txt', step=0), dict(file='notes.txt', step=1),
                             dict(file='checkpoint-0000-000001.pth', step=1),
                             dict(file='checkpoint-0000-000003.pth', step=1)]
    (run / MARKER).write_text(json.dumps(marker))
    deleted = []
    for step, name in enumerate(['checkpoint-0000-000002.pth', 'checkpoint-0001.pth', 'checkpoint-0001-000001.pth'],
                                start=2):
        folder.record(run / name, step)
        (run / name).write_bytes(b'ours')
        deleted += folder.prune(keep=1)
    folder.release()
    assert deleted == ['checkpoint-0000-000002.pth', 'checkpoint-0001.pth']
    assert (tmp_path / 'notes.txt').read_text() == 'mine' and (run / 'notes.txt').read_text() == 'mine too'
    assert (run / 'checkpoint-0000-000001.pth').is_symlink() and (tmp_path / 'kept.pth').is_file()
    assert (run / 'checkpoint-0000-000003.pth' / 'notes.txt').is_file()


def test_what_a_marker_lists_besides_the_runs_files_is_reported(straight, tmp_path):
    run = _copy(straight, tmp_path)
    marker = json.loads((run / MARKER).read_text())
    marker['files'].append('../notes.txt')
    marker['checkpoints'].append(dict(file='notes.txt', step=9))
    (run / MARKER).write_text(json.dumps(marker))
    (tmp_path / 'notes.txt').write_text('mine')
    (run / 'notes.txt').write_text('mine too')
    out, notes = _open(run, force=True)
    out.start(fresh=True)
    out.release()
    assert f'{MARKER} lists ../notes.txt, notes.txt, which are no files of its run: left alone' in notes
    assert (tmp_path / 'notes.txt').read_text() == 'mine' and (run / 'notes.txt').read_text() == 'mine too'


# -- 9. the lock file -----------------------------------------------------------------------------------
@pytest.mark.parametrize('kind', ['link', 'hard link', 'other contents', 'folder'])
def test_a_lock_path_that_is_no_scalekd_lock_file_is_refused_untouched(tmp_path, data_root, capsys, kind):
    victim = tmp_path / 'victim.txt'
    victim.write_text('precious')
    run = tmp_path / 'run'
    run.mkdir()
    lock = run / LOCK
    if kind == 'link':
        lock.symlink_to(victim)
    elif kind == 'hard link':
        os.link(victim, lock)
    elif kind == 'other contents':
        lock.write_text('precious')
    else:
        lock.mkdir()
    with pytest.raises(RunFolderError, match=f'{lock} is not a scalekd lock file'):
        RunFolder(str(run)).acquire()
    assert f'{lock} is not a scalekd lock file' in _refused(capsys, 'train', str(tiny_config(tmp_path, data_root)))
    assert victim.read_text() == 'precious'
    assert lock.is_dir() if kind == 'folder' else lock.read_text() == 'precious'


# -- 10. --force deletes what the marker says the run wrote ------------------------------------------
def test_force_deletes_only_the_files_the_marker_lists(straight, tmp_path):
    run = _copy(straight, tmp_path)
    (run / 'wandb').mkdir()  # W&B was off: this is the user's
    (run / 'wandb' / 'run.txt').write_text('mine')
    listed = json.loads((run / MARKER).read_text()).get('files')
    out, notes = _open(run, force=True, writes=('config.yaml', 'train.log', 'metrics.jsonl'))
    out.start(fresh=True)
    out.release()
    assert (run / 'wandb' / 'run.txt').read_text() == 'mine'
    assert listed == sorted([*WRITES, 'best.pth'])
    assert not checkpoints_by_age(run) and not (run / 'tensorboard').exists() and not (run / 'best.pth').exists()
    assert notes[-1].startswith("--force removed the previous run's best.pth, checkpoint-0000-000001.pth")
    assert json.loads((run / MARKER).read_text())['files'] == ['best.pth', 'config.yaml', 'metrics.jsonl',
                                                               'train.log']


def test_force_deletes_nothing_of_a_folder_without_a_marker(straight, data_root, tmp_path, capsys):
    run = tmp_path / 'run'
    run.mkdir()
    shutil.copy(straight / 'checkpoint-0001.pth', run)
    before = _files(run)
    err = _refused(capsys, 'train', str(tiny_config(tmp_path, data_root)), '--force')
    assert 'holds checkpoint-0001.pth, which no scalekd run wrote there (it has no scalekd-run.json' in err
    assert 'continue from its checkpoints with --resume auto' in err
    assert _files(run) == before


def test_a_marker_from_before_the_list_of_files_counts_the_fixed_names(straight, tmp_path):
    """Runs from before the marker listed its files: --force deletes the names a run writes, as then."""
    run = _copy(straight, tmp_path)
    marker = json.loads((run / MARKER).read_text())
    marker.pop('files', None)
    (run / MARKER).write_text(json.dumps(marker))
    (run / 'notes.md').write_text('mine')
    out, _ = _open(run, force=True)
    out.start(fresh=True)
    out.release()
    assert sorted(p.name for p in run.iterdir()) == [LOCK, 'notes.md', MARKER]


# -- 12. a kill while the marker is first written -----------------------------------------------------
@pytest.mark.parametrize('resume, force', [('auto', False), (None, True), (None, False)])
def test_a_marker_write_killed_half_way_is_cleaned(tmp_path, resume, force):
    run = tmp_path / 'run'
    run.mkdir()
    (run / LOCK).write_text('pid 12 on node, started 2024-01-01 00:00:00')
    (run / f'.{MARKER}.k3j2x9.tmp').write_text('{"created": "2024-')
    out, notes = _open(run, resume, force)
    out.start(fresh=resume is None)
    out.release()
    assert f'removed unfinished writes .{MARKER}.k3j2x9.tmp' in notes
    assert sorted(p.name for p in run.iterdir()) == [LOCK, MARKER]


# -- 13. a damaged marker ---------------------------------------------------------------------------------
def test_a_damaged_marker_is_rebuilt_from_the_checkpoints_that_load(straight, tmp_path):
    run = _copy(straight, tmp_path)
    (run / MARKER).write_text('{"checkpoints": [{"file": "checkp')
    (run / 'checkpoint-0000-000001.pth').write_bytes(b'damaged')
    out, notes = _open(run, 'auto', keep=2)
    out.start(fresh=False)
    state = load_checkpoint(run / 'checkpoint-0002.pth')
    out.write(state, 'checkpoint-0002-000001.pth', 7, is_best=False)
    out.release()
    assert [p.name for p in checkpoints_by_age(run)] == [  # retention knows the older ones again
        'checkpoint-0000-000001.pth', 'checkpoint-0002.pth', 'checkpoint-0002-000001.pth']
    assert notes[0].startswith(f'{MARKER} was damaged (') and notes[0].endswith(
        'rebuilt from the 5 checkpoint(s) that load (checkpoint-0000-000002.pth, checkpoint-0001.pth, '
        'checkpoint-0001-000001.pth, checkpoint-0001-000002.pth, checkpoint-0002.pth)')


def test_force_over_a_damaged_marker_keeps_a_wandb_folder_the_run_may_not_have_written(straight, tmp_path):
    run = _copy(straight, tmp_path)
    (run / MARKER).write_text('{"files": [garb')
    (run / 'wandb').mkdir()
    (run / 'wandb' / 'offline-run.txt').write_text('a W&B run of the user')
    out, notes = _open(run, force=True, writes=('config.yaml', 'train.log', 'metrics.jsonl'))
    out.start(fresh=True)
    out.release()
    assert (run / 'wandb' / 'offline-run.txt').read_text() == 'a W&B run of the user'
    assert not (run / 'train.log').exists() and not checkpoints_by_age(run)
    assert (run / 'tensorboard').is_dir()  # neither is a TensorBoard folder a run's once its marker is damaged
    (run / MARKER).write_text('{"files": [garb')
    with pytest.raises(RunFolderError, match=r'holds tensorboard, which its run did not write'):
        _open(run, force=True)


@pytest.mark.parametrize('name', ['config.yaml', 'train.log', 'tensorboard'])
def test_a_resume_never_writes_through_a_link_named_like_a_run_file(straight, tmp_path, name):
    run = _copy(straight, tmp_path)
    target = tmp_path / 'notes'
    target.mkdir() if name == 'tensorboard' else target.write_text('the notes of the user')
    shutil.rmtree(run / name) if name == 'tensorboard' else (run / name).unlink()
    (run / name).symlink_to(target)
    before = _files(run)
    with pytest.raises(RunError, match=rf'output folder {run}: {name} is a link, and a run writes its own files '
                                       rf'there, never through a link'):
        _open(run, 'auto')
    assert _files(run) == before and (run / name).is_symlink()


def test_setting_aside_never_moves_into_a_link_or_over_an_earlier_abandoned_history(tmp_path):
    folder = RunFolder(str(tmp_path / 'run'))
    folder.acquire()
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    (elsewhere / 'checkpoint-0002.pth').write_text('a file of the user')
    (folder.path / 'abandoned-after-step-3').symlink_to(elsewhere)
    for history in ('first', 'second'):
        (folder.path / 'checkpoint-0002.pth').write_text(history)
        folder.set_aside([folder.path / 'checkpoint-0002.pth'], 3)
    folder.release()
    assert (elsewhere / 'checkpoint-0002.pth').read_text() == 'a file of the user'
    assert (folder.path / 'abandoned-after-step-3-2' / 'checkpoint-0002.pth').read_text() == 'first'
    assert (folder.path / 'abandoned-after-step-3-3' / 'checkpoint-0002.pth').read_text() == 'second'


# -- 14. what a resume finds ----------------------------------------------------------------------------
def test_resuming_another_student_says_what_the_checkpoint_holds(straight, data_root, tmp_path, capsys):
    run = tmp_path / 'run'
    run.mkdir()
    shutil.copy(straight / 'checkpoint-0001.pth', run)
    cfg = tiny_config(tmp_path, data_root, student=dict(model='resnet26'))
    err = _refused(capsys, 'train', str(cfg), '--resume', 'auto')
    assert (f'{run / "checkpoint-0001.pth"} holds a student resnet18(layers=[1, 1, 1, 1]) for 3 classes on 3 '
            f'input channel(s); this config asks for resnet26(layers=[1, 1, 1, 1]) for 3 classes on 3 input '
            f'channel(s)') in err, err



@pytest.mark.parametrize('changed, asked', [
    (dict(teacher=dict(model='vit_tiny_patch16_224', kwargs=dict(patch_size=8, embed_dim=32, depth=4, num_heads=2))),
     "teacher vit_tiny_patch16_224(depth=4, embed_dim=32, num_heads=2, patch_size=8), method scalekd at 32 px"),
    (dict(distill=dict(method='kd')),
     "teacher vit_tiny_patch16_224(depth=4, embed_dim=64, num_heads=2, patch_size=8), method kd at 32 px")])
def test_resuming_another_teacher_or_method_says_what_the_checkpoint_holds(straight, data_root, tmp_path, capsys,
                                                                            changed, asked):
    run = tmp_path / 'run'
    run.mkdir()
    shutil.copy(straight / 'checkpoint-0001.pth', run)
    err = _refused(capsys, 'train', str(tiny_config(tmp_path, data_root, **changed)), '--resume', 'auto')
    assert (f'{run / "checkpoint-0001.pth"} holds the projectors of teacher vit_tiny_patch16_224(depth=4, '
            f'embed_dim=64, num_heads=2, patch_size=8), method scalekd at 32 px; this config asks for {asked}') in err, err

def test_resume_auto_with_no_checkpoint_says_the_run_starts_afresh(tmp_path):
    out, notes = _open(tmp_path / 'run', 'auto')
    out.release()
    assert out.resumed_from is None
    assert notes == [f'--resume auto: no checkpoint in {tmp_path / "run"}, the run starts afresh']
