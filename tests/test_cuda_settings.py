"""The GPU switches reach torch (engine/runtime/cuda_settings.py): TF32 and cuDNN flags, the loaders' pinned
memory and persistent workers, SyncBatchNorm for BN students under DDP."""
import pytest
import torch
from timm.layers import BatchNormAct2d, SyncBatchNormAct
from torch.nn.modules.batchnorm import _BatchNorm

from scalekd import build_distiller
from scalekd.engine.inputs.config import DataConfig, RunConfig, TrainConfig
from scalekd.engine.runtime.cuda_settings import apply_gpu_settings, configure_backends, loader_options, sync_batchnorm
from scalekd.engine.inputs.data import build_datasets, build_loaders
from scalekd.engine.runtime.distributed import DistEnv
from tiny_models import IMG, make_student, make_teacher


@pytest.fixture
def torch_flags():
    """torch's TF32 / cuDNN flags, restored after the test."""
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = flags


@pytest.mark.parametrize('tf32, benchmark, deterministic', [(True, True, False), (False, False, False),
                                                            (True, True, True)])
def test_tf32_and_cudnn_autotuning_reach_torch_as_configured(tf32, benchmark, deterministic, torch_flags):
    configure_backends(TrainConfig(tf32=not tf32, cudnn_benchmark=not benchmark))  # from the other state
    configure_backends(TrainConfig(tf32=tf32, cudnn_benchmark=benchmark, deterministic=deterministic))
    assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32
    assert torch.backends.cuda.matmul.fp32_precision == ('tf32' if tf32 else 'ieee')  # torch's newer setting agrees
    assert torch.backends.cudnn.benchmark is (benchmark and not deterministic)


def test_the_defaults_are_tf32_and_cudnn_autotuning_as_in_timm_training(torch_flags):
    configure_backends(TrainConfig())
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.benchmark


@pytest.mark.parametrize('pin, persistent, workers, device, expected', [
    (None, False, 2, 'cpu', (False, False)),   # defaults on a CPU run
    (None, True, 2, 'cuda', (True, True)),     # pinned by default on a GPU
    (False, True, 0, 'cuda', (False, False)),  # no workers to keep
    (True, False, 1, 'cpu', (True, False)),
])
def test_the_loaders_take_pin_memory_and_persistent_workers_as_configured(pin, persistent, workers, device, expected,
                                                                          data_root):
    cfg = DataConfig(root=str(data_root), img_size=32, num_classes=3, workers=workers, pin_memory=pin,
                     persistent_workers=persistent)
    assert loader_options(cfg, torch.device(device)) == dict(pin_memory=expected[0], persistent_workers=expected[1])
    data = build_datasets(cfg, (0.5,) * 3, (0.5,) * 3)
    # DistEnv only records the device: nothing is moved to it
    for loader in build_loaders(data, cfg, 4, DistEnv(device=torch.device(device)), seed=0):
        assert (loader.pin_memory, loader.persistent_workers) == expected


def _bn_layers(module):
    return [m for m in module.modules() if isinstance(m, _BatchNorm)]


@pytest.mark.parametrize('family', ['resnet', 'mobilenet_v1'])
def test_sync_batchnorm_converts_every_bn_layer_and_keeps_the_step(family):
    """ResNet's BatchNorm2d and timm's BatchNormAct2d (MobileNet) become their synchronised versions,
    with the same parameters, statistics and state-dict keys; outside a process group they normalise as
    before (same training forward, same running statistics)."""
    torch.manual_seed(0)
    plain = make_student(family, IMG)
    converted = make_student(family, IMG)
    converted.load_state_dict(plain.state_dict())
    had_act = sum(isinstance(m, BatchNormAct2d) for m in converted.modules())
    count = sync_batchnorm(converted)
    layers = _bn_layers(converted)
    assert count == len(layers) == len(_bn_layers(plain)) > 0
    assert all(isinstance(m, (torch.nn.SyncBatchNorm, SyncBatchNormAct)) for m in layers)
    assert sum(isinstance(m, SyncBatchNormAct) for m in layers) == had_act == (27 if family == 'mobilenet_v1' else 0)
    assert list(converted.state_dict()) == list(plain.state_dict())
    x = torch.randn(4, 3, IMG, IMG)
    torch.testing.assert_close(converted.train()(x), plain.train()(x), rtol=0, atol=0)
    for a, b in zip(_bn_layers(converted), _bn_layers(plain)):
        torch.testing.assert_close(a.running_mean, b.running_mean, rtol=0, atol=0)
    assert sync_batchnorm(converted) == 0  # nothing left to convert


def test_sync_batchnorm_refuses_a_bare_bn_layer():
    with pytest.raises(ValueError, match='not a BatchNorm layer itself'):
        sync_batchnorm(torch.nn.BatchNorm2d(4))


class _Group(DistEnv):
    @property
    def distributed(self) -> bool:
        return True


@pytest.mark.parametrize('env, sync_bn, note', [
    (DistEnv(), True, None),                    # one process: nothing to synchronise
    (_Group(world_size=2), False, None),        # switched off
    (_Group(world_size=2), True, 'SyncBatchNorm runs on CUDA only'),
])
def test_a_run_converts_its_student_only_under_ddp_on_cuda_and_says_why_not(env, sync_bn, note, torch_flags):
    """On the CPU (gloo) torch's SyncBatchNorm cannot run: the student keeps its BatchNorm layers and the
    log says so; the CUDA case is tests/test_cuda.py's torchrun test."""
    torch.manual_seed(0)
    task = build_distiller(make_teacher('vit', IMG), make_student('resnet', IMG), img_size=IMG)
    before = [type(m) for m in task.student.modules()]
    notes = []
    apply_gpu_settings(RunConfig(train=TrainConfig(sync_bn=sync_bn, tf32=False)), env, task, notes.append)
    assert [type(m) for m in task.student.modules()] == before
    assert len(notes) == (note is not None) and all(note in n for n in notes)
    assert torch.backends.cuda.matmul.allow_tf32 is False  # the backends were configured either way
