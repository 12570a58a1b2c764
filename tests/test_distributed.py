"""Runs on several processes (torchrun, gloo, 2 CPU processes): resume on another process count,
faults on one rank, epoch means after a kill, gradient accumulation under DDP, the sharded optimizer
(train.zero)."""
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from engine_fixtures import tiny_config
from run_tools import (computed, epoch_lines, finish, kill_group, samples_per_step, start_torchrun, step_lines,
                       wait_for)
from scalekd.engine.run_folder.checkpoint import checkpoints_by_age, load_checkpoint, save_checkpoint
from scalekd.cli import main
from scalekd.engine.inputs.config import OptimConfig
from scalekd.engine.runtime.distributed import DistEnv, cleanup, exit_process, init_distributed
from scalekd.engine.run_folder.optimizer_shards import optimizer_state_of
from scalekd.engine.runtime.optimizer import build_optimizer
from traced_train import trace_samples

EVERY_STEP = dict(checkpoint_every_steps=1, keep_checkpoints=20)


@pytest.fixture(scope='module')
def straight2(tmp_path_factory, data_root):
    """The uninterrupted run of the ``straight`` fixture on 2 processes (deterministic, a checkpoint
    every step, samples traced)."""
    tmp = tmp_path_factory.mktemp('straight2')
    cfg = tiny_config(tmp, data_root, train=EVERY_STEP)
    finish(start_torchrun(cfg, '--deterministic', port=29541, SCALEKD_TEST_TRACE=str(tmp / 'trace')))
    return tmp / 'run'


def _resume_folder(tmp_path: Path, checkpoint: Path) -> Path:
    """A fresh output folder holding only ``checkpoint`` (a run stopped there)."""
    run = tmp_path / 'run'
    run.mkdir()
    save_checkpoint(load_checkpoint(checkpoint), run / checkpoint.name)
    return run


def _lrs(run: Path) -> dict:
    return {r['step']: r['lr'] for r in step_lines(run)}


def _assert_continues(reference: Path, resumed: Path, first_step: int, ref_batch: int, resumed_batch: int):
    """Steps ``first_step``..6 are each logged once, with the reference's learning rate, and train on
    exactly the reference's samples (the epoch's data order continues: nothing repeated or skipped)."""
    assert [r['step'] for r in step_lines(resumed)] == list(range(first_step, 7))
    ref_lrs = _lrs(reference)
    for step, lr in _lrs(resumed).items():
        assert lr == pytest.approx(ref_lrs[step], abs=1e-12), step
    ref = samples_per_step(reference.parent / 'trace', ref_batch)
    got = samples_per_step(resumed.parent / 'trace', resumed_batch, first_step)
    assert got == {s: ref[s] for s in range(first_step, 7)}
    epoch0 = [i for s in range(1, 4) for i in ref[s]]
    assert sorted(epoch0) == list(range(24))  # the reference itself sees every image once per epoch
    assert load_checkpoint(resumed / 'checkpoint-0002.pth')['progress']['step'] == 6


@pytest.mark.slow
def test_mid_epoch_resume_from_one_process_on_two(straight, data_root, tmp_path):
    _resume_folder(tmp_path, straight / 'checkpoint-0000-000001.pth')
    cfg = tiny_config(tmp_path, data_root, train=EVERY_STEP)
    finish(start_torchrun(cfg, '--resume', 'auto', port=29543, SCALEKD_TEST_TRACE=str(tmp_path / 'trace')))
    _assert_continues(straight, tmp_path / 'run', 2, ref_batch=8, resumed_batch=4)


@pytest.mark.slow
def test_mid_epoch_resume_from_two_processes_on_one(straight2, data_root, tmp_path):
    _resume_folder(tmp_path, straight2 / 'checkpoint-0000-000002.pth')
    cfg = tiny_config(tmp_path, data_root, train=EVERY_STEP)
    undo = trace_samples(tmp_path / 'trace', rank=0)
    try:
        assert main(['train', str(cfg), '--resume', 'auto']) == 0
    finally:
        undo()
    _assert_continues(straight2, tmp_path / 'run', 3, ref_batch=4, resumed_batch=8)


