"""Every error path ends the run's process and its loader workers, and the error is in ``train.log``."""
import multiprocessing
import subprocess
import sys
import time

import pytest
import torch
from torch.utils.data import Dataset

from engine_fixtures import make_image_folder, tiny_config
from scalekd.engine.inputs.data import EndingLoader
from scalekd.engine.loop.faults import ignore_stop_signals


class _UnreadableAt(Dataset):
    """Eight samples; the fourth cannot be read."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> torch.Tensor:
        if index == 3:
            raise OSError('cannot identify image file 3.png')
        return torch.zeros(2)


def _batches(loader) -> None:
    for _ in loader:
        pass


def test_a_failed_iteration_ends_the_loader_workers_at_once():
    """The workers ignore SIGTERM (a scheduler's stop is the trainer's to act on), so workers left to
    the interpreter's exit are joined forever: the failed iteration ends them itself."""
    before = set(multiprocessing.active_children())
    loader = EndingLoader(_UnreadableAt(), batch_size=2, num_workers=2, worker_init_fn=ignore_stop_signals)
    try:
        with pytest.raises(OSError, match='cannot identify image file 3.png'):
            _batches(loader)
        deadline = time.monotonic() + 10
        while set(multiprocessing.active_children()) - before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert set(multiprocessing.active_children()) - before == set()
    finally:
        for worker in set(multiprocessing.active_children()) - before:
            worker.kill()


@pytest.mark.slow
def test_a_run_that_meets_an_unreadable_image_in_a_worker_ends_and_logs_it(tmp_path):
    data = make_image_folder(tmp_path / 'data', train_per_class=8, val_per_class=4)
    (data / 'train' / 'red' / '3.png').write_bytes(b'\x89PNG\r\n\x1a\n not an image')
    cfg = tiny_config(tmp_path, data, data=dict(workers=2, check_images=False))
    run = subprocess.run([sys.executable, '-m', 'scalekd.cli', 'train', str(cfg)], capture_output=True, text=True,
                         timeout=240)
    line = f"unreadable image {data / 'train' / 'red' / '3.png'}"
    assert run.returncode == 2, run.stderr[-3000:]
    assert run.stderr.strip().splitlines()[-1].startswith(f'scalekd train: error: {line}')
    assert f'stopped by an error: {line}' in (tmp_path / 'run' / 'train.log').read_text()


_FAILING_LOOP = """
import sys
from scalekd.cli import main
from scalekd.engine.loop.epoch_loop import EpochLoop
micro_step = EpochLoop._micro_step
def failing(self, *args, **kwargs):
    if self.progress.updates == 1:
        raise ValueError('too many values to unpack (expected 2)')
    return micro_step(self, *args, **kwargs)
EpochLoop._micro_step = failing
sys.exit(main(['train', sys.argv[1]]))
"""


@pytest.mark.slow
def test_a_defect_raised_in_the_loop_body_ends_the_run_and_its_workers(tmp_path):
    """A programming error of the loop (not of the loader) keeps its traceback, exits 1 and ends the
    loader's workers, whose iterator the traceback's frames hold."""
    data = make_image_folder(tmp_path / 'data', train_per_class=8, val_per_class=4)
    cfg = tiny_config(tmp_path, data, data=dict(workers=2), train=dict(accum_steps=2))
    run = subprocess.run([sys.executable, '-c', _FAILING_LOOP, str(cfg)], capture_output=True, text=True,
                         timeout=240)
    assert run.returncode == 1, run.stderr[-3000:]
    assert 'Traceback' in run.stderr and run.stderr.strip().endswith('ValueError: too many values to unpack '
                                                                     '(expected 2)'), run.stderr[-3000:]
