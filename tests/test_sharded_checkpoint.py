"""Checkpoints of a sharded optimizer (train.zero on several processes): each rank writes its shard with
torch's distributed checkpoint into ``checkpoint-*.pth.optim/`` and no process gathers the whole state; a
resume on any number of processes takes the step the uninterrupted run takes; the folder follows the run
folder's rules (written whole or not at all, pruned, set aside and deleted with its checkpoint, never a link)."""
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

from engine_fixtures import tiny_config
from run_tools import finish, start_torchrun
from scalekd.cli import main
from scalekd.engine.inputs.config import OptimConfig
from scalekd.engine.run_folder.checkpoint import load_checkpoint, read_training_checkpoint, save_checkpoint
from scalekd.engine.run_folder.files import RunFolder
from scalekd.engine.run_folder.history import RunOutput
from scalekd.engine.run_folder.optimizer_shards import checkpoint_optimizer_state, optimizer_state_of
from scalekd.engine.runtime.distributed import DistEnv, cleanup, exit_process, init_distributed
from scalekd.engine.runtime.optimizer import build_optimizer, load_optimizer_state, owned_indices

EVERY_STEP = dict(checkpoint_every_steps=1, keep_checkpoints=20, zero=True)


# -- the optimizer alone: a 4-layer MLP under AdamW, the same gradients on every rank ----------------------
def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*(torch.nn.Linear(16, 16) for _ in range(4)))


