"""One device policy (``--device auto|cpu|cuda|cuda:N``) and one error policy for every ``scalekd`` command."""
import importlib
import json
import pkgutil
import re
import signal
import subprocess

import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

import scalekd
import scalekd.tools.bench as bench
import scalekd.tools.demo as demo
import scalekd.cli as cli
from engine_fixtures import make_fashion_mnist, make_image_folder, tiny_config
from scalekd.tools.analysis.inputs import feature_maps
from scalekd.tools.analysis.linear_probe import pre_logits
from scalekd.cli import build_parser, main
from scalekd.engine.inputs.config import ConfigError
from scalekd.engine.runtime.devices import DeviceError, model_device, resolve_device
from scalekd.engine.runtime.distributed import init_distributed
from scalekd.engine.errors import LossNotFinite, RunInterrupted, UserError
from scalekd.tools.export import export_student
from scalekd.tools.inspection import _train_step
from scalekd.adapters.models import UnknownModelError, create_timm_model
from scalekd.engine.inputs.weights import WeightsError
from scalekd.method.errors import OptionError
from test_analysis import _checkpoint, tiny_export  # noqa: F401 (a fixture)

NO_CUDA = '--device cuda: no CUDA device is available (torch.cuda.is_available() is False)'
# each command's arguments but --device; the device is resolved before any of them is read
COMMANDS = {
    'inspect': ['inspect', '--teacher', 'vit_tiny_patch16_224', '--student', 'resnet18'],
    'eval': ['eval', 'missing.pth', '--data', 'missing'],
    'demo': ['demo', '--output', 'unused'],
    'spectrum': ['spectrum', '--model', 'resnet18', '--data', 'missing', '--out', 'unused.png'],
    'linear-probe': ['linear-probe', '--model', 'resnet18', '--train', 'missing', '--val', 'missing'],
    'feature-distance': ['feature-distance', '--students', 'missing.pth', '--data', 'missing', '--out', 'unused.png'],
    'bench': ['bench', '--variants', 'student'],
}
TINY_PAIR = ['--teacher', 'vit_tiny_patch16_224', '--student', 'resnet18', '--img-size', '32', '--num-classes', '3',
             '--teacher-kwarg', 'patch_size=8', '--teacher-kwarg', 'depth=4', '--teacher-kwarg', 'embed_dim=64',
             '--teacher-kwarg', 'num_heads=2', '--student-kwarg', 'layers=[1,1,1,1]']


@pytest.fixture
def cuda_count(monkeypatch):
    """Pretend this machine has ``n`` CUDA devices."""
    def pretend(n: int) -> None:
        monkeypatch.setattr(torch.cuda, 'is_available', lambda: n > 0)
        monkeypatch.setattr(torch.cuda, 'device_count', lambda: n)
    return pretend


# -- resolve_device -------------------------------------------------------------------------------

def test_auto_is_cuda_when_there_is_one_else_cpu(cuda_count):
    cuda_count(0)
    assert resolve_device('auto') == torch.device('cpu') == resolve_device('cpu')
    cuda_count(2)
    assert resolve_device('auto') == torch.device('cuda') == resolve_device('cuda')
    assert resolve_device('cuda:1') == torch.device('cuda', 1)


def test_unknown_unavailable_and_out_of_range_devices_are_refused(cuda_count):
    cuda_count(0)
    with pytest.raises(DeviceError, match=re.escape(NO_CUDA)):
        resolve_device('cuda')
    with pytest.raises(DeviceError, match=re.escape('--device cuda:0: no CUDA device is available')):
        resolve_device('cuda:0')
    for bad in ('tpu', 'CPU', 'cuda:x', 'cuda:-1', 'cuda:', ''):
        with pytest.raises(DeviceError, match=re.escape(f'--device {bad!r}: expected auto, cpu, cuda or cuda:N')):
            resolve_device(bad)
    cuda_count(2)
    with pytest.raises(DeviceError, match=re.escape('--device cuda:2: this machine has 2 CUDA device(s) '
                                                    '(cuda:0 to cuda:1)')):
        resolve_device('cuda:2')


# -- every command: the same --device --------------------------------------------------------------

def test_every_command_defaults_to_auto():
    parser = build_parser()
    for args in [*COMMANDS.values(), ['train', 'run.yaml']]:
        assert parser.parse_args(args).device == 'auto', args[0]


