"""The output folder as a trust boundary: no process but the run holds its lock; a lock path that is
no lock file is refused untouched."""
import os
import signal
import time
from pathlib import Path

import pytest

from engine_fixtures import tiny_config
from run_tools import start, wait_for
from scalekd.cli import main
from scalekd.engine.run_folder import LOCK, RunFolder, RunFolderError


def _refused(capsys, *argv) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1, err
    return err


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
