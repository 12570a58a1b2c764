"""The CUDA paths, on a GPU: tests marked ``cuda`` (``pytest -m cuda``; skipped where there is none).

One ScaleKD step per precision with channels_last against the CPU fp32 step, a compiled step against
the eager one, checkpoints moved between GPU and CPU, ``deterministic: true`` giving bitwise-equal
runs, the allocator's peak memory, one process in a real NCCL group under torchrun. Every test also
has a CPU case, which CI runs: it checks the harness itself, so that a GPU run meets no untested
test code.
"""
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, Tuple

import pytest
import torch

from engine_fixtures import tiny_config
from run_tools import computed, metrics, step_lines
from scalekd import build_distiller
from scalekd.cli import main
from scalekd.engine.run_folder.optimizer_shards import optimizer_state_of
from scalekd.engine.run_folder.checkpoint import load_checkpoint, save_checkpoint
from scalekd.engine.inputs.config import OptimConfig, TrainConfig
from scalekd.engine.runtime.cuda_settings import configure_backends
from scalekd.engine.runtime.distributed import DistEnv
from scalekd.engine.runtime.memory import peak_memory_mb, reset_peak_memory
from scalekd.engine.runtime.optimizer import build_optimizer, optimizer_step
from scalekd.engine.runtime.precision import autocast
from tiny_models import SWIN_IMG, make_student, make_teacher

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device (torch.cuda.is_available() is False)')


def on_gpu(*values):
    """A parameter set that needs the GPU: marked ``cuda``, skipped without one."""
    return pytest.param(*values, marks=(pytest.mark.cuda, needs_cuda))


# Relative error allowed against the reference step, per precision: (each loss term, the whole update).
# On this pair, bf16 autocast on the CPU moves the update by about a quarter (a randomly initialised
# student's gradients are that sensitive) and the losses by well under 1%, fp16 by about a tenth and
# 0.03%; fp32 with TF32 off differs only in summation order. The limits are 2-3 times those.
TOLERANCE = {'fp32': (1e-4, 1e-3), 'bf16': (2e-2, 0.5), 'fp16': (5e-3, 0.25)}
CLIP = 1.0
BATCH = 8


@pytest.fixture(autouse=True)
def _full_fp32():
    """fp32 that is fp32 on the GPU too (no TF32), no cuDNN autotuning; torch's flags restored after."""
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    configure_backends(TrainConfig(tf32=False, cudnn_benchmark=False))
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = flags


def _pair(device: str):
    """A tiny Swin teacher and ResNet-D student at 64 px (2x2 final maps), the same weights on every
    device, built there as the trainer builds them."""
    torch.manual_seed(0)
    return build_distiller(make_teacher('swin', SWIN_IMG), make_student('resnet_d', SWIN_IMG), img_size=SWIN_IMG,
                           device=torch.device(device))


def _batch(device: str) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(BATCH, 3, SWIN_IMG, SWIN_IMG, generator=g)
    return images.to(device), torch.arange(BATCH).remainder(10).to(device)


