"""Runs survive crashes, checkpoints are never corrupt, bad input is refused clearly."""
import json
import os
import pathlib
import random
import signal
from pathlib import Path

import pytest
import torch
from timm.data import IMAGENET_DEFAULT_MEAN

from engine_fixtures import make_image_folder, tiny_config
from run_tools import computed, kill_group, metrics, start, step_lines, wait_for
import scalekd.engine.run_folder.checkpoint as checkpoint_module
from scalekd import build_distiller
from scalekd.engine.run_folder.checkpoint import (FORMAT_VERSION, CheckpointError, checkpoint_name, latest_checkpoint, load_checkpoint,
                                save_checkpoint)
from scalekd.engine.run_folder.checkpoint import rng_state, set_rng_state
from scalekd.cli import main
from scalekd.engine.inputs.config import DataConfig, load_config
from scalekd.engine.inputs.data import Datasets, build_loaders, seed_epoch
from scalekd.engine.runtime.distributed import DistEnv
from scalekd.engine.runtime.optimizer import optimizer_step
from scalekd.engine.runtime.determinism import enable_determinism
from scalekd.task.distiller import Distiller
from scalekd.tools.export import export_student
from scalekd.adapters.models import create_timm_model
from scalekd.adapters.common import UnsupportedModelError
from scalekd.engine.inputs.weights import WeightsError, read_state_dict
from tiny_models import IMG, make_teacher


def _run(cfg, *extra):
    return start(cfg, *extra)


def _assert_same_final_state(a: Path, b: Path):
    sa, sb = load_checkpoint(a / 'checkpoint-0002.pth'), load_checkpoint(b / 'checkpoint-0002.pth')
    for key, value in sa['student'].items():
        assert torch.equal(value, sb['student'][key]), key
    for key, value in sa['task_state']['distill'].items():
        assert torch.equal(value, sb['task_state']['distill'][key]), key
    # same metrics, train means too
    assert list(map(computed, sa['progress']['history'])) == list(map(computed, sb['progress']['history']))


def _same_metrics(a: Path, b: Path):
    """The same metrics.jsonl lines (timing aside), each step once."""
    assert list(map(computed, metrics(a))) == list(map(computed, metrics(b)))
    steps = [r['step'] for r in step_lines(b)]
    assert steps == sorted(set(steps))


# -- 1. atomic checkpoints -------------------------------------------------------------------
def test_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / 'checkpoint-0001.pth'
    save_checkpoint({'w': torch.ones(3)}, path)

    def full_disk(obj, f):
        f.write(b'partial bytes')
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(checkpoint_module.torch, 'save', full_disk)
    with pytest.raises(CheckpointError, match='checkpoint-0001.pth failed after 0 MB: the disk is full'):
        save_checkpoint({'w': torch.zeros(3)}, path)
    assert torch.equal(load_checkpoint(path)['w'], torch.ones(3))
    assert os.listdir(tmp_path) == ['checkpoint-0001.pth']  # no temporary file left behind


def test_checkpoints_get_the_mode_open_would_give(tmp_path):
    umask = os.umask(0o022)
    try:
        save_checkpoint({'w': torch.ones(3)}, tmp_path / 'shared.pth')
    finally:
        os.umask(umask)
    assert (tmp_path / 'shared.pth').stat().st_mode & 0o777 == 0o644  # readable by the group, as open() makes it


def _training_state(step: int) -> dict:
    return dict(config={}, student={'w': torch.full((3,), float(step))}, progress=dict(step=step))


