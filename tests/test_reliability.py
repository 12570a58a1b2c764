"""Runs survive crashes, checkpoints are never corrupt, bad input is refused clearly."""
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine_fixtures import make_image_folder, tiny_config
import scalekd.checkpoint as checkpoint_module
from scalekd import build_distiller
from scalekd.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from scalekd.cli import main
from scalekd.distiller import Distiller
from scalekd.weights import WeightsError, read_state_dict
from tiny_models import IMG, make_teacher


@pytest.fixture(scope='module')
def straight(tmp_path_factory, data_root):
    """An uninterrupted, deterministic run that checkpoints every step."""
    tmp = tmp_path_factory.mktemp('straight')
    cfg = tiny_config(tmp, data_root, train=dict(checkpoint_every_steps=1, keep_checkpoints=20))
    assert main(['train', str(cfg), '--deterministic']) == 0
    return tmp / 'run'


def _run(cfg, *extra):
    return subprocess.Popen([sys.executable, '-m', 'scalekd.cli', 'train', str(cfg), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc, timeout=300):
    """Until ``path`` exists and is not empty (a line of metrics, a whole checkpoint)."""
    deadline = time.time() + timeout
    while not (path.exists() and path.stat().st_size > 0):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.02)


def _assert_same_final_state(a: Path, b: Path):
    sa, sb = load_checkpoint(a / 'checkpoint-0002.pth'), load_checkpoint(b / 'checkpoint-0002.pth')
    for key, value in sa['student'].items():
        assert torch.equal(value, sb['student'][key]), key
    for key, value in sa['task_state']['distill'].items():
        assert torch.equal(value, sb['task_state']['distill'][key]), key
    strip = lambda h: [{k: v for k, v in r.items() if k != 'train_img_per_s'} for r in h]  # noqa: E731
    assert strip(sa['progress']['history']) == strip(sb['progress']['history'])  # same metrics, train means too


# -- 1. atomic checkpoints -------------------------------------------------------------------
def test_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / 'checkpoint-0001.pth'
    save_checkpoint({'w': torch.ones(3)}, path)

    def full_disk(obj, f):
        f.write(b'partial bytes')
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(checkpoint_module.torch, 'save', full_disk)
    with pytest.raises(OSError, match='No space left'):
        save_checkpoint({'w': torch.zeros(3)}, path)
    assert torch.equal(load_checkpoint(path)['w'], torch.ones(3))
    assert os.listdir(tmp_path) == ['checkpoint-0001.pth']  # no temporary file left behind