def _step(module: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    torch.manual_seed(100 + step)
    optimizer.zero_grad()
    (module(torch.randn(4, 16)) ** 2).sum().backward()
    optimizer.step()


def _join(rank: int, world: int, port: int) -> DistEnv:
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    return init_distributed('cpu', timeout_s=60)


def _never_gathered(*args, **kwargs):
    raise AssertionError('the whole optimizer state was gathered')


def _write_rank(rank: int, port: int, out: Path) -> None:
    """Rank ``rank`` of 2: two AdamW steps under ZeRO, then checkpoint ``checkpoint-0000-000002.pth`` of a run
    folder in ``out`` (the main process writes the file); each rank writes the indices it owns."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    ZeroRedundancyOptimizer.consolidate_state_dict = _never_gathered
    env = _join(rank, 2, port)
    module = _mlp()
    optimizer = build_optimizer(module, OptimConfig(opt='adamw', lr=1e-2), env, zero=True)
    for step in (1, 2):
        _step(module, optimizer, step)
    output = None
    if env.is_main:
        output = RunOutput(str(out / 'run'), keep=0, note=print, writes=())
        output.open(None, False)
        output.start(fresh=True)
    entry = checkpoint_optimizer_state(optimizer, env, output, 'checkpoint-0000-000002.pth', 2)
    if output is not None:
        output.write(dict(optimizer=entry, model=module.state_dict()), 'checkpoint-0000-000002.pth', 2, False)
        output.release()
    (out / f'owned{rank}').write_text(' '.join(map(str, sorted(owned_indices(optimizer)))))
    cleanup(env)
    exit_process(0)


def _resume_rank(rank: int, world: int, port: int, checkpoint: Path, out: Path) -> None:
    """Rank ``rank`` of ``world``: the MLP and its AdamW (ZeRO) from ``checkpoint``, one more step; rank 0
    saves the weights."""
    env = _join(rank, world, port)
    module, state = _mlp(), load_checkpoint(checkpoint)
    module.load_state_dict(state['model'])
    optimizer = build_optimizer(module, OptimConfig(opt='adamw', lr=1e-2), env, zero=True)
    load_optimizer_state(optimizer, optimizer_state_of(state, checkpoint, owned_indices(optimizer)))
    _step(module, optimizer, 3)
    if env.is_main:
        torch.save(module.state_dict(), out / f'resumed_on_{world}.pt')
    cleanup(env)
    exit_process(0)


def _plain(steps: int):
    module = _mlp()
    optimizer = build_optimizer(module, OptimConfig(opt='adamw', lr=1e-2), DistEnv())
    for step in range(1, steps + 1):
        _step(module, optimizer, step)
    return module, optimizer


@pytest.fixture(scope='module')
def shards(tmp_path_factory):
    """The run folder of the 2-rank ZeRO checkpoint after 2 steps (see :func:`_write_rank`)."""
    out = tmp_path_factory.mktemp('shards')
    torch.multiprocessing.spawn(_write_rank, args=(29711, out), nprocs=2)
    return out


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_each_rank_writes_the_state_of_the_parameters_it_owns_and_none_gathers(shards):
    run = shards / 'run'
    folder = run / 'checkpoint-0000-000002.pth.optim'
    assert sorted(p.name for p in folder.iterdir()) == ['.metadata', '__0_0.distcp', '__1_0.distcp']
    entry = load_checkpoint(run / 'checkpoint-0000-000002.pth')['optimizer']
    assert 'state' not in entry and entry['shards'] == dict(folder=folder.name, format='torch.distributed.checkpoint',
                                                            processes=2)
    owned = [set(map(int, (shards / f'owned{r}').read_text().split())) for r in (0, 1)]
    assert owned[0] and owned[1] and not owned[0] & owned[1] and owned[0] | owned[1] == set(range(8))
    with open(folder / '.metadata', 'rb') as f:
        stored = pickle.load(f).storage_data  # (a test's own file)
    for key, info in stored.items():
        assert int(key.fqn.split('/')[1]) in owned[int(info.relative_path[2])], (key.fqn, info.relative_path)
    # the shards hold exactly the plain optimizer's state after the same steps
    _, plain = _plain(2)
    whole = optimizer_state_of(dict(optimizer=entry), run / 'checkpoint-0000-000002.pth', None)
    expected = plain.state_dict()
    assert whole['param_groups'] == expected['param_groups'] and whole['state'].keys() == expected['state'].keys()
    for index, slots in expected['state'].items():
        assert whole['state'][index].keys() == slots.keys()
        for name, value in slots.items():
            assert torch.equal(whole['state'][index][name], value), (index, name)


@pytest.mark.slow
@pytest.mark.parametrize('world', [1, 2, 3])
def test_a_sharded_checkpoint_resumes_on_any_number_of_processes_with_the_uninterrupted_step(shards, world, tmp_path):
    checkpoint = shards / 'run' / 'checkpoint-0000-000002.pth'
    reference, _ = _plain(3)
    if world == 1:  # a plain optimizer: the whole state, read by this process
        module, state = _mlp(), load_checkpoint(checkpoint)
        module.load_state_dict(state['model'])
        optimizer = build_optimizer(module, OptimConfig(opt='adamw', lr=1e-2), DistEnv())
        load_optimizer_state(optimizer, optimizer_state_of(state, checkpoint, owned_indices(optimizer)))
        _step(module, optimizer, 3)
        resumed = module.state_dict()
    else:
        torch.multiprocessing.spawn(_resume_rank, args=(world, 29713 + world, checkpoint, tmp_path), nprocs=world)
        resumed = torch.load(tmp_path / f'resumed_on_{world}.pt')
    _assert_same_weights(reference.state_dict(), resumed)
    for a, b in zip(reference.state_dict().values(), load_checkpoint(checkpoint)['model'].values()):
        assert not torch.equal(a, b)  # the step moved every weight


# -- the run folder's rules ---------------------------------------------------------------------------------
def _series(tmp_path: Path, names, link_target: Path = None) -> RunFolder:
    """A run folder listing checkpoints ``names`` (files with their optimizer folders)."""
    folder = RunFolder(str(tmp_path / 'run'))
    folder.acquire()
    folder.mark(fresh=True, files=())
    for step, name in enumerate(names, 1):
        folder.record(folder.path / name, step)
        (folder.path / name).write_bytes(b'x')
        (folder.path / f'{name}.optim').mkdir()
        (folder.path / f'{name}.optim' / '__0_0.distcp').write_bytes(b'y')
    return folder


def test_pruning_deletes_a_checkpoints_optimizer_folder_with_it_never_a_link(tmp_path):
    outside = tmp_path / 'outside'
    outside.mkdir()
    (outside / 'keep.txt').write_text('mine')
    folder = _series(tmp_path, ['checkpoint-0001.pth', 'checkpoint-0002.pth', 'checkpoint-0003.pth'])
    shutil.rmtree(folder.path / 'checkpoint-0002.pth.optim')
    (folder.path / 'checkpoint-0002.pth.optim').symlink_to(outside)
    assert folder.prune(1) == ['checkpoint-0001.pth', 'checkpoint-0002.pth']
    assert sorted(p.name for p in folder.path.iterdir() if p.name.startswith('checkpoint')) == [
        'checkpoint-0002.pth.optim', 'checkpoint-0003.pth', 'checkpoint-0003.pth.optim']
    assert (folder.path / 'checkpoint-0002.pth.optim').is_symlink() and (outside / 'keep.txt').read_text() == 'mine'
    folder.release()


def test_force_deletes_the_optimizer_folders_of_its_run_and_refuses_anothers(tmp_path):
    folder = _series(tmp_path, ['checkpoint-0001.pth'])
    replaced = folder.check_fresh(force=True, writes=())
    assert folder.path / 'checkpoint-0001.pth.optim' in replaced
    folder.remove(replaced)
    assert not (folder.path / 'checkpoint-0001.pth.optim').exists()
    folder.release()
    stranger = RunFolder(str(tmp_path / 'other'))
    stranger.acquire()
    (stranger.path / 'checkpoint-0004.pth.optim').mkdir()
    with pytest.raises(Exception, match=r'holds checkpoint-0004\.pth\.optim, which no scalekd run wrote there'):
        stranger.check_fresh(force=True, writes=())
    assert (stranger.path / 'checkpoint-0004.pth.optim').is_dir()
    stranger.release()


def _full_disk_rank(rank: int, port: int, out: Path) -> None:
    """Rank ``rank`` of 2: checkpoint step 1 (ZeRO), then step 2 with rank 1's shard write failing for want
    of space; each rank records the error it got."""
    import errno
    import torch.distributed.checkpoint.filesystem as dcp_files
    from scalekd.engine.run_folder.checkpoint import CheckpointError
    env = _join(rank, 2, port)
    module = _mlp()
    optimizer = build_optimizer(module, OptimConfig(opt='adamw', lr=1e-2), env, zero=True)
    output = None
    if env.is_main:
        output = RunOutput(str(out / 'run'), keep=0, note=print, writes=())
        output.open(None, False)
        output.start(fresh=True)
    for step in (1, 2):
        _step(module, optimizer, step)
        name = f'checkpoint-0000-00000{step}.pth'
        if step == 2 and rank == 1:
            def full(*args, **kwargs):
                raise OSError(errno.ENOSPC, 'No space left on device')
            dcp_files._write_item = full
        try:
            entry = checkpoint_optimizer_state(optimizer, env, output, name, step)
        except CheckpointError as e:
            (out / f'error{rank}').write_text(str(e))
            break
        if output is not None:
            output.write(dict(optimizer=entry, model=module.state_dict()), name, step, False)
    if output is not None:
        output.release()
    cleanup(env)
    exit_process(0)


@pytest.mark.slow
def test_a_full_disk_while_the_shards_are_written_is_one_line_on_every_rank(tmp_path):
    torch.multiprocessing.spawn(_full_disk_rank, args=(29731, tmp_path), nprocs=2)
    errors = [(tmp_path / f'error{r}').read_text() for r in (0, 1)]
    assert errors[0] == errors[1] and '\n' not in errors[0]
    assert errors[0] == ('writing the optimizer shards of checkpoint-0000-000002.pth failed: the disk is full (the '
                         'partial shards are removed); the previous checkpoint is intact')
    run = tmp_path / 'run'
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith('.')) == [
        'checkpoint-0000-000001.pth', 'checkpoint-0000-000001.pth.optim', 'scalekd-run.json']
    state = load_checkpoint(run / 'checkpoint-0000-000001.pth')
    assert optimizer_state_of(state, run / 'checkpoint-0000-000001.pth', None)['state']  # the previous one reads


def test_unfinished_shard_writes_are_removed_and_a_set_aside_checkpoint_takes_its_folder(tmp_path):
    folder = _series(tmp_path, ['checkpoint-0001.pth', 'checkpoint-0002.pth'])
    (folder.path / 'checkpoint-0002.pth').unlink()  # killed after its shards, before its file
    (folder.path / '.checkpoint-0003.pth.optim.k2j4.tmp').mkdir()  # killed while the ranks wrote
    assert folder.remove_partial_writes() == ['.checkpoint-0003.pth.optim.k2j4.tmp', 'checkpoint-0002.pth.optim']
    assert (folder.path / 'checkpoint-0001.pth.optim').is_dir()
    aside = folder.set_aside([folder.path / 'checkpoint-0001.pth'], 0)
    assert sorted(p.name for p in aside.iterdir()) == ['checkpoint-0001.pth', 'checkpoint-0001.pth.optim']
    folder.release()


# -- training runs --------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def zero2(tmp_path_factory, data_root):
    """A deterministic 2-process train.zero run, a checkpoint every step."""
    tmp = tmp_path_factory.mktemp('zero2')
    finish(start_torchrun(tiny_config(tmp, data_root, train=EVERY_STEP), '--deterministic', port=29721))
    return tmp / 'run'


def _copy(checkpoint: Path, run: Path) -> Path:
    """``checkpoint`` and its optimizer folder in ``run`` (a run stopped there)."""
    run.mkdir(exist_ok=True)
    shutil.copy(checkpoint, run / checkpoint.name)
    shutil.copytree(checkpoint.with_name(checkpoint.name + '.optim'), run / (checkpoint.name + '.optim'))
    return run / checkpoint.name


def _whole(checkpoint: Path) -> dict:
    state = read_training_checkpoint(checkpoint)
    return dict(state, optimizer=optimizer_state_of(state, checkpoint, None))


def _assert_equal_states(a: dict, b: dict) -> None:
    _assert_same_weights(a['student'], b['student'])
    _assert_same_weights(a['task_state']['distill'], b['task_state']['distill'])
    assert a['optimizer']['state'].keys() == b['optimizer']['state'].keys()
    for index, slots in a['optimizer']['state'].items():
        for name, value in slots.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b['optimizer']['state'][index][name]))


@pytest.mark.slow
def test_a_zero_run_resumed_on_two_processes_ends_where_the_uninterrupted_one_ends(zero2, data_root, tmp_path):
    _copy(zero2 / 'checkpoint-0000-000002.pth', tmp_path / 'run')
    cfg = tiny_config(tmp_path, data_root, train=EVERY_STEP)
    finish(start_torchrun(cfg, '--deterministic', '--resume', 'auto', port=29723))
    _assert_equal_states(_whole(zero2 / 'checkpoint-0002.pth'), _whole(tmp_path / 'run' / 'checkpoint-0002.pth'))


def _killed_after_shards(rank: int, port: int, cfg: Path) -> None:
    """Rank ``rank`` of 2 trains ``cfg``; the main process dies once the shards of the third checkpoint
    are in place, before its file is written."""
    from scalekd.engine.run_folder import history
    place = history.RunOutput.commit_shards

    def commit_then_die(self, temp, name):
        place(self, temp, name)
        if name == 'checkpoint-0001.pth':
            os._exit(9)
    history.RunOutput.commit_shards = commit_then_die
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE='2', OMP_NUM_THREADS='1')
    torch.set_num_threads(1)
    exit_process(main(['train', str(cfg), '--deterministic']))


@pytest.mark.slow
def test_a_kill_between_the_shards_and_the_checkpoint_file_resumes_from_the_checkpoint_before(zero2, data_root,
                                                                                               tmp_path):
    cfg = tiny_config(tmp_path, data_root, train=EVERY_STEP)
    processes = torch.multiprocessing.spawn(_killed_after_shards, args=(29725, cfg), nprocs=2, join=False).processes
    for p in processes:
        p.join(300)
    run = tmp_path / 'run'
    assert processes[0].exitcode == 9 and (run / 'checkpoint-0001.pth.optim').is_dir()
    assert not (run / 'checkpoint-0001.pth').exists()
    finish(start_torchrun(cfg, '--deterministic', '--resume', 'auto', port=29727))
    log = (run / 'train.log').read_text()
    assert 'removed unfinished writes checkpoint-0001.pth.optim' in log
    assert 'checkpoint-0000-000002.pth at epoch 0 + 2 updates, step 2' in log
    _assert_equal_states(_whole(zero2 / 'checkpoint-0002.pth'), _whole(run / 'checkpoint-0002.pth'))


@pytest.mark.slow
def test_a_zero_checkpoint_resumes_on_one_process_and_exports(zero2, data_root, tmp_path):
    _copy(zero2 / 'checkpoint-0001-000002.pth', tmp_path / 'run')
    cfg = tiny_config(tmp_path, data_root, train=EVERY_STEP)
    assert main(['train', str(cfg), '--resume', 'auto']) == 0
    assert 'at epoch 1 + 2 updates, step 5' in (tmp_path / 'run' / 'train.log').read_text()
    assert 'state' in load_checkpoint(tmp_path / 'run' / 'checkpoint-0002.pth')['optimizer']  # one process: whole
    lone = tmp_path / 'lone'
    lone.mkdir()
    shutil.copy(zero2 / 'checkpoint-0002.pth', lone)  # without its optimizer folder
    assert main(['export', str(lone / 'checkpoint-0002.pth'), '--out', str(tmp_path / 'export')]) == 0
    assert (tmp_path / 'export' / 'model.safetensors').is_file()


class _Marker:
    def __reduce__(self):
        return os.system, ('touch pwned',)


@pytest.mark.slow
@pytest.mark.parametrize('damage, reason', [
    ('remove', 'which is missing'),
    ('shard', r'which is damaged: __1_0\.distcp is missing'),
    ('cut', r'which is damaged: __0_0\.distcp is cut short'),
    ('pickle', r'which is damaged: its \.metadata does not load \(it names posix\.system'),
])
def test_a_missing_or_damaged_optimizer_folder_is_one_line_at_resume(zero2, data_root, tmp_path, capsys, damage,
                                                                     reason, monkeypatch):
    checkpoint = _copy(zero2 / 'checkpoint-0002.pth', tmp_path / 'run')
    folder = tmp_path / 'run' / 'checkpoint-0002.pth.optim'
    if damage == 'remove':
        shutil.rmtree(folder)
    elif damage == 'shard':
        (folder / '__1_0.distcp').unlink()
    elif damage == 'cut':
        with open(folder / '__0_0.distcp', 'r+b') as f:
            f.truncate(1000)
    else:
        (folder / '.metadata').write_bytes(pickle.dumps(_Marker()))
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(tmp_path, data_root, train=EVERY_STEP)
    assert main(['train', str(cfg), '--resume', str(checkpoint)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'Traceback' not in err, err
    assert f'keeps its optimizer state in {folder}, ' in err and re.search(reason, err), err
    assert not (tmp_path / 'pwned').exists()