def test_resume_auto_takes_the_newest_checkpoint_that_loads(tmp_path):
    save_checkpoint(_training_state(3), tmp_path / 'checkpoint-0001.pth')
    save_checkpoint(_training_state(5), tmp_path / 'checkpoint-0001-000002.pth')
    full = (tmp_path / 'checkpoint-0001-000002.pth').read_bytes()
    (tmp_path / 'checkpoint-0002.pth').write_bytes(full[:len(full) // 2])  # a write killed half-way
    path, state, passed = latest_checkpoint(tmp_path)
    assert path == tmp_path / 'checkpoint-0001-000002.pth' and state['progress']['step'] == 5
    assert state['format_version'] == FORMAT_VERSION  # migrated from format 1 on the way
    assert len(passed) == 1 and 'checkpoint-0002.pth cannot be loaded safely' in passed[0]


def test_resume_auto_with_only_damaged_checkpoints_names_each_and_changes_nothing(tmp_path, data_root, capsys):
    cfg = tiny_config(tmp_path, data_root)
    run = tmp_path / 'run'
    run.mkdir()
    save_checkpoint(_training_state(3), run / 'checkpoint-0001.pth')
    (run / 'checkpoint-0001.pth').write_bytes((run / 'checkpoint-0001.pth').read_bytes()[:100])
    (run / 'checkpoint-0002.pth').write_bytes(b'')
    (run / 'config.yaml').write_text('the config of the run\n')
    before = {f.name: f.read_bytes() for f in run.iterdir()}
    assert main(['train', str(cfg), '--resume', 'auto']) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'holds 2 checkpoint(s) and none loads' in err, err
    assert 'checkpoint-0001.pth cannot be loaded safely' in err and 'checkpoint-0002.pth is empty (0 bytes)' in err
    assert {f.name: f.read_bytes() for f in run.iterdir() if f.name != '.scalekd.lock'} == before


# -- 2. crash and resume -------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_after_every_step_then_resume_gives_the_same_run(straight, data_root, tmp_path):
    """Killed once after each of the 5 mid-run checkpoints (each resumed run is killed at the next),
    then finished: the same weights, metrics and metrics.jsonl as the uninterrupted run."""
    cfg = tiny_config(tmp_path, data_root, train=dict(checkpoint_every_steps=1, keep_checkpoints=20))
    run = tmp_path / 'run'
    for step in range(1, 6):  # 6 steps in all: 3 per epoch
        epoch, batch = divmod(step, 3)
        proc = _run(cfg, '--deterministic', *(('--resume', 'auto') if step > 1 else ()))
        wait_for(run / checkpoint_name(epoch, batch), proc)
        kill_group(proc)
    assert not (run / 'checkpoint-0002.pth').exists()
    assert main(['train', str(cfg), '--resume', 'auto', '--deterministic']) == 0
    _assert_same_final_state(straight, run)
    _same_metrics(straight, run)
    assert not [f for f in os.listdir(run) if f.endswith('.tmp')]  # killed writes cleaned up


@pytest.mark.slow
@pytest.mark.parametrize('signum, workers', [(signal.SIGTERM, 0), (signal.SIGTERM, 2), (signal.SIGHUP, 2)])
def test_a_stop_signal_to_the_job_saves_a_checkpoint_and_exits(data_root, tmp_path, signum, workers):
    """SIGTERM (a scheduler's scancel / pre-emption) or SIGHUP (a closed terminal) sent to the run's whole
    process group, its data-loader workers too: the run finishes its step, saves and exits 130 (a worker
    killed under it crashed the run before it saved), and resumes to the end."""
    cfg = tiny_config(tmp_path, data_root, sched=dict(epochs=3), data=dict(workers=workers))
    proc = _run(cfg)
    wait_for(tmp_path / 'run' / 'metrics.jsonl', proc)
    os.killpg(proc.pid, signum)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert f'stopped by signal {int(signum)}' in err and 'continue with --resume auto' in err and 'Traceback' not in err
    assert f'stopped by signal {int(signum)}' in (tmp_path / 'run' / 'train.log').read_text()
    saved, state, _ = latest_checkpoint(tmp_path / 'run')
    assert saved is not None
    assert state['progress']['step'] >= 1
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
    with pytest.raises(CheckpointError, match='none loads'):
        latest_checkpoint(tmp_path)
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
    assert 'distill.s3_heads=5 does not divide the teacher width 64 that its CAP projects to' in err
    assert 'set distill.s3_heads to a divisor of 64 (e.g. 4)' in err
    with pytest.raises(UnsupportedModelError, match=r'teacher vit_tiny_patch16_224 \(VisionTransformer\) cannot run at 48x48'):
        build_distiller(make_teacher('vit', IMG), 'resnet18', img_size=48)


def test_wrong_value_type_and_unknown_key(tmp_path, data_root, capsys):
    err = _refused(tiny_config(tmp_path, data_root), capsys, '-o', 'optim.lr=fast')
    assert 'optim.lr in' in err and "must be float, got str 'fast'" in err
    cfg = load_config(tiny_config(tmp_path, data_root), ['optim.lr=1e-3', 'optim.weight_decay=5E2', 'sched.min_lr=.5e-6'])
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.sched.min_lr) == (1e-3, 500.0, 5e-7)  # YAML 1.1 reads them as str
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
    assert 'continue from it with a lower learning rate (--resume auto -o optim.lr=...' in err
    saved = tmp_path / 'run' / 'checkpoint-0000-000001.pth'
    assert str(saved) in err and load_checkpoint(saved)['progress']['step'] == 1


def test_the_state_saved_before_a_bad_step_has_the_norm_statistics_before_it(tmp_path, data_root, monkeypatch):
    forward, before = Distiller.forward, {}

    def poisoned(self, input, target):
        bn = self.student.bn1
        if int(bn.num_batches_tracked) == 1:  # the second forward: its statistics blow up too
            before.update({k: v.clone() for k, v in bn.state_dict().items()})
            out = forward(self, input, target)
            bn.running_mean.fill_(float('inf'))
            return dict(out, loss=out['loss'] * float('nan'))
        return forward(self, input, target)
    monkeypatch.setattr(Distiller, 'forward', poisoned)
    assert main(['train', str(tiny_config(tmp_path, data_root))]) == 2
    saved = load_checkpoint(tmp_path / 'run' / 'checkpoint-0000-000001.pth')['student']
    for key, value in before.items():
        assert torch.equal(saved[f'bn1.{key}'], value), key


def test_max_nan_skips_skips_bounded_bad_steps(tmp_path, data_root, nan_at_step_2):
    cfg = tiny_config(tmp_path, data_root)
    assert main(['train', str(cfg), '--max-nan-skips', '1']) == 0
    assert 'update skipped (1/1 skips used)' in (tmp_path / 'run' / 'train.log').read_text()
    state = load_checkpoint(tmp_path / 'run' / 'checkpoint-0002.pth')
    assert state['progress']['nan_skips'] == 1 and state['progress']['step'] == 6  # the schedule keeps its length


# -- 7. determinism ------------------------------------------------------------------------
@pytest.mark.slow
def test_deterministic_runs_are_bit_identical(straight, data_root, tmp_path):
    cfg = tiny_config(tmp_path, data_root, train=dict(checkpoint_every_steps=1, keep_checkpoints=20))
    assert main(['train', str(cfg), '--deterministic']) == 0
    _assert_same_final_state(straight, tmp_path / 'run')


# -- 8. mixed precision, devices, data ---------------------------------------------------------
def test_fp16_step_unscales_before_clipping_and_skips_infinite_gradients():
    """A real GradScaler on CPU: the update is the hand-computed one of the unscaled, clipped gradient."""
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    optimizer = torch.optim.SGD([w], lr=1.0)
    scaler = torch.amp.GradScaler('cpu', init_scale=1024.0)
    scaler.scale((w * 10).sum()).backward()  # gradient (10, 10), norm 14.14; scaled by 1024
    optimizer_step(optimizer, scaler, [w], clip=1.0)
    assert torch.allclose(w.detach(), torch.tensor([3.0, 4.0]) - 2 ** -0.5, atol=1e-6)  # clipped to norm 1
    assert w.grad is None and scaler.get_scale() == 1024.0
    scaler.scale((w * float('inf')).sum()).backward()
    before = w.detach().clone()
    optimizer_step(optimizer, scaler, [w], clip=1.0)
    assert torch.equal(w.detach(), before) and scaler.get_scale() == 512.0  # skipped, scale backed off


def test_determinism_on_cuda_sets_the_cublas_workspace(monkeypatch):
    monkeypatch.delenv('CUBLAS_WORKSPACE_CONFIG', raising=False)
    try:
        enable_determinism(torch.device('cuda', 0))
        assert os.environ['CUBLAS_WORKSPACE_CONFIG'] == ':4096:8' and torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.use_deterministic_algorithms(False)


def test_checkpoints_hold_the_rng_of_the_process_gpu_only(monkeypatch):
    """A rank saves and restores its own GPU's generator, so a node with another GPU count resumes."""
    calls = []
    monkeypatch.setattr(torch.cuda, 'get_rng_state', lambda device: calls.append(('get', device)) or torch.ones(3))
    monkeypatch.setattr(torch.cuda, 'set_rng_state', lambda state, device: calls.append(('set', state[0], device)))
    monkeypatch.setattr(torch.cuda, 'get_rng_state_all', lambda: pytest.fail('every GPU read'))
    state = rng_state(torch.device('cuda', 1))
    assert calls == [('get', torch.device('cuda', 1))] and torch.equal(state['cuda'], torch.ones(3))
    set_rng_state(state, torch.device('cuda', 1))
    assert calls[-1] == ('set', 1.0, torch.device('cuda', 1))
    old = dict(state, cuda=[torch.zeros(3), torch.full((3,), 7.0)])  # format 1: every visible GPU
    set_rng_state(old, torch.device('cuda', 1))
    assert calls[-1] == ('set', 7.0, torch.device('cuda', 1))
    set_rng_state(old, torch.device('cuda', 5))  # a GPU the saving node did not have: left as seeded
    assert len(calls) == 3


def test_one_channel_images_train_without_an_explicit_mean(tmp_path, data_root):
    cfg = tiny_config(tmp_path, data_root, data=dict(in_chans=1), sched=dict(epochs=1))
    assert main(['train', str(cfg)]) == 0
    assert load_checkpoint(tmp_path / 'run' / 'checkpoint-0001.pth')['student']['conv1.weight'].shape[1] == 1
    assert main(['export', str(tmp_path / 'run' / 'best.pth'), '--out', str(tmp_path / 'export')]) == 0
    exported = json.loads((tmp_path / 'export' / 'config.json').read_text())['pretrained_cfg']
    assert exported['mean'] == [pytest.approx(sum(IMAGENET_DEFAULT_MEAN) / 3)]  # the student's RGB mean, averaged
    assert main(['eval', str(tmp_path / 'export'), '--data', str(data_root / 'val'), '--workers', '0']) == 0


class _Draws(torch.utils.data.Dataset):
    """Each sample is the random numbers its transform would draw: torch, random and NumPy."""

    def __len__(self):
        return 24

    def __getitem__(self, index):
        import numpy as np
        return torch.tensor([index, torch.rand(()).item(), random.random(), np.random.rand()]), 0


def _draws(world_size: int, rank: int, epoch: int = 0, start_batch: int = 0, workers: int = 2) -> dict:
    """Global position -> (sample index, draws) of one rank's epoch, from ``start_batch`` on."""
    per_rank = 8 // world_size
    data = Datasets(_Draws(), _Draws(), ['a'])
    loader, _ = build_loaders(data, DataConfig(workers=workers), per_rank, DistEnv(rank, world_size), seed=3)
    seed_epoch(loader, 3, epoch, rank, start_batch)
    rows = torch.cat([x for x, _ in loader])
    return {(start_batch * per_rank + j) * world_size + rank: tuple(r.tolist()) for j, r in enumerate(rows)}


def test_each_rank_draws_its_own_augmentations_and_a_resumed_run_the_same_ones():
    rank0, rank1 = _draws(2, 0), _draws(2, 1)
    assert not {v[1:] for v in rank0.values()} & {v[1:] for v in rank1.values()}  # no shared stream across ranks
    assert all(len(set(v[1:])) == 3 for v in rank0.values())  # torch, random and NumPy draw different numbers
    one = _draws(1, 0)
    assert {**rank0, **rank1} == one  # the same sample and draws at each global position, on 1 or 2 processes
    assert _draws(2, 1, start_batch=2) == {k: v for k, v in rank1.items() if k >= 16}  # resumed mid-epoch
    assert _draws(1, 0, workers=0) == one  # workers or not
    assert not {v[1:] for v in _draws(1, 0, epoch=1).values()} & {v[1:] for v in one.values()}  # a new epoch


@pytest.mark.parametrize('content', [b'', bytes(range(256)) * 8], ids=['empty', 'garbage'])
def test_an_empty_or_damaged_file_is_named_in_one_line_wherever_a_path_is_taken(content, tmp_path, data_root, capsys):
    bad = tmp_path / 'bad.pth'
    bad.write_bytes(content)
    cfg = tiny_config(tmp_path, data_root)
    for argv in (['eval', str(bad), '--data', str(data_root / 'val')], ['export', str(bad), '--out', str(tmp_path / 'x')],
                 ['train', str(cfg), '--resume', str(bad)],
                 ['train', str(cfg), '-o', f'teacher.checkpoint={bad}']):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count('\n') == 1 and 'bad.pth' in err, (argv, err)
        assert ('is empty (0 bytes)' in err) if not content else ('cannot be loaded safely' in err), err
        assert 'weights_only=False' not in err  # never the advice to load a damaged file unsafely
    assert sorted(os.listdir(tmp_path)) == ['bad.pth', 'config.yaml']


@pytest.mark.slow
@pytest.mark.parametrize('workers', ['0', '2'])
def test_eval_names_an_unreadable_image_instead_of_counting_its_neighbour(tmp_path, straight, workers, capsys):
    root = make_image_folder(tmp_path / 'data', train_per_class=1, val_per_class=3)
    (root / 'val' / 'red' / '1.png').write_bytes(b'not an image')
    assert main(['eval', str(straight / 'best.pth'), '--data', str(root / 'val'), '--workers', workers]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'unreadable image' in err and 'red/1.png' in err, err
    assert main(['eval', str(straight / 'best.pth'), '--data', str(root / 'val'), '--workers', workers,
                 '--skip-unreadable', '--json']) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics['count'] == 8 and metrics['skipped'] == 1  # 9 images, the unreadable one left out


def test_an_image_beyond_the_pixel_limit_is_named(tmp_path, data_root, capsys, monkeypatch):
    from PIL import Image
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 100)  # the 32x32 images are then "bombs" (> 2x the limit)
    err = _refused(tiny_config(tmp_path, data_root), capsys)
    assert 'unreadable image(s)' in err and 'train/blue/0.png: Image size (1024 pixels) exceeds limit' in err, err


def test_a_teacher_trained_here_is_taken_as_a_checkpoint_or_an_export(data_root, tmp_path):
    """A teacher given as a scalekd checkpoint (its EMA weights) or an export folder, not only a weight file."""
    kwargs = dict(patch_size=8, embed_dim=64, depth=4, num_heads=2)
    teacher = create_timm_model('vit_tiny_patch16_224', (32, 32), num_classes=3, **kwargs)
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in teacher.state_dict().items()}
    save_checkpoint(dict(config={}, student=teacher.state_dict(), ema=ema), tmp_path / 'best.pth')
    export_student(teacher, tmp_path / 'export', dict(input_size=(3, 32, 32)))
    assert torch.equal(read_state_dict(tmp_path / 'best.pth')['cls_token'], ema['cls_token'])
    assert torch.equal(read_state_dict(tmp_path / 'export')['cls_token'], teacher.state_dict()['cls_token'])
    for source in (tmp_path / 'best.pth', tmp_path / 'export'):
        out = tmp_path / f'from-{source.name}'
        out.mkdir()
        cfg = tiny_config(out, data_root, teacher=dict(checkpoint=str(source)), sched=dict(epochs=1))
        assert main(['train', str(cfg), '--no-progress']) == 0
        assert f'teacher weights: {source}' in (out / 'run' / 'train.log').read_text()
        assert 'progress: false' in (out / 'run' / 'config.yaml').read_text()