def _assert_epoch_1_means_its_steps(reference: Path, resumed: Path, resumed_at: int) -> None:
    """The resumed run's epoch-1 ``train_*`` means are the means of the epoch's 3 logged steps (those up to
    ``resumed_at`` logged by ``reference``), whatever number of processes ran each."""
    steps = {r['step']: r for r in step_lines(reference) if r['step'] <= resumed_at}
    steps.update({r['step']: r for r in step_lines(resumed) if resumed_at < r['step'] <= 3})
    assert sorted(steps) == [1, 2, 3]
    epoch = epoch_lines(resumed)[0]
    for key in ('loss', 'task_loss', 'kd_loss', 'proxy_ori', 's4_ori'):
        assert epoch[f'train_{key}'] == pytest.approx(sum(s[key] for s in steps.values()) / 3, rel=1e-6), key


@pytest.mark.slow
def test_an_epoch_resumed_on_two_processes_means_its_steps(straight, data_root, tmp_path):
    _resume_folder(tmp_path, straight / 'checkpoint-0000-000001.pth')
    cfg = tiny_config(tmp_path, data_root, sched=dict(epochs=1))
    finish(start_torchrun(cfg, '--resume', 'auto', port=29571))
    _assert_epoch_1_means_its_steps(straight, tmp_path / 'run', resumed_at=1)


@pytest.mark.slow
def test_an_epoch_resumed_on_one_process_means_its_steps(straight2, data_root, tmp_path):
    _resume_folder(tmp_path, straight2 / 'checkpoint-0000-000002.pth')
    cfg = tiny_config(tmp_path, data_root, sched=dict(epochs=1))
    assert main(['train', str(cfg), '--resume', 'auto']) == 0
    _assert_epoch_1_means_its_steps(straight2, tmp_path / 'run', resumed_at=2)


def test_another_global_batch_is_refused_on_resume(straight, data_root, tmp_path, capsys):
    _resume_folder(tmp_path, straight / 'checkpoint-0000-000001.pth')
    cfg = tiny_config(tmp_path, data_root, train=dict(batch_size=6))
    assert main(['train', str(cfg), '--resume', 'auto']) == 2
    err = capsys.readouterr().err
    assert 'was trained with train.batch_size 8, this run asks for 6' in err and 'resume with train.batch_size 8' in err


@pytest.mark.slow
def test_a_two_process_run_killed_and_resumed_logs_what_the_uninterrupted_one_logs(straight2, data_root, tmp_path):
    cfg = tiny_config(tmp_path, data_root, train=EVERY_STEP)
    run = tmp_path / 'run'
    proc = start_torchrun(cfg, '--deterministic', port=29545)
    wait_for(run / 'checkpoint-0000-000002.pth', proc)
    kill_group(proc)
    finish(start_torchrun(cfg, '--deterministic', '--resume', 'auto', port=29547))
    ref, got = epoch_lines(straight2), epoch_lines(run)
    assert len(got) == 2
    for a, b in zip(ref, got):
        for key in (k for k in computed(a) if k.startswith('train_')):
            assert b[key] == pytest.approx(a[key], rel=1e-12), key
    steps = [r['step'] for r in step_lines(run)]
    assert steps == list(range(1, 7))  # each step once, although steps after the kill point were redone
    ref_state, state = load_checkpoint(straight2 / 'checkpoint-0002.pth'), load_checkpoint(run / 'checkpoint-0002.pth')
    for key, value in ref_state['student'].items():
        assert torch.equal(value, state['student'][key]), key


@pytest.mark.slow
def test_a_nan_on_one_rank_stops_both_with_one_checkpoint(data_root, tmp_path):
    cfg = tiny_config(tmp_path, data_root)
    proc = start_torchrun(cfg, port=29549, SCALEKD_TEST_NAN='1:2')  # rank 1, step 2
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert 'non-finite loss at epoch 1, step 2 in term(s) loss' in err, err[-3000:]
    assert [p.name for p in checkpoints_by_age(tmp_path / 'run')] == ['checkpoint-0000-000001.pth']
    assert load_checkpoint(tmp_path / 'run' / 'checkpoint-0000-000001.pth')['progress']['step'] == 1


@pytest.mark.slow
def test_a_nan_on_one_rank_is_skipped_by_both(data_root, tmp_path):
    cfg = tiny_config(tmp_path, data_root)
    finish(start_torchrun(cfg, '--max-nan-skips', '1', port=29551, SCALEKD_TEST_NAN='1:2'), timeout=300)
    state = load_checkpoint(tmp_path / 'run' / 'checkpoint-0002.pth')
    assert state['progress']['nan_skips'] == 1 and state['progress']['step'] == 6
    assert 'update skipped (1/1 skips used)' in (tmp_path / 'run' / 'train.log').read_text()