def test_resume_auto_skips_a_torn_newest_checkpoint(tmp_path):
    save_checkpoint({'w': torch.ones(3)}, tmp_path / 'checkpoint-0001.pth')
    save_checkpoint({'w': torch.ones(3)}, tmp_path / 'checkpoint-0001-000002.pth')
    full = (tmp_path / 'checkpoint-0001-000002.pth').read_bytes()
    (tmp_path / 'checkpoint-0002.pth').write_bytes(full[:len(full) // 2])  # a write killed half-way
    assert latest_checkpoint(tmp_path) == tmp_path / 'checkpoint-0001-000002.pth'


# -- 2. crash and resume -------------------------------------------------------------------
def test_sigkill_at_a_random_step_then_resume_gives_the_same_run(straight, data_root, tmp_path):
    cfg = tiny_config(tmp_path, data_root, train=dict(checkpoint_every_steps=1, keep_checkpoints=20))
    step = random.Random(os.getpid()).randint(1, 5)  # 6 steps in all: 3 per epoch
    epoch, batch = divmod(step, 3)
    name = f'checkpoint-{epoch:04d}.pth' if batch == 0 else f'checkpoint-{epoch:04d}-{batch:06d}.pth'
    proc = _run(cfg, '--deterministic')
    _wait_for(tmp_path / 'run' / name, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / 'run' / 'checkpoint-0002.pth').exists()
    assert main(['train', str(cfg), '--resume', 'auto', '--deterministic']) == 0
    _assert_same_final_state(straight, tmp_path / 'run')


def test_sigterm_saves_a_checkpoint_and_exits(data_root, tmp_path):
    cfg = tiny_config(tmp_path, data_root, sched=dict(epochs=3))
    proc = _run(cfg)
    _wait_for(tmp_path / 'run' / 'metrics.jsonl', proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert 'stopped by signal 15' in err and 'continue with --resume auto' in err
    saved = latest_checkpoint(tmp_path / 'run')
    assert saved is not None
    progress = load_checkpoint(saved)['progress']
    assert progress['step'] >= 1
    assert main(['train', str(cfg), '--resume', 'auto']) == 0
    assert load_checkpoint(tmp_path / 'run' / 'checkpoint-0003.pth')['progress']['step'] == 9


# -- 3. safe loading -----------------------------------------------------------------------
class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_a_checkpoint_that_runs_code_on_load_is_refused(tmp_path, capsys):
    marker = tmp_path / 'pwned'
    evil = tmp_path / 'checkpoint-0001.pth'
    torch.save({'student': {'w': torch.ones(1)}, 'payload': _Exploit(marker)}, evil)
    with pytest.raises(CheckpointError, match=r'checkpoint-0001.pth cannot be loaded safely'):
        load_checkpoint(evil)
    with pytest.raises(WeightsError, match=r'cannot be loaded safely \(weights_only\)'):
        read_state_dict(evil)
    assert main(['eval', str(evil), '--data', str(tmp_path)]) == 2
    assert 'cannot be loaded safely' in capsys.readouterr().err
    assert latest_checkpoint(tmp_path) is None
    assert not marker.exists()


# -- 4. bad input, refused before training -----------------------------------------------------
def _refused(cfg_path, capsys, *extra):
    code = main(['train', str(cfg_path), *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.count('\n') == 1, err  # one message
    assert not (Path(cfg_path).parent / 'run').exists()  # nothing half-written
    return err


def test_empty_class_folder(tmp_path, capsys):
    root = make_image_folder(tmp_path / 'data', train_per_class=2, val_per_class=1)
    (root / 'train' / 'purple').mkdir()
    err = _refused(tiny_config(tmp_path, root), capsys)
    assert 'class folder' in err and 'train/purple holds no images' in err


def test_corrupt_and_truncated_images_are_named_or_skipped(tmp_path, capsys):
    root = make_image_folder(tmp_path / 'data', train_per_class=4, val_per_class=2)
    png = root / 'train' / 'red' / '1.png'
    png.write_bytes(png.read_bytes()[:60])  # truncated
    (root / 'train' / 'green' / 'junk.jpg').write_bytes(b'not an image at all')
    err = _refused(tiny_config(tmp_path, root), capsys)
    assert '2 unreadable image(s)' in err and 'red/1.png' in err and 'green/junk.jpg' in err
    assert 'data.skip_unreadable: true' in err
    cfg = tiny_config(tmp_path, root, data=dict(skip_unreadable=True), sched=dict(epochs=1))
    assert main(['train', str(cfg)]) == 0
    assert '2 unreadable image(s) skipped' in (tmp_path / 'run' / 'train.log').read_text()


def test_unknown_model_and_unmatched_shapes(tmp_path, data_root, capsys):
    err = _refused(tiny_config(tmp_path, data_root, teacher=dict(model='vit_tiny_patch16_2240')), capsys)
    assert "unknown teacher model 'vit_tiny_patch16_2240'" in err and 'did you mean vit_tiny_patch16_224' in err
    err = _refused(tiny_config(tmp_path, data_root, distill=dict(method='scalekd', s3_heads=5)), capsys)
    assert 'num_heads=5 does not divide the teacher width 64' in err
    with pytest.raises(ValueError, match=r'teacher vit_tiny_patch16_224 \(VisionTransformer\) cannot run at 48x48'):
        build_distiller(make_teacher('vit', IMG), 'resnet18', img_size=48)


def test_wrong_value_type_and_unknown_key(tmp_path, data_root, capsys):
    err = _refused(tiny_config(tmp_path, data_root), capsys, '-o', 'optim.lr=fast')
    assert 'optim.lr in' in err and "must be float, got str 'fast'" in err
    err = _refused(tiny_config(tmp_path, data_root), capsys, '-o', 'optim.learning_rate=0.1')
    assert "unknown config key 'optim.learning_rate'" in err


# -- 5. numerical faults -------------------------------------------------------------------
@pytest.fixture
def nan_at_step_2(monkeypatch):
    forward = Distiller.forward
    calls = {'n': 0}

    def poisoned(self, input, target):
        out = forward(self, input, target)
        calls['n'] += 1
        if calls['n'] == 2:
            out['s4_ori'] = out['s4_ori'] * float('nan')
            out['loss'] = out['loss'] + out['s4_ori']
        return out
    monkeypatch.setattr(Distiller, 'forward', poisoned)


def test_nan_loss_stops_with_step_term_and_checkpoint(tmp_path, data_root, capsys, nan_at_step_2):
    cfg = tiny_config(tmp_path, data_root)
    assert main(['train', str(cfg)]) == 2
    err = capsys.readouterr().err
    assert 'non-finite loss at epoch 1, step 2 in term(s) loss, s4_ori' in err
    saved = tmp_path / 'run' / 'checkpoint-0000-000001.pth'
    assert str(saved) in err and load_checkpoint(saved)['progress']['step'] == 1


def test_max_nan_skips_skips_bounded_bad_steps(tmp_path, data_root, nan_at_step_2):
    cfg = tiny_config(tmp_path, data_root)
    assert main(['train', str(cfg), '--max-nan-skips', '1']) == 0
    assert 'batch skipped (1/1 skips used)' in (tmp_path / 'run' / 'train.log').read_text()
    state = load_checkpoint(tmp_path / 'run' / 'checkpoint-0002.pth')
    assert state['progress']['nan_skips'] == 1 and state['progress']['step'] == 6  # the schedule keeps its length


# -- 6. distributed faults -------------------------------------------------------------------
def _torchrun(cfg, *extra, port):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
                             '--master_port', str(port), '-m', 'scalekd.cli', 'train', str(cfg), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _rank_pid(rank: int) -> int:
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            environ = Path(f'/proc/{pid}/environ').read_bytes().split(b'\0')
            cmd = Path(f'/proc/{pid}/cmdline').read_bytes()
        except OSError:
            continue
        if b'scalekd.cli' in cmd and f'RANK={rank}'.encode() in environ and b'torch.distributed.run' not in cmd:
            return int(pid)
    raise AssertionError(f'rank {rank} not found')


def test_a_dead_rank_stops_the_others_in_bounded_time(tmp_path, data_root):
    cfg = tiny_config(tmp_path, data_root, sched=dict(epochs=50))
    proc = _torchrun(cfg, port=29531)
    _wait_for(tmp_path / 'run' / 'metrics.jsonl', proc)
    os.kill(_rank_pid(1), signal.SIGKILL)
    start = time.time()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.time() - start < 120
    assert 'scalekd.cli FAILED' in err or 'ChildFailedError' in err, err[-2000:]


def test_resume_with_another_process_count_keeps_batch_and_schedule(straight, data_root, tmp_path):
    (tmp_path / 'run').mkdir()
    first = load_checkpoint(straight / 'checkpoint-0001.pth')
    save_checkpoint(first, tmp_path / 'run' / 'checkpoint-0001.pth')
    cfg = tiny_config(tmp_path, data_root, train=dict(checkpoint_every_steps=1, keep_checkpoints=20))
    proc = _torchrun(cfg, '--resume', 'auto', port=29533)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    lines = [json.loads(l) for l in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
    reference = {r['step']: r['lr'] for r in map(json.loads, (straight / 'metrics.jsonl').read_text().splitlines())
                 if 'val_top1' not in r}
    steps = [r for r in lines if 'val_top1' not in r]
    assert [r['step'] for r in steps] == [4, 5, 6]
    for r in steps:
        assert r['lr'] == pytest.approx(reference[r['step']])


# -- 7. determinism ------------------------------------------------------------------------
def test_deterministic_runs_are_bit_identical(straight, data_root, tmp_path):
    cfg = tiny_config(tmp_path, data_root, train=dict(checkpoint_every_steps=1, keep_checkpoints=20))
    assert main(['train', str(cfg), '--deterministic']) == 0
    _assert_same_final_state(straight, tmp_path / 'run')
