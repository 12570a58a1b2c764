"""The units the Trainer wires together, each driven alone (no training run): the fault policy
(faults.py), the output folder policy (run_folder/history.py), what a checkpoint holds (training_state.py) and
how older ones migrate, the epoch's loss sums (epoch_losses.py) and the per-sample seeding (data.py)."""
import random
import signal
import threading

import numpy as np
import pytest
import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3

from engine_fixtures import tiny_config
from scalekd.engine.run_folder.checkpoint import (FORMAT_VERSION, CheckpointError, checkpoint_name, load_checkpoint, migrate,
                                       read_training_checkpoint, save_checkpoint)
from scalekd.engine.inputs.config import RunConfig, config_to_dict, load_config
from scalekd.engine.inputs.data import SeededSamples
from scalekd.engine.runtime.distributed import DistEnv
from scalekd.engine.loop.epoch_losses import EpochLosses
from scalekd.engine.loop.faults import NormStatistics, StopSignal, judge_non_finite, non_finite_flags
from scalekd.engine.errors import LossNotFinite, RunError, UserError
from scalekd.engine.run_folder.files import RunFolderError
from scalekd.engine.run_folder.history import RunOutput, check_resume_request
from scalekd.engine.inputs.task_build import build_task
from scalekd.engine.run_folder.training_state import (Progress, TrainingState, best_state, changed_settings, gather_rng_states,
                                           restore_rng_states)

ENV = DistEnv()


# -- faults.py -------------------------------------------------------------------------------------
def test_norm_statistics_undo_a_forward_that_went_non_finite():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    model(torch.randn(2, 3, 8, 8))
    norm = NormStatistics(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    snapshot = norm.snapshot()
    model(torch.full((2, 3, 8, 8), float('nan')))
    assert model[1].running_mean.isnan().all() and int(model[1].num_batches_tracked) == 2
    norm.restore(snapshot)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_norm_statistics_are_the_running_statistics_of_norm_layers_only():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.LayerNorm(6), nn.InstanceNorm2d(4))
    model.register_buffer('dct', torch.randn(4, 4))  # a constant table (DCT matrix, position table): never copied
    bn = model[1]
    assert list(map(id, NormStatistics(model).buffers)) == list(map(id, (bn.running_mean, bn.running_var,
                                                                         bn.num_batches_tracked)))


def test_non_finite_losses_are_skipped_until_the_budget_is_spent_then_stop(tmp_path):
    terms = dict(loss=torch.tensor(float('nan')), kd_loss=torch.tensor(0.5), s4_ori=torch.tensor(float('inf')))
    flags = [bool(f) for f in non_finite_flags(terms)]
    assert flags == [True, False, True]
    used, notes = 0, []
    for step in (3, 5, 8):
        verdict = judge_non_finite(list(terms), flags, used, max_skips=2, epoch=1, step=step)
        if not verdict.skip:
            break
        used = verdict.skips_used
        notes.append(verdict.note())
    assert notes == ['non-finite loss at epoch 2, step 4 (loss, s4_ori): update skipped (1/2 skips used)',
                     'non-finite loss at epoch 2, step 6 (loss, s4_ori): update skipped (2/2 skips used)']
    assert (verdict.skip, verdict.skips_used, verdict.where) == (False, 2, 'epoch 2, step 9')
    error = verdict.error(tmp_path / 'checkpoint-0001-000008.pth')
    assert isinstance(error, LossNotFinite) and isinstance(error, UserError)
    assert str(error).startswith('non-finite loss at epoch 2, step 9 in term(s) loss, s4_ori; the state before it '
                                 f'is saved in {tmp_path / "checkpoint-0001-000008.pth"}')
    assert not judge_non_finite(['loss'], [True], 0, max_skips=0, epoch=0, step=0).skip  # no budget: stop at once