@pytest.mark.slow
def test_ddp_with_accumulation_updates_like_one_process_with_the_same_global_batch(data_root, tmp_path):
    """2 processes x 2 accumulation steps x 2 images = one process x 8 images (LayerNorm everywhere:
    ConvNeXt student and its LN projectors, so the batch split does not change the math; 64 px, so
    that the student's final map is 2x2: the DC-removed view of a 1x1 map has no gradient to speak of)."""
    student = dict(model='convnext_atto', kwargs=dict(depths=[1, 1, 1, 1], dims=[16, 24, 32, 48]))
    teacher = dict(kwargs=dict(patch_size=16, embed_dim=64, depth=4, num_heads=2))
    common = dict(student=student, teacher=teacher, data=dict(img_size=64), sched=dict(epochs=1))
    for sub in ('one', 'two'):
        (tmp_path / sub).mkdir()
    one = tiny_config(tmp_path / 'one', data_root, **common)
    assert main(['train', str(one), '--deterministic']) == 0
    two = tiny_config(tmp_path / 'two', data_root, train=dict(accum_steps=2), **common)
    finish(start_torchrun(two, '--deterministic', port=29553))
    a = load_checkpoint(tmp_path / 'one' / 'run' / 'checkpoint-0001.pth')
    b = load_checkpoint(tmp_path / 'two' / 'run' / 'checkpoint-0001.pth')
    assert a['progress']['step'] == b['progress']['step'] == 3
    for key, value in a['student'].items():
        torch.testing.assert_close(b['student'][key], value, rtol=1e-4, atol=1e-5, msg=key)
    for key, value in a['task_state']['distill'].items():
        torch.testing.assert_close(b['task_state']['distill'][key], value, rtol=1e-4, atol=1e-5, msg=key)


def _rank_pid(rank: int) -> int:
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            environ = Path(f'/proc/{pid}/environ').read_bytes().split(b'\0')
            cmd = Path(f'/proc/{pid}/cmdline').read_bytes()
        except OSError:
            continue
        if b'traced_train.py' in cmd and f'RANK={rank}'.encode() in environ and b'torch.distributed.run' not in cmd:
            return int(pid)
    raise AssertionError(f'rank {rank} not found')


@pytest.mark.slow
def test_a_dead_rank_stops_the_others_in_bounded_time(tmp_path, data_root):
    cfg = tiny_config(tmp_path, data_root, sched=dict(epochs=50))
    proc = start_torchrun(cfg, port=29555)
    wait_for(tmp_path / 'run' / 'metrics.jsonl', proc)
    os.kill(_rank_pid(1), signal.SIGKILL)
    start = time.time()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.time() - start < 120
    assert 'FAILED' in err or 'ChildFailedError' in err, err[-2000:]


@pytest.mark.slow
def test_a_refusal_on_the_main_process_stops_every_rank_at_once(straight, data_root, tmp_path):
    """The main process finds the folder holds a checkpoint (no --resume): every rank exits 2, none waits for the
    others until the timeout; the message is printed once, by the main process."""
    (tmp_path / 'run').mkdir()
    save_checkpoint(load_checkpoint(straight / 'checkpoint-0001.pth'), tmp_path / 'run' / 'checkpoint-0001.pth')
    cfg = tiny_config(tmp_path, data_root, train=dict(dist_timeout_s=600))
    proc = start_torchrun(cfg, port=29557)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert err.count('holds checkpoint-0001.pth, which no scalekd run wrote there') == 1, err
    assert err.count('scalekd train: error:') == 1, err


def _assert_equal_training_states(a: dict, b: dict) -> None:
    for key, value in a['student'].items():
        assert torch.equal(value, b['student'][key]), key
    for key, value in a['task_state']['distill'].items():
        assert torch.equal(value, b['task_state']['distill'][key]), key
    assert a['optimizer']['state'].keys() == b['optimizer']['state'].keys()
    for index, slots in a['optimizer']['state'].items():
        for name, value in slots.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b['optimizer']['state'][index][name])), (index, name)


