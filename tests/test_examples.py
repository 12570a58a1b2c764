"""Every script in examples/ runs as a user runs it, on its ``--tiny`` budget (timm's test models with random
weights, generated images, two steps; no network), and does what it says."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / 'examples'
pytestmark = pytest.mark.slow  # each starts a Python process with torch and timm: several seconds


def run_example(name: str, *args: str, cwd: Path) -> str:
    """Run ``examples/<name>``; its stdout (the test fails with its stderr when it exits non-zero)."""
    env = dict(os.environ, HF_HUB_OFFLINE='1', OMP_NUM_THREADS='1')
    run = subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


@pytest.fixture(scope='module')
def exported(tmp_path_factory) -> Path:
    """The student of examples/own_loop.py, exported."""
    tmp = tmp_path_factory.mktemp('own_loop')
    out = run_example('own_loop.py', '--tiny', '--out', str(tmp / 'student'), cwd=tmp)
    assert 'epoch 1: loss' in out and 'proxy_ori' in out
    return tmp / 'student'


def test_own_loop_trains_and_exports_the_plain_student(exported):
    state = load_file(exported / 'model.safetensors')
    assert 'fc.weight' in state and not any(k.startswith(('student.', 'proxy', 's4')) for k in state)
    assert (exported / 'config.json').is_file()


def test_load_exported_gives_the_same_model_both_ways(exported, tmp_path):
    out = run_example('load_exported.py', str(exported), cwd=tmp_path)
    assert out.count('class ') == 3  # the three classes of the tiny run, with probabilities


def test_export_onnx_matches_pytorch(exported, tmp_path):
    out = run_example('export_onnx.py', str(exported), '--out', str(tmp_path / 'student.onnx'), cwd=tmp_path)
    assert 'onnxruntime matches PyTorch' in out and (tmp_path / 'student.onnx').stat().st_size > 0


@pytest.mark.parametrize('script', ['lightning_module.py', 'accelerate_loop.py'])
def test_framework_examples_train_and_export(script, tmp_path):
    run_example(script, '--tiny', '--out', str(tmp_path / 'student'), cwd=tmp_path)
    state = load_file(tmp_path / 'student' / 'model.safetensors')
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_own_model_loss_trains_a_torchvision_student(tmp_path):
    out = run_example('own_model_loss.py', '--tiny', '--out', str(tmp_path / 'student.pth'), cwd=tmp_path)
    assert 'task_loss' in out and 'proxy_ori' in out
    state = torch.load(tmp_path / 'student.pth', weights_only=True)
    assert 'layer4.0.conv1.weight' in state  # torchvision's keys: the student is not a timm model


def test_every_example_is_tested():
    tested = {'own_loop.py', 'load_exported.py', 'export_onnx.py', 'lightning_module.py', 'accelerate_loop.py',
              'own_model_loss.py'}
    assert {p.name for p in EXAMPLES.glob('*.py')} == tested