def test_a_stop_signal_is_recorded_and_the_old_handler_comes_back(tmp_path):
    previous = signal.getsignal(signal.SIGTERM)
    stop = StopSignal()
    assert not bool(stop.flag())
    with stop.installed():
        signal.raise_signal(signal.SIGTERM)
    assert stop.signum == signal.SIGTERM and bool(stop.flag())
    assert signal.getsignal(signal.SIGTERM) is previous
    assert str(stop.interrupted(7, tmp_path / 'c.pth')) == (f'stopped by signal {int(signal.SIGTERM)} at step 7; '
                                                          f'checkpoint {tmp_path / "c.pth"}; continue with --resume auto')
    assert 'stopped by signal on another rank at step 7' in str(StopSignal().interrupted(7, tmp_path / 'c.pth'))


def test_a_stop_signal_outside_the_main_thread_installs_nothing():
    seen = []

    def worker():
        with StopSignal().installed():
            seen.append(signal.getsignal(signal.SIGTERM))
    previous = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [previous]


# -- run_folder/history.py --------------------------------------------------------------------------------
def _fake_state(step: int, best_step: int = -1, epoch: int = 0, updates: int = 0):
    """A minimal training checkpoint: what the output policy reads of one (progress, config)."""
    return dict(format_version=FORMAT_VERSION, config=config_to_dict(RunConfig()), student={}, ema=None,
                progress=dict(epoch=epoch, updates=updates, step=step, best_step=best_step, best_epoch=1,
                              best_top1=50.0, best_top5=90.0))


def _open(tmp_path, resume=None, force=False, keep=2):
    notes = []
    out = RunOutput(str(tmp_path / 'run'), keep, notes.append, ('config.yaml', 'train.log'))
    return out, out.open(resume, force), notes


def test_resume_and_force_together_are_refused():
    with pytest.raises(RunError, match='--resume and --force contradict each other'):
        check_resume_request('auto', True)
    check_resume_request('auto', False)
    check_resume_request(None, True)


def test_resume_auto_takes_the_newest_checkpoint_that_loads(tmp_path):
    run = tmp_path / 'run'
    run.mkdir()
    save_checkpoint(_fake_state(3, epoch=1), run / 'checkpoint-0001.pth')
    save_checkpoint(_fake_state(5, epoch=1, updates=2), run / 'checkpoint-0001-000002.pth')
    (run / 'checkpoint-0002.pth').write_bytes(b'damaged')
    out, path, notes = _open(tmp_path, 'auto')
    out.release()
    assert path == out.resumed_from == run / 'checkpoint-0001-000002.pth'
    assert out.take_resume_state()['progress']['step'] == 5 and out.take_resume_state() is None  # handed over once
    assert len(notes) == 2 and notes[0].startswith(f'passed over checkpoint {run / "checkpoint-0002.pth"}')
    assert (run / 'abandoned-after-step-5' / 'checkpoint-0002.pth').read_bytes() == b'damaged'  # named, set aside


def test_resume_auto_on_damaged_checkpoints_only_refuses_and_lets_the_lock_go(tmp_path):
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'checkpoint-0001.pth').write_bytes(b'')
    with pytest.raises(CheckpointError, match='holds 1 checkpoint'):
        _open(tmp_path, 'auto')
    with pytest.raises(CheckpointError, match='holds 1 checkpoint'):  # the folder is free again, nothing changed
        _open(tmp_path, 'auto')
    assert (run / 'checkpoint-0001.pth').read_bytes() == b''


def test_a_fresh_start_refuses_another_run_unless_forced(tmp_path):
    run = tmp_path / 'run'
    first, _, _ = _open(tmp_path)
    first.start(fresh=True)
    first.write(_fake_state(3), 'checkpoint-0001.pth', 3, is_best=False)
    first.release()
    (run / 'mine.txt').write_text('not a run file')
    with pytest.raises(RunFolderError, match='already holds a run'):
        _open(tmp_path)
    out, path, notes = _open(tmp_path, force=True)
    assert (run / 'checkpoint-0001.pth').is_file()  # deleted only once the new run starts
    out.start(fresh=True)
    out.release()
    assert path is None and notes == ["--force removed the previous run's checkpoint-0001.pth"]
    assert sorted(p.name for p in run.iterdir()) == ['.scalekd.lock', 'mine.txt', 'scalekd-run.json']