def _with_whole_optimizer_state(checkpoint: Path) -> dict:
    """A train.zero checkpoint with its ranks' optimizer shards read whole."""
    state = load_checkpoint(checkpoint)
    return dict(state, optimizer=optimizer_state_of(state, checkpoint, None))


@pytest.mark.slow
def test_zero_trains_like_plain_ddp_and_checkpoints_the_whole_optimizer_state(straight2, data_root, tmp_path):
    """train.zero on 2 processes: every step's losses, the weights and the optimizer state written to the
    checkpoint (both ranks' shards, read whole) equal plain DDP's."""
    cfg = tiny_config(tmp_path, data_root, train=dict(EVERY_STEP, zero=True))
    finish(start_torchrun(cfg, '--deterministic', port=29561))
    run = tmp_path / 'run'
    assert 'optimizer state sharded over 2 processes' in (run / 'train.log').read_text()
    assert [computed(r) for r in step_lines(run)] == [computed(r) for r in step_lines(straight2)]
    for name in ('checkpoint-0000-000001.pth', 'checkpoint-0002.pth'):
        _assert_equal_training_states(load_checkpoint(straight2 / name), _with_whole_optimizer_state(run / name))


@pytest.mark.slow
def test_a_plain_checkpoint_resumes_under_zero_and_ends_where_plain_ddp_ends(straight2, data_root, tmp_path):
    """A checkpoint of plain DDP, resumed mid-epoch with train.zero (each rank takes its shard of the
    optimizer state from the whole one), ends with plain DDP's weights and optimizer state."""
    _resume_folder(tmp_path, straight2 / 'checkpoint-0000-000002.pth')
    cfg = tiny_config(tmp_path, data_root, train=dict(EVERY_STEP, zero=True))
    finish(start_torchrun(cfg, '--deterministic', '--resume', 'auto', port=29563))
    _assert_equal_training_states(load_checkpoint(straight2 / 'checkpoint-0002.pth'),
                                  _with_whole_optimizer_state(tmp_path / 'run' / 'checkpoint-0002.pth'))


def _join(rank: int, port: int) -> DistEnv:
    """This spawned process as rank ``rank`` of 2 in a gloo group, as under torchrun."""
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE='2')
    return init_distributed('cpu', timeout_s=60)


def _optimizer_shard(rank: int, port: int, out: Path) -> None:
    """One of 2 processes: an AdamW step of a 4-layer MLP under train.zero; writes the elements of the
    parameters this rank keeps optimizer state for, and of all parameters."""
    env = _join(rank, port)
    torch.manual_seed(0)
    module = torch.nn.Sequential(*(torch.nn.Linear(32, 32) for _ in range(4)))
    optimizer = build_optimizer(module, OptimConfig(opt='adamw', lr=1e-3), env, zero=True)
    module(torch.randn(2, 32)).sum().backward()
    optimizer.step()
    held = sum(s['exp_avg'].numel() for s in optimizer.optim.state.values())
    (out / f'rank{rank}').write_text(f'{held} {sum(p.numel() for p in module.parameters())}')
    cleanup(env)
    exit_process(0)


@pytest.mark.slow
def test_zero_keeps_about_half_the_optimizer_state_on_each_of_two_ranks(tmp_path):
    torch.multiprocessing.spawn(_optimizer_shard, args=(29565, tmp_path), nprocs=2)
    (held0, total), (held1, _) = [map(int, (tmp_path / f'rank{r}').read_text().split()) for r in (0, 1)]
    assert held0 + held1 == total and max(held0, held1) <= 0.55 * total


def _leave_with_collectives_in_flight(rank: int, port: int) -> None:
    """Rank ``rank`` of 2 starts 200 all-reduces and exits with 3 without waiting for them: gloo's
    workers then release finished collectives while the process ends."""
    _join(rank, port)
    for _ in range(200):
        torch.distributed.all_reduce(torch.ones(1000), async_op=True)
    exit_process(3)


@pytest.mark.slow
def test_a_rank_leaving_while_gloo_finishes_collectives_exits_with_its_code_not_an_abort():
    """Interpreter finalization with gloo workers still releasing tensors aborts the process (SIGABRT,
    "terminate called without an active exception"), every time in this case; exit_process does not."""
    processes = torch.multiprocessing.spawn(_leave_with_collectives_in_flight, args=(29567,), nprocs=2,
                                            join=False).processes
    for p in processes:
        p.join(120)
    assert [p.exitcode for p in processes] == [3, 3]