@pytest.mark.parametrize('command', sorted(COMMANDS))
def test_every_command_refuses_missing_cuda_and_unknown_devices_in_one_line(command, cuda_count, capsys, tmp_path,
                                                                            monkeypatch):
    monkeypatch.chdir(tmp_path)
    cuda_count(0)
    assert main(COMMANDS[command] + ['--device', 'cuda']) == 2
    assert capsys.readouterr().err.splitlines() == [f'scalekd {command}: error: {NO_CUDA}']
    assert main(COMMANDS[command] + ['--device', 'tpu']) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"scalekd {command}: error: --device 'tpu': expected auto, cpu, cuda or cuda:N"]
    assert list(tmp_path.iterdir()) == []


def test_train_checks_its_device_by_the_same_rule(cuda_count, capsys, tmp_path, data_root):
    cfg = tiny_config(tmp_path, data_root)
    cuda_count(0)
    assert main(['train', str(cfg), '--device', 'cuda']) == 2
    assert capsys.readouterr().err.splitlines() == [f'scalekd train: error: {NO_CUDA}']
    assert main(['train', str(cfg), '--device', 'tpu']) == 2
    assert "'tpu'" in capsys.readouterr().err
    assert not (tmp_path / 'run').exists()


def test_under_torchrun_each_process_takes_its_local_gpu(cuda_count, monkeypatch):
    cuda_count(2)
    monkeypatch.setenv('WORLD_SIZE', '2')
    with pytest.raises(DeviceError, match='under torchrun each process uses cuda:LOCAL_RANK'):
        init_distributed('cuda:1')


@pytest.fixture(scope='module')
def grey_export(tiny_export, tmp_path_factory):
    """A tiny grey-input ViT exported like a trained student, and Fashion-MNIST-format files."""
    return tiny_export, make_fashion_mnist(tmp_path_factory.mktemp('fmnist'), n_train=40, n_test=24)


def test_inspect_runs_its_step_on_cpu(capsys):
    assert main(['inspect', *TINY_PAIR, '--device', 'cpu', '--json']) == 0
    assert json.loads(capsys.readouterr().out)['train_step']['ok']


def test_eval_spectrum_and_linear_probe_run_on_cpu(grey_export, tmp_path, capsys):
    export, data = grey_export
    assert main(['eval', str(export), '--data', str(data), '--workers', '0', '--json', '--device', 'cpu']) == 0
    assert json.loads(capsys.readouterr().out)['count'] == 24
    out = tmp_path / 'spectrum.png'
    assert main(['spectrum', '--checkpoint', str(export), '--data', str(data), '--samples', '8', '--out', str(out),
                 '--device', 'cpu']) == 0
    assert json.loads(out.with_suffix('.json').read_text())['shape'] == [8, 32, 4, 4]
    root = make_image_folder(tmp_path / 'img', train_per_class=4, val_per_class=2, size=28)
    model = create_timm_model('resnet18', (28, 28), num_classes=3, layers=[1, 1, 1, 1])
    export_student(model, tmp_path / 'resnet', dict(input_size=(3, 28, 28), crop_pct=1.0))
    assert main(['linear-probe', '--checkpoint', str(tmp_path / 'resnet'), '--train', str(root / 'train'),
                 '--val', str(root / 'val'), '--json', '--device', 'cpu']) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])['val_images'] == 6


def test_feature_distance_runs_on_cpu(tmp_path, data_root):
    path = _checkpoint(tmp_path, data_root, 'dfm')
    out = tmp_path / 'fd.png'
    assert main(['feature-distance', '--students', str(path), '--data', str(data_root / 'val'), '--out', str(out),
                 '--device', 'cpu']) == 0
    assert json.loads(out.with_suffix('.json').read_text())[0]['distances']['alternative'] > 0


def test_demo_runs_on_cpu_and_records_its_device(grey_export, tmp_path):
    out = tmp_path / 'demo'
    assert main(['demo', '--students', 'cnn', '--data', str(grey_export[1]), '--output', str(out), '--subset', '16',
                 '--epochs', '1', '--batch-size', '8', '--test-sample', '8', '--no-progress', '--device', 'cpu']) == 0
    assert json.loads((out / 'results.json').read_text())['settings']['device'] == 'cpu'


