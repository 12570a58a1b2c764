"""Progress fit for logs: on a terminal a bar, otherwise (Slurm, ``nohup``, a file) whole lines now and then,
so that a redirected run writes no carriage return; ``log.progress`` forces either."""
import io
import os
import subprocess
import sys

import pytest
import tqdm

from engine_fixtures import tiny_config
from scalekd.engine.inputs.config import LogConfig
from scalekd.engine.loop.run_logger import ProgressLines, RunLogger


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _train(tmp_path, data_root, *overrides):
    """``scalekd train`` in a process whose stdout and stderr go to files, as under Slurm or ``nohup``."""
    cfg = tiny_config(tmp_path, data_root, log=dict(progress=None, interval=1, tensorboard=False))
    with open(tmp_path / 'stdout', 'wb') as out, open(tmp_path / 'stderr', 'wb') as err:
        code = subprocess.run([sys.executable, '-m', 'scalekd.cli', 'train', str(cfg), *overrides], stdout=out,
                              stderr=err, env=dict(os.environ, OMP_NUM_THREADS='1'), timeout=300).returncode
    assert code == 0, (tmp_path / 'stderr').read_text()[-2000:]
    return [(tmp_path / name).read_bytes() for name in ('stdout', 'stderr', 'run/train.log')]


@pytest.mark.slow
def test_a_redirected_run_writes_lines_and_no_carriage_return(tmp_path, data_root):
    stdout, stderr, log = _train(tmp_path, data_root)
    for text in (stdout, stderr, log):
        assert b'\r' not in text
    lines = stderr.decode().splitlines()
    # 24 images, batch 8: 3 steps an epoch; a line as each epoch's last step starts
    assert [line.split(',')[0] for line in lines if ' epoch ' in line] == ['run epoch 1/2: step 3/3',
                                                                         'run epoch 2/2: step 3/3']
    assert b'best top-1' in stdout  # the log lines still go to the console


@pytest.mark.slow
def test_log_progress_true_forces_the_bar(tmp_path, data_root):
    _, stderr, log = _train(tmp_path, data_root, '-o', 'log.progress=true')
    assert b'\r' in stderr and b'\r' not in log


def test_a_terminal_gets_a_bar_a_file_gets_lines_and_false_gets_nothing(monkeypatch):
    items = list(range(5))
    for progress, stream, kind in ((None, _Terminal(), tqdm.tqdm), (None, io.StringIO(), ProgressLines),
                                   (True, io.StringIO(), tqdm.tqdm), (False, _Terminal(), list)):
        monkeypatch.setattr(sys, 'stderr', stream)
        logger = RunLogger(None, LogConfig(progress=progress, console=False))
        wrapped = logger.progress(items, len(items), 'run epoch 1/1')
        assert isinstance(wrapped, kind), (progress, kind)
        assert list(wrapped) == items


def test_progress_lines_every_few_seconds_and_at_the_last_step(monkeypatch):
    clock = iter([0.0, 1.0, 31.0, 32.0, 40.0, 41.0])  # the start, then as each step starts
    monkeypatch.setattr('scalekd.engine.loop.run_logger.time.monotonic', lambda: next(clock))
    out = io.StringIO()
    lines = ProgressLines(range(5), 5, 'run epoch 1/3', every_s=30, stream=out)
    for i in lines:
        lines.set_postfix({'loss': f'{2.5 - i:.3g}'}, refresh=False)
    # step 2 starts 31 s in, step 5 is the last; each line has the terms of the step before it
    assert out.getvalue().splitlines() == ['run epoch 1/3: step 2/5, 31 s  loss 2.5',
                                           'run epoch 1/3: step 5/5, 41 s  loss -0.5']