def _step(task, device: str, precision: str, channels_last: bool) -> Dict[str, object]:
    """One training step as the trainer takes it (autocast, a GradScaler for fp16, clipping, SGD with
    momentum and weight decay): the loss terms, the update of every trainable weight (one CPU vector),
    the gradient norm before clipping, and the scaler's scale after its update."""
    images, targets = _batch(device)
    if channels_last:
        task.trainable_module.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = build_optimizer(task.trainable_module, OptimConfig(opt='sgd', lr=0.1, momentum=0.9), DistEnv())
    scaler = torch.amp.GradScaler(torch.device(device).type, init_scale=2.0 ** 10) if precision == 'fp16' else None
    params = [p for p in task.trainable_module.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    task.train()
    with autocast(precision, images.device):
        out = task(images, targets)
    (scaler.scale(out['loss']) if scaler is not None else out['loss']).backward()
    scale = scaler.get_scale() if scaler is not None else 1.0
    grad_norm = torch.stack([p.grad.float().norm() for p in params if p.grad is not None]).norm().item() / scale
    optimizer_step(optimizer, scaler, task.get_clip_parameters(), CLIP)
    update = torch.cat([(p.detach() - b).double().flatten().cpu() for p, b in zip(params, before)])
    return dict(losses={k: float(v.detach()) for k, v in out.items() if k != 'output'}, update=update, grad_norm=grad_norm,
                scale=scaler.get_scale() if scaler is not None else None)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _assert_close_step(got, ref, precision: str) -> None:
    loss_tol, update_tol = TOLERANCE[precision]
    assert got['losses'].keys() == ref['losses'].keys()
    for name, value in ref['losses'].items():
        assert abs(got['losses'][name] - value) <= loss_tol * abs(value), (name, got['losses'][name], value)
    assert _relative(got['update'], ref['update']) <= update_tol


@pytest.mark.parametrize('device, precision', [('cpu', 'fp32'), ('cpu', 'bf16'), ('cpu', 'fp16'),
                                               on_gpu('cuda', 'fp32'), on_gpu('cuda', 'bf16'), on_gpu('cuda', 'fp16')])
@pytest.mark.slow
def test_a_channels_last_step_in_each_precision_matches_the_cpu_fp32_step(device, precision):
    """A full ScaleKD step (TPP, both views, KD) with channels_last, against the CPU fp32 step in the
    default layout. fp16 runs with a GradScaler whose first scale leaves the step finite (the scale
    unchanged says it was taken), clipping on the unscaled gradients."""
    ref = _step(_pair('cpu'), 'cpu', 'fp32', channels_last=False)
    assert ref['grad_norm'] > CLIP  # the clipping acts
    got = _step(_pair(device), device, precision, channels_last=True)
    _assert_close_step(got, ref, precision)
    if precision == 'fp16':
        assert got['scale'] == 2.0 ** 10


@pytest.mark.parametrize('device, backend, precision', [pytest.param('cpu', 'eager', 'fp32', marks=pytest.mark.slow),
                                                        on_gpu('cuda', 'inductor', 'fp32')])
def test_a_compiled_step_equals_the_eager_step(device, backend, precision):
    """``Distiller.compile`` as ``train.compile`` calls it (inductor, the default, on the GPU; on the CPU
    dynamo's graphs run eagerly, as inductor's code generation there takes minutes): one channels_last
    step equals the eager one within the precision's tolerance. (The GPU check's bench runs the bf16
    compiled step at full size.)"""
    eager = _step(_pair(device), device, precision, channels_last=True)
    task = _pair(device)
    task.compile(backend=backend)
    try:
        compiled = _step(task, device, precision, channels_last=True)
    finally:
        torch._dynamo.reset()
    _assert_close_step(compiled, eager, precision)


@pytest.mark.parametrize('device', ['cpu', on_gpu('cuda')])
def test_peak_memory_is_read_from_the_devices_allocator(device):
    """On CUDA the peak since a reset is the caching allocator's: it covers a 64 MiB tensor and drops
    once the tensor is freed and the peak reset. On the CPU it is the resident set's high-water mark
    (a freed block may be reused there, so only its presence is checked)."""
    device = torch.device(device)
    if not reset_peak_memory(device):
        pytest.skip('this system cannot reset the CPU peak resident set')
    before = peak_memory_mb(device)
    block = torch.ones(16 * 2 ** 20, device=device)  # 64 MiB, every page written
    peak = peak_memory_mb(device)
    if device.type == 'cuda':
        assert peak >= before + 63 and peak == torch.cuda.max_memory_allocated(device) / 2 ** 20
        del block
        reset_peak_memory(device)
        assert peak_memory_mb(device) <= peak - 63
    else:
        status = Path('/proc/self/status').read_text()
        rss_mb = int(next(line for line in status.splitlines() if line.startswith('VmRSS:')).split()[1]) / 1024
        assert peak >= rss_mb - 1 and rss_mb >= block.numel() * 4 / 2 ** 20


def _two_step_config(tmp: Path, data_root: Path, **train) -> Path:
    """The tiny engine run for two steps (16 images, batch 8), a checkpoint after each, full fp32."""
    tmp.mkdir(parents=True, exist_ok=True)
    return tiny_config(tmp, data_root, data=dict(train_subset=16), sched=dict(epochs=1),
                       train=dict(checkpoint_every_steps=1, keep_checkpoints=10, tf32=False, **train),
                       log=dict(tensorboard=False))


def _weights(state: Dict, key: str = 'student') -> Dict[str, torch.Tensor]:
    return {k: v.double() for k, v in state[key].items() if v.is_floating_point()}


@pytest.mark.parametrize('write, resume', [('cpu', 'cpu'), on_gpu('cuda', 'cpu'), on_gpu('cpu', 'cuda')])
def test_a_checkpoint_resumes_on_the_other_device_with_the_same_next_step(write, resume, tmp_path, data_root):
    """A checkpoint written after step 1 on one device, resumed on the other: step 2 has the loss and
    the update of the run that went on where it was written (exactly so on the CPU), and its epoch
    line reports the device's peak memory."""
    cfg = _two_step_config(tmp_path / 'straight', data_root)
    assert main(['train', str(cfg), '--device', write, '--deterministic']) == 0
    straight = tmp_path / 'straight' / 'run'
    resumed_cfg = _two_step_config(tmp_path / 'resumed', data_root)
    resumed = tmp_path / 'resumed' / 'run'
    resumed.mkdir()
    save_checkpoint(load_checkpoint(straight / 'checkpoint-0000-000001.pth'), resumed / 'checkpoint-0000-000001.pth')
    assert main(['train', str(resumed_cfg), '--device', resume, '--deterministic', '--resume', 'auto']) == 0

    [ref_line], [line] = step_lines(straight)[1:], step_lines(resumed)
    assert line['step'] == ref_line['step'] == 2
    same_device = write == resume
    loss_tol, update_tol = (0.0, 0.0) if same_device else TOLERANCE['fp32']
    assert abs(line['loss'] - ref_line['loss']) <= loss_tol * abs(ref_line['loss'])
    start = _weights(load_checkpoint(straight / 'checkpoint-0000-000001.pth'))
    ref_end, end = (_weights(load_checkpoint(run / 'checkpoint-0001.pth')) for run in (straight, resumed))
    assert end.keys() == ref_end.keys() == start.keys()
    ref_update = torch.cat([(ref_end[k] - start[k]).flatten() for k in start])
    update = torch.cat([(end[k] - start[k]).flatten() for k in start])
    assert ref_update.norm() > 0 and _relative(update, ref_update) <= update_tol
    epoch = [r for r in metrics(resumed) if 'train_peak_mem_mb' in r][-1]
    model_mb = sum(v.numel() * 4 for v in end.values()) / 2 ** 20
    assert epoch['train_peak_mem_mb'] > model_mb


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _run(args, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """A command in a child process without ``CUBLAS_WORKSPACE_CONFIG`` (the engine must set it), one
    thread per process; it must succeed."""
    env = {k: v for k, v in os.environ.items() if k != 'CUBLAS_WORKSPACE_CONFIG'}
    result = subprocess.run(args, cwd=cwd, env=dict(env, OMP_NUM_THREADS='1'), capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    return result


def _train_child(cfg: Path, device: str) -> None:
    _run([sys.executable, '-m', 'scalekd.cli', 'train', str(cfg), '--device', device, '--deterministic'], cfg.parent)


def _state_tensors(state, prefix: str = '') -> Dict[str, torch.Tensor]:
    """Every tensor of a (nested) checkpoint, by its path."""
    if isinstance(state, torch.Tensor):
        return {prefix: state}
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    out = {}
    for key, value in items:
        out.update(_state_tensors(value, f'{prefix}/{key}'))
    return out


def _assert_same_training(a: Path, b: Path) -> None:
    """Two runs with bitwise-equal final weights, task state and optimizer state, and the same logged numbers."""
    states = [load_checkpoint(run / 'checkpoint-0001.pth') for run in (a, b)]
    states = [dict(s, optimizer=optimizer_state_of(s, run / 'checkpoint-0001.pth', None))  # train.zero's shards, whole
              for s, run in zip(states, (a, b))]
    tensors = [_state_tensors({k: s[k] for k in ('student', 'task_state', 'optimizer')}) for s in states]
    assert tensors[0].keys() == tensors[1].keys()
    for key, value in tensors[0].items():
        assert torch.equal(value, tensors[1][key]), key
    assert [computed(r) for r in metrics(a)] == [computed(r) for r in metrics(b)]


@pytest.mark.parametrize('device', [pytest.param('cpu', marks=pytest.mark.slow), on_gpu('cuda')])
def test_deterministic_runs_are_bitwise_equal(device, tmp_path, data_root):
    """``train.deterministic`` in fresh processes whose environment lacks ``CUBLAS_WORKSPACE_CONFIG``
    (cuBLAS refuses deterministic mode without it: the engine sets it), with cuDNN autotuning asked for
    (deterministic mode turns it off): two runs give the same bits."""
    runs = []
    for name in ('first', 'second'):
        cfg = _two_step_config(tmp_path / name, data_root, cudnn_benchmark=True)
        _train_child(cfg, device)
        runs.append(tmp_path / name / 'run')
    _assert_same_training(*runs)


@pytest.mark.parametrize('device, backend', [pytest.param('cpu', 'gloo', marks=pytest.mark.slow), on_gpu('cuda', 'nccl')])
def test_one_process_in_a_process_group_under_torchrun_trains_as_one_plain_process(device, backend, tmp_path, data_root):
    """torchrun --nproc_per_node 1, the process in a real group (nccl on the GPU): DDP, every collective
    of the engine (on_main's broadcast, loss and RNG gathering, ZeRO's consolidation) and SyncBatchNorm
    on CUDA; it trains bit for bit as a plain one-process run of the same config."""
    plain = _two_step_config(tmp_path / 'plain', data_root, zero=True)
    _train_child(plain, device)
    grouped = _two_step_config(tmp_path / 'group', data_root, zero=True)
    script = Path(__file__).with_name('one_rank_group.py')
    _run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '1', '--master_port', str(_free_port()),
          str(script), 'train', str(grouped), '--device', device, '--deterministic'], grouped.parent)
    _assert_same_training(tmp_path / 'plain' / 'run', tmp_path / 'group' / 'run')
    log = (tmp_path / 'group' / 'run' / 'train.log').read_text()
    assert 'optimizer state sharded over 1 processes' in log
    assert ('SyncBatchNorm' in log) if backend == 'nccl' else ('SyncBatchNorm runs on CUDA only' in log)