def test_resume_paths_that_cannot_be_resumed_are_refused(tmp_path):
    other = tmp_path / 'other'
    other.mkdir()
    save_checkpoint(_fake_state(3), other / 'checkpoint-0001.pth')
    with pytest.raises(RunError, match='is a folder'):
        _open(tmp_path, str(other))
    (tmp_path / 'run').mkdir()
    save_checkpoint(_fake_state(2), tmp_path / 'run' / 'checkpoint-0000-000002.pth')
    with pytest.raises(RunError, match='holds another run'):
        _open(tmp_path, str(other / 'checkpoint-0001.pth'))


def test_resuming_an_older_checkpoint_sets_the_later_history_aside(tmp_path):
    run = tmp_path / 'run'
    run.mkdir()
    save_checkpoint(_fake_state(3, epoch=1), run / 'checkpoint-0001.pth')
    save_checkpoint(_fake_state(6, epoch=2), run / 'checkpoint-0002.pth')
    save_checkpoint(best_state(_fake_state(6, best_step=6, epoch=2)), run / 'best.pth')
    out, path, notes = _open(tmp_path, str(run / 'checkpoint-0001.pth'))
    out.release()
    assert path == run / 'checkpoint-0001.pth'
    aside = run / 'abandoned-after-step-3'
    assert sorted(p.name for p in aside.iterdir()) == ['best.pth', 'checkpoint-0002.pth']
    assert not (run / 'checkpoint-0002.pth').exists() and not (run / 'best.pth').exists()
    assert notes == [f'resumed from an older checkpoint: checkpoint-0002.pth, best.pth of the abandoned history '
                     f'moved to {aside}']


def test_writes_prune_by_step_and_keep_the_checkpoint_resumed_from(tmp_path):
    """Steps of 3 updates an epoch, keep 1: the resumed checkpoint (step 1) outlives its successors."""
    def write(out, step, is_best=False):
        epoch, updates = divmod(step, 3)
        name = checkpoint_name(epoch, updates)
        assert out.write(_fake_state(step, epoch=epoch, updates=updates), name, step, is_best) == run / name

    run = tmp_path / 'run'
    first, _, _ = _open(tmp_path, keep=0)
    first.start(fresh=True)
    for step in (1, 2):
        write(first, step)
    first.release()
    out, path, notes = _open(tmp_path, str(run / 'checkpoint-0000-000001.pth'), keep=1)
    assert path == run / 'checkpoint-0000-000001.pth' and 'checkpoint-0000-000002.pth of the abandoned' in notes[0]
    out.start(fresh=False)
    for step in (2, 3, 4):
        write(out, step, is_best=step == 3)
    out.release()
    assert sorted(p.name for p in run.glob('checkpoint-*')) == ['checkpoint-0000-000001.pth',
                                                                'checkpoint-0001-000001.pth']
    best = load_checkpoint(run / 'best.pth')
    assert set(best) == {'format_version', 'progress', 'student', 'ema', 'config'} and best['progress']['step'] == 3


def test_best_pth_is_rewritten_from_the_resumed_best_epoch(tmp_path):
    out, _, notes = _open(tmp_path)
    state = dict(_fake_state(3, best_step=3, epoch=1), optimizer={})
    progress = Progress(epoch=1, step=3, best_step=3, best_epoch=1, best_top1=50.0)
    out.reconcile_best(progress, state)
    out.release()
    assert read_training_checkpoint(tmp_path / 'run' / 'best.pth')['progress']['best_step'] == 3
    assert 'optimizer' not in load_checkpoint(tmp_path / 'run' / 'best.pth')
    assert notes == ['best.pth rewritten from the resumed checkpoint (epoch 1)'] and progress.best_step == 3