@pytest.mark.slow
def test_bench_runs_on_cpu(capsys):
    assert main(['bench', '--teacher', 'vit_tiny_patch16_224', '--student', 'resnet18', '--img-size', '32',
                 '--batch', '2', '--steps', '1', '--variants', 'student', '--json', '--device', 'cpu']) == 0
    assert json.loads(capsys.readouterr().out)['device'] == 'cpu'


# -- the tools feed their inputs to the model's device ----------------------------------------------

class _MetaModel(nn.Module):
    """Parameters on the meta device; notes the device of every input and answers with CPU tensors."""
    num_classes = 3

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, device='meta'))
        self.seen = set()

    def forward_intermediates(self, x, indices, intermediates_only):
        self.seen.add(x.device.type)
        return [torch.ones(x.shape[0], 2, 3, 3)]

    def forward_features(self, x):
        self.seen.add(x.device.type)
        return torch.ones(x.shape[0], 4)

    def forward_head(self, x, pre_logits):
        return x


class _MetaDistiller(_MetaModel):
    """Just what ``scalekd inspect``'s training step uses of a distiller."""
    img_size, in_chans = (4, 4), 1

    @property
    def trainable_module(self):
        return self

    @property
    def student(self):
        return self

    def forward(self, images, targets):
        self.seen |= {images.device.type, targets.device.type}
        return dict(loss=torch.zeros((), requires_grad=True))


def test_analysis_inputs_go_to_the_models_device():
    dataset = TensorDataset(torch.randn(5, 1, 4, 4), torch.arange(5))
    model = _MetaModel()
    assert model_device(model) == torch.device('meta') and model_device(nn.ReLU()) == torch.device('cpu')
    maps, labels = feature_maps(model, dataset)
    assert maps.shape == (5, 2, 3, 3) and maps.device.type == 'cpu' and model.seen == {'meta'}
    model = _MetaModel()
    assert pre_logits(model, dataset)['features'].device.type == 'cpu' and model.seen == {'meta'}


def test_inspect_builds_its_batch_on_the_models_device():
    distiller = _MetaDistiller()
    assert _train_step(distiller, 2)['ok'] and distiller.seen == {'meta'}


def test_feature_distance_task_is_built_on_the_given_device(tmp_path, data_root):
    from scalekd.tools.analysis import task_from_checkpoint
    task, _ = task_from_checkpoint(_checkpoint(tmp_path, data_root, 'dfm'), device=torch.device('meta'))
    assert {p.device.type for p in task.parameters()} == {'meta'}


# -- errors: a user's mistake is one line and exit 2, anything else keeps its traceback ----------------

def _failing_export(monkeypatch, error: BaseException) -> None:
    def run(args):
        raise error
    monkeypatch.setattr(cli, '_run_export', run)


@pytest.mark.parametrize('error', [UserError('x'), ConfigError('x'), WeightsError('x'), LossNotFinite('x'),
                                   UnknownModelError('x'), OptionError('x'), DeviceError('x')])
def test_user_errors_are_one_line_and_exit_2(monkeypatch, capsys, error):
    _failing_export(monkeypatch, error)
    assert main(['export', 'a.pth', '--out', 'b']) == 2
    assert capsys.readouterr().err.splitlines() == ['scalekd export: error: x']


@pytest.mark.parametrize('error', [RuntimeError('boom'), TypeError('boom'), ValueError('boom'),
                                   FileNotFoundError('boom'), FloatingPointError('boom')])
def test_other_errors_keep_their_traceback(monkeypatch, error):
    """torch, timm, numpy and Python raise ValueError (and the others) for defects: not a user's mistake."""
    _failing_export(monkeypatch, error)
    with pytest.raises(type(error), match='boom'):
        main(['export', 'a.pth', '--out', 'b'])


def _raise_deep():
    raise ConfigError('optim.lr must be > 0')


@pytest.mark.parametrize('switch', [['--traceback', 'export', 'a.pth', '--out', 'b'],
                                    ['export', 'a.pth', '--out', 'b', '--traceback'], 'env'])
def test_the_traceback_switch_shows_where_a_user_error_came_from(monkeypatch, capsys, switch):
    monkeypatch.setattr(cli, '_run_export', lambda args: _raise_deep())
    if switch == 'env':
        monkeypatch.setenv('SCALEKD_TRACEBACK', '1')
    assert main(['export', 'a.pth', '--out', 'b'] if switch == 'env' else switch) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == 'Traceback (most recent call last):' and any('_raise_deep' in line for line in err)
    assert err[-2:] == ['scalekd.engine.errors.ConfigError: optim.lr must be > 0',
                        'scalekd export: error: optim.lr must be > 0']
    assert 'SCALEKD_TRACEBACK=1' in ' '.join(build_parser().format_help().split())