def test_a_best_epoch_that_cannot_be_restored_is_tracked_afresh(tmp_path):
    out, _, notes = _open(tmp_path)
    (tmp_path / 'run' / 'best.pth').write_bytes(b'damaged')
    progress = Progress(epoch=1, updates=2, step=5, best_step=3, best_epoch=1, best_top1=50.0, best_top5=90.0)
    out.reconcile_best(progress, _fake_state(5, best_step=3, epoch=1, updates=2))
    out.release()
    assert (progress.best_top1, progress.best_top5, progress.best_epoch, progress.best_step) == (-1.0, 0.0, -1, -1)
    assert notes[0].startswith('best.pth is unreadable (checkpoint ')
    assert notes[1].startswith('the best epoch so far (1, top-1 50.00) is not in best.pth')
    assert (tmp_path / 'run' / 'best.pth').read_bytes() == b'damaged'


def test_a_best_pth_that_holds_the_best_epoch_is_left_alone(tmp_path):
    out, _, notes = _open(tmp_path)
    best = tmp_path / 'run' / 'best.pth'
    save_checkpoint(best_state(_fake_state(3, best_step=3, epoch=1)), best)
    written = best.read_bytes()
    progress = Progress(epoch=2, step=6, best_step=3, best_epoch=1, best_top1=50.0)
    out.reconcile_best(progress, _fake_state(6, best_step=3, epoch=2))
    out.release()
    assert best.read_bytes() == written and notes == [] and progress.best_step == 3


# -- training_state.py -----------------------------------------------------------------------------
def _run_parts(tmp_path, seed: int, **train):
    cfg = load_config(tiny_config(tmp_path, tmp_path, train={'ema': True, **train}))
    torch.manual_seed(seed)
    task = build_task(cfg, torch.device('cpu'), random_weights=True)
    optimizer = create_optimizer_v2(task.trainable_module, opt='sgd', lr=cfg.optim.lr, momentum=0.9)
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** (seed + 4))
    return cfg, TrainingState(cfg, task, optimizer, scaler, ModelEmaV3(task.student, decay=0.5))


def _train_a_step(state: TrainingState):
    images, targets = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    state.task.train()
    state.task(images, targets)['loss'].backward()
    state.optimizer.step()
    state.ema.update(state.task.student, step=1)


def _assert_equal_states(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            _assert_equal_states(a[key], b[key])
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def test_a_checkpoint_loads_into_a_fresh_run_bit_exactly(tmp_path):
    _, saved = _run_parts(tmp_path, seed=1)
    _train_a_step(saved)
    progress = Progress(epoch=1, updates=2, step=5, best_step=3, best_epoch=1, best_top1=40.0, nan_skips=1,
                        history=[dict(epoch=1, step=3)])
    state = saved.state_dict(progress, dict(loss=1.5), 4, gather_rng_states(ENV))
    save_checkpoint(state, tmp_path / 'checkpoint.pth')
    _, fresh = _run_parts(tmp_path, seed=2)
    assert not torch.equal(fresh.task.student.conv1.weight, saved.task.student.conv1.weight)
    resumed = fresh.load(read_training_checkpoint(tmp_path / 'checkpoint.pth'), tmp_path / 'checkpoint.pth')
    _assert_equal_states(fresh.task.student.state_dict(), saved.task.student.state_dict())
    _assert_equal_states(fresh.task.get_task_state(), saved.task.get_task_state())
    _assert_equal_states(fresh.optimizer.state_dict(), saved.optimizer.state_dict())
    _assert_equal_states(fresh.ema.module.state_dict(), saved.ema.module.state_dict())
    assert fresh.scaler.get_scale() == saved.scaler.get_scale() == 32.0
    assert (resumed.loss_sums, resumed.loss_updates, resumed.config.train.accum_steps) == (dict(loss=1.5), 4, 1)
    assert resumed.progress == Progress(epoch=1, updates=2, step=5, best_step=3, best_epoch=1, best_top1=40.0,
                                        nan_skips=1, history=[dict(epoch=1, step=3)])
    assert state['world_size'] == 1 and best_state(state)['student'] is state['student']


def test_loading_keeps_the_configs_optimizer_settings_and_the_position_in_updates(tmp_path):
    _, saved = _run_parts(tmp_path, seed=1, accum_steps=1)
    state = saved.state_dict(Progress(epoch=0, updates=3, step=3), {}, 0, gather_rng_states(ENV))
    _, fresh = _run_parts(tmp_path, seed=1, accum_steps=2)
    for group in fresh.optimizer.param_groups:
        group['lr'] = 0.007  # the config of the resumed run
    resumed = fresh.load(state, tmp_path / 'checkpoint.pth')
    assert all(group['lr'] == 0.007 for group in fresh.optimizer.param_groups)
    assert resumed.progress.updates == 3  # the same global image position at any accumulation


def test_loading_refuses_another_global_batch_and_an_eval_only_file(tmp_path):
    _, saved = _run_parts(tmp_path, seed=1)
    state = saved.state_dict(Progress(), {}, 0, gather_rng_states(ENV))
    _, other = _run_parts(tmp_path, seed=1, batch_size=16)
    with pytest.raises(RunError, match=r'trained with train.batch_size 8, this run asks for 16'):
        other.load(state, tmp_path / 'c.pth')
    with pytest.raises(CheckpointError, match='holds a student for eval / export, not a training state'):
        saved.load(best_state(state), tmp_path / 'best.pth')


def test_older_formats_migrate_to_positions_and_loss_sums_counted_in_updates():
    """Mid-epoch after 3 of 6 updates on 2 processes x 2 accumulation steps (batch 8): every micro-batch's
    loss was 0.25. Format 1 kept rank 0's sums and images (12: 6 micro-batches of 2), format 2 every rank's
    sums and micro-batches; both give 3 updates of mean 0.25."""
    config = dict(train=dict(batch_size=8, accum_steps=2))
    one = dict(progress=dict(epoch=0, batch=6, step=3, seen=12, totals={'loss': 1.5}, history=[], best_epoch=-1),
               world_size=2, config=config)
    two = dict(format_version=2, progress=dict(epoch=0, batch=6, step=3, totals={'loss': 3.0}, batches=12, history=[],
                                               best_epoch=-1, best_step=-1), world_size=2, config=config)
    for state in (one, two):
        progress = migrate(state)['progress']
        assert (progress['updates'], progress['loss_updates'], progress['loss_sums']) == (3, 3, {'loss': 0.75})
        assert not {'batch', 'batches', 'totals', 'seen'} & set(progress)


def test_rng_streams_come_back_on_the_same_number_of_processes():
    rngs = gather_rng_states(ENV)
    expected = torch.rand(3)
    torch.rand(5)
    restore_rng_states(rngs, ENV, seed=7)
    assert torch.equal(torch.rand(3), expected)
    restore_rng_states(rngs + rngs, ENV, seed=7)  # saved by 2 processes: fresh streams from the seed
    reseeded = torch.rand(3)
    restore_rng_states(rngs + rngs, ENV, seed=7)
    assert torch.equal(torch.rand(3), reseeded) and not torch.equal(reseeded, expected)


def test_changed_settings_name_what_changes_the_computation_only(tmp_path):
    old = load_config(tiny_config(tmp_path, tmp_path))
    new = load_config(tiny_config(tmp_path, tmp_path), ['optim.lr=0.01', 'output=elsewhere', 'train.keep_checkpoints=5',
                                                        'data.workers=2', 'log.interval=7'])
    assert changed_settings(old, new) == ['optim.lr: 0.05 -> 0.01']


# -- epoch_losses.py -------------------------------------------------------------------------------
def test_epoch_losses_sum_the_mean_of_each_committed_window():
    losses = EpochLosses(torch.device('cpu'), micro_batches_per_update=2)  # 2 accumulation steps, 1 process
    losses.load(dict(loss=1.0, kd=0.5), 2)  # carried over from a checkpoint: 2 updates
    losses.add(dict(loss=torch.tensor(2.0), kd=torch.tensor(1.0)))
    losses.add(dict(loss=torch.tensor(4.0), kd=torch.tensor(2.0)))
    losses.commit()
    losses.add(dict(loss=torch.tensor(100.0), kd=torch.tensor(100.0)))
    losses.discard()  # a skipped window leaves no trace
    losses.commit()
    assert losses.global_sums(ENV) == (dict(kd=2.0, loss=4.0), 3)
    assert losses.means(ENV) == dict(kd=2.0 / 3, loss=4.0 / 3)
    losses.reset()
    assert losses.global_sums(ENV) == ({}, 0) and losses.means(ENV) == {}


def test_a_checkpoint_estimate_matches_a_written_checkpoint_and_a_full_disk_is_refused_before_training(
        tmp_path, data_root, monkeypatch):
    from collections import namedtuple
    import scalekd.engine.run_folder.history as run_output
    from scalekd.cli import main
    cfg = tiny_config(tmp_path, data_root, sched=dict(epochs=1), data=dict(train_subset=8, val_subset=3))
    assert main(['train', str(cfg)]) == 0
    written = (tmp_path / 'run' / 'checkpoint-0001.pth').stat().st_size
    from scalekd.engine.runtime.distributed import DistEnv
    from scalekd.engine.loop.trainer import Trainer
    trainer = Trainer(load_config(cfg, ['output=' + str(tmp_path / 'other')]), DistEnv())
    estimate = trainer.training_state.checkpoint_bytes()
    trainer.output.release(failed=True)
    assert 0.8 * written < estimate < 1.2 * written  # weights + SGD momentum + nothing else of size
    Usage = namedtuple('Usage', 'total used free')
    monkeypatch.setattr(run_output.shutil, 'disk_usage', lambda path: Usage(10 ** 9, 10 ** 9, written))
    assert main(['train', str(cfg), '-o', f'output={tmp_path / "full"}']) == 2
    assert not (tmp_path / 'full').exists()


def test_a_full_disk_during_a_write_is_named_and_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno
    import scalekd.engine.run_folder.checkpoint as checkpoint
    from scalekd.engine.run_folder.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    save_checkpoint({'w': torch.ones(3)}, tmp_path / 'c.pth')

    def full(state, f):
        f.write(b'x' * 2 ** 20)
        raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 1048576 vs 1048512')
    monkeypatch.setattr(checkpoint.torch, 'save', full)
    with pytest.raises(CheckpointError, match=r'writing .*c.pth failed after 1 MB: the disk is full'):
        save_checkpoint({'w': torch.zeros(3)}, tmp_path / 'c.pth')
    monkeypatch.setattr(checkpoint.torch, 'save', lambda s, f: (_ for _ in ()).throw(OSError(errno.ENOSPC, 'No space')))
    with pytest.raises(CheckpointError, match='the disk is full'):
        save_checkpoint({'w': torch.zeros(3)}, tmp_path / 'c.pth')
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(tmp_path / 'c.pth')['w'], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ['c.pth']


# -- data.py ---------------------------------------------------------------------------------------
class _Noise(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        return torch.rand(2)


def test_a_samples_seed_is_set_on_the_cpu_generators_only_and_they_come_back(monkeypatch):
    """With ``data.workers: 0`` the training process itself seeds each sample's augmentation: the GPU
    generators (dropout and drop path in the step) are never reseeded, the CPU ones come back as they were."""
    reseeded = []
    monkeypatch.setattr(torch.cuda, 'manual_seed_all', reseeded.append)  # what torch.manual_seed calls for the GPUs
    monkeypatch.setattr(torch.cuda, 'manual_seed', reseeded.append)
    samples = SeededSamples(_Noise())
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()
    drawn = samples[(0, 7)]
    assert reseeded == []
    assert torch.equal(drawn, torch.rand(2, generator=torch.Generator().manual_seed(7)))  # the seed's CPU stream
    assert torch.equal(samples[(1, 7)], drawn) and not torch.equal(samples[(0, 8)], drawn)
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert np.array_equal(np.random.get_state()[1], before[2][1])