def _exception_classes():
    """Every exception class the package defines, by module."""
    for info in pkgutil.walk_packages(scalekd.__path__, 'scalekd.'):
        module = importlib.import_module(info.name)
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, BaseException) and obj.__module__ == info.name:
                yield obj


# ends of a run or a study that are not a user's mistake: reported in one line by their own rule
NOT_USER_ERRORS = {'RunInterrupted', 'PeerFailure', 'StudyStopped', '_Terminated'}


def test_every_error_class_of_the_package_is_a_user_error():
    classes = {c.__name__: c for c in _exception_classes()}
    assert {'ConfigError', 'DataError', 'WeightsError', 'CheckpointError', 'RunError', 'RunFolderError',
            'LossNotFinite', 'RankError', 'DeviceError', 'UnknownModelError'} <= set(classes)
    assert sorted(n for n, c in classes.items() if n not in NOT_USER_ERRORS and not issubclass(c, UserError)) == []
    assert not any(issubclass(c, (ValueError, OSError, ArithmeticError)) for c in classes.values())


def test_out_of_memory_prints_the_traceback_and_a_hint(monkeypatch, capsys):
    _failing_export(monkeypatch, torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB'))
    assert main(['export', 'a.pth', '--out', 'b']) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == 'Traceback (most recent call last):'
    assert 'OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB' in err[-2]
    assert 'train.accum_steps' in err[-1] and 'train.batch_size' in err[-1] and 'activation_checkpointing' in err[-1]


def _child_fails(monkeypatch, code: int, stderr: str) -> None:
    monkeypatch.setattr(bench.subprocess, 'run', lambda cmd, **kw: subprocess.CompletedProcess(cmd, code, '', stderr))


def test_a_bench_child_with_a_user_error_is_one_line(monkeypatch, capsys):
    _child_fails(monkeypatch, 2, "UnknownModelError: unknown timm model 'resnet5O'\n")
    assert main(['bench', '--student', 'resnet5O', '--variants', 'student', '--device', 'cpu', '--json']) == 2
    assert capsys.readouterr().err.splitlines() == [
        "scalekd bench: error: bench variant student: UnknownModelError: unknown timm model 'resnet5O'"]


def test_a_bench_child_that_crashes_shows_its_traceback(monkeypatch):
    trace = 'Traceback (most recent call last):\n  File "bench.py", line 1\nTypeError: bad shape\n'
    _child_fails(monkeypatch, 1, trace)
    with pytest.raises(RuntimeError, match=re.escape(f'bench variant student failed (exit code 1):\n{trace.strip()}')):
        main(['bench', '--variants', 'student', '--device', 'cpu', '--json'])


@pytest.mark.slow
def test_a_bench_child_reports_a_user_error_with_exit_2():
    spec = dict(teacher='vit_tiny_patch16_224', student='resnet5O', img_size=32, batch=2, steps=1, precision='fp32',
                channels_last=False, device='cpu', variant='student')
    child = subprocess.run([bench.sys.executable, '-m', 'scalekd.tools.bench', json.dumps(spec)], capture_output=True,
                           text=True)
    lines = child.stderr.splitlines()
    assert child.returncode == 2 and len(lines) == 1
    assert lines[0].startswith("UnknownModelError: unknown student model 'resnet5O'")


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_a_demo_stopped_by_a_signal_is_one_line_and_exits_128_plus_the_signal(monkeypatch, capsys, signum):
    """A demo run a signal stopped (its trainer saved and raised) is reported in one line, not a traceback,
    saying that the same command goes on from the finished runs (not the run's own --resume)."""
    def stopped(settings):
        raise RunInterrupted('stopped by signal; checkpoint x.pth; continue with --resume auto', signum)
    monkeypatch.setattr(demo, 'run_demo', stopped)
    assert main(['demo', '--quick', '--output', 'never-written']) == 128 + signum
    assert capsys.readouterr().err.splitlines() == [
        f'scalekd demo: stopped by {signum.name}; finished runs are kept: the same command trains the rest']
