"""scripts/gpu_check (its CPU tiny mode, as CI runs it), its part runner and its pieces, and
``scalekd bench --loader``."""
import json
import math
import os
import subprocess
import sys
import time
import importlib.util
from importlib.machinery import SourceFileLoader
from pathlib import Path

import pytest
import torch

from engine_fixtures import tiny_config
from scalekd.cli import main
from scalekd.engine.inputs.fashion_mnist import DatasetNotFound, FashionMNIST
from scalekd.tools import bench, gpu_check
from scalekd.tools.gpu_check import Part, demo_data, make_jpeg_folder, read_junit, run_check, run_part

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'scripts' / 'gpu_check'
TINY_PARTS = ['tests', 'bench bf16 eager 2', 'demo', 'bench bf16 compiled 2', 'bench fp32 eager 2', 'loader']


def _finite_positive(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values)


@pytest.mark.slow
def test_the_tiny_cpu_check_runs_every_part_and_writes_its_summary(tmp_path):
    """``scripts/gpu_check --device cpu --tiny``: every part runs (the CUDA tests skip here), each with its
    figures, the ratios are computed, summary.json and summary.txt are written; exit code 0."""
    out = tmp_path / 'check'
    result = subprocess.run([sys.executable, str(SCRIPT), '--device', 'cpu', '--tiny', '--out', str(out)],
                            capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    summary = json.loads((out / 'summary.json').read_text())
    parts = summary['parts']
    assert list(parts) == TINY_PARTS and summary['ok'] and summary['mode'] == 'tiny'
    tests = parts['tests']
    if torch.cuda.is_available():
        assert tests['status'] == 'ok' and tests['result']['failed'] == 0
    else:
        assert tests['status'] == 'skipped' and tests['result']['passed'] == 0 < tests['result']['skipped']
        assert tests['result']['skip_reasons'] == ['no CUDA device (torch.cuda.is_available() is False)']
    for name in TINY_PARTS[1:]:
        assert parts[name]['status'] == 'ok' and parts[name]['seconds'] <= parts[name]['timeout_s'], name
    for name in ('bench bf16 eager 2', 'bench fp32 eager 2'):
        rows = parts[name]['result']['variants']
        assert list(rows) == ['student', 'kd', 'scalekd']
        assert all(_finite_positive(r['step_s'], r['images_per_s'], r['peak_mb']) for r in rows.values())
    assert parts['bench bf16 compiled 2']['result']['compile'] == 'eager'
    assert list(parts['bench bf16 compiled 2']['result']['variants']) == ['scalekd']
    assert set(summary['ratios']) == {'bench bf16 eager 2: scalekd / kd', 'bench fp32 eager 2: scalekd / kd',
                                      'bf16 eager 2: bf16 / fp32', 'bf16 compiled 2: compiled / eager'}
    assert _finite_positive(*summary['ratios'].values())
    demo = parts['demo']['result']
    assert demo['steps'] == 5 and demo['steady_steps'] == [4, 5]
    assert _finite_positive(demo['images_per_s'], demo['steady_images_per_s'], demo['peak_mb'], demo['loss'])
    loader = parts['loader']['result']
    assert [r['workers'] for r in loader['rows']] == [0, 1] and loader['batch'] == 4
    assert all(_finite_positive(r['images_per_s']) for r in loader['rows'])
    text = (out / 'summary.txt').read_text()
    assert all(name in text for name in TINY_PARTS) and 'step-time ratios' in text and 'demo CNN run' in text
    assert (out / 'logs' / 'demo.err').exists() and (out / 'logs' / 'tests.xml').exists()


def _python(code: str):
    return [sys.executable, '-c', code]


@pytest.mark.slow
def test_a_part_that_hangs_is_killed_with_its_children_at_its_timeout(tmp_path):
    pid_file = tmp_path / 'child.pid'
    hang = _python(f"import subprocess, time; p = subprocess.Popen(['sleep', '100']); "
                   f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(100)")
    start = time.monotonic()
    record = run_part(Part('hang', hang, 100, lambda out: {}), tmp_path / 'logs', tmp_path, timeout_s=3)
    assert record['status'] == 'timeout' and time.monotonic() - start < 20
    child = int(pid_file.read_text())
    time.sleep(0.5)
    assert not Path(f'/proc/{child}').exists() or 'Z' in Path(f'/proc/{child}/stat').read_text().split()[2]


@pytest.mark.slow
def test_the_check_goes_on_after_a_failed_or_hung_part_and_stops_starting_parts_when_its_budget_is_spent(tmp_path):
    """A failing part (its stderr kept), a hung one and one whose output does not read are each reported,
    and the next part still runs; a part that would start with under MIN_PART_S seconds left is not run."""
    ok = Part('ok', _python("print('{\"x\": 1}')"), 30, json.loads)
    parts = [Part('fails', _python("import sys; sys.exit('broken on purpose')"), 30, json.loads),
             Part('hangs', _python('import time; time.sleep(100)'), 2, json.loads),
             Part('unreadable', _python("print('not json')"), 30, json.loads), ok]
    summary = run_check(parts, tmp_path, tmp_path, budget_s=60, device='cpu', tiny=True, say=lambda m: None)
    records = summary['parts']
    assert [r['status'] for r in records.values()] == ['failed', 'timeout', 'failed', 'ok']
    assert records['fails']['exit_code'] == 1 and 'broken on purpose' in records['fails']['error_tail']
    assert 'reading its output' in records['unreadable']['error'] and records['ok']['result'] == {'x': 1}
    assert not summary['ok'] and json.loads((tmp_path / 'summary.json').read_text())['parts'] == records
    late = run_check([ok], tmp_path, tmp_path, budget_s=gpu_check.MIN_PART_S - 1, device='cpu', tiny=True,
                     say=lambda m: None)
    assert late['parts']['ok']['status'] == 'not run' and not late['ok']


def test_a_part_that_cannot_run_here_is_skipped_with_its_reason(tmp_path):
    parts = gpu_check.plan(tmp_path, 'cpu', tiny=True, pytest_found=False)
    summary = run_check(parts[:1], tmp_path, REPO, 60, 'cpu', True, say=lambda m: None)
    assert summary['parts']['tests'] == dict(status='skipped', reason=parts[0].skip) and summary['ok']
    assert 'pytest is not installed' in parts[0].skip


def test_junit_counts_failures_and_skips(tmp_path):
    xml = tmp_path / 'r.xml'
    xml.write_text('<testsuites><testsuite tests="4" failures="1" errors="0" skipped="2">'
                   '<testcase name="a"/><testcase name="b"><failure message="assert 1 == 2&#10;more"/></testcase>'
                   '<testcase name="c"><skipped message="no GPU"/></testcase><testcase name="d"><skipped message="no GPU"/>'
                   '</testcase></testsuite></testsuites>')
    assert read_junit(xml) == dict(passed=1, failed=1, skipped=2, failures=[dict(test='b', message='assert 1 == 2')],
                                   skip_reasons=['no GPU'])
    xml.write_text('<testsuite tests="1" failures="0" errors="0" skipped="1"><testcase name="c">'
                   '<skipped message="no GPU"/></testcase></testsuite>')
    assert read_junit(xml)['status'] == 'skipped'


def test_the_demo_part_generates_fashion_mnist_shaped_files_where_the_real_ones_are_absent(tmp_path, monkeypatch):
    from scalekd.engine.inputs import fashion_mnist

    def absent(given, download=True, **kwargs):
        assert download is False  # never a download on a machine without network
        raise DatasetNotFound('absent')
    monkeypatch.setattr(fashion_mnist, 'find_fashion_mnist', absent)
    source = demo_data(None, tmp_path / 'fm', train=30, test=20)
    assert source['root'] == str(tmp_path / 'fm') and 'generated' in source['kind']
    train, test = FashionMNIST(source['root'], 'train'), FashionMNIST(source['root'], 'test')
    assert (len(train), len(test)) == (30, 20) and train[13][0].size == (28, 28) and train[13][1] == 3
    with pytest.raises(DatasetNotFound):  # a folder the user named must hold the files
        demo_data(str(tmp_path / 'missing'), tmp_path / 'fm2', 30, 20)


def _load_script():
    """scripts/gpu_check as a module (its file has no .py suffix)."""
    loader = SourceFileLoader('gpu_check_script', str(SCRIPT))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


def test_the_script_names_what_is_missing_and_how_its_wheel_comes_without_network(tmp_path):
    script = _load_script()
    reqs = script.requirements()
    assert reqs['timm'].startswith('>=') and 'tensorboard' not in reqs  # no part of the check imports it
    versions = dict(timm='1.0.15', torch='2.5.1+cu124', safetensors=None)
    problems = script.unmet(reqs, lambda name: versions.get(name, '99.0'))
    assert problems == {'timm': f"timm 1.0.15 is installed, scalekd needs timm{reqs['timm']}",
                        'safetensors': f"safetensors{reqs['safetensors']} is not installed"}
    text = script.bring_instructions(problems, reqs)
    assert f"pip download --no-deps 'timm{reqs['timm']}' 'safetensors{reqs['safetensors']}' -d wheels/" in text
    assert '--no-index' in text
    assert script.satisfies('2.14.1+cu130', '>=2.1') and not script.satisfies('2.0', '>=1.0.23,<2')
    assert script.install_wheels(['timm'], tmp_path) == []  # no wheel brought: nothing run


def test_bench_in_process_measures_every_variant_without_a_child_process(monkeypatch):
    def no_child(*args, **kwargs):
        raise AssertionError('a child process was started')
    monkeypatch.setattr(bench.subprocess, 'run', no_child)
    report = bench.run_bench('vit_tiny_patch16_224', 'resnet18', img_size=32, batch=2, steps=1,
                             variants=['student', 'kd'], isolate=False)
    assert [r['name'] for r in report['variants']] == ['student', 'kd'] and not report['isolated']
    assert all(r['step_s'] > 0 for r in report['variants'])


@pytest.fixture
def jpeg_config(tmp_path):
    root = make_jpeg_folder(tmp_path / 'jpegs', classes=3, per_class=4, size=(40, 30))
    return tiny_config(tmp_path, root, data=dict(img_size=24))


def test_loader_bench_times_the_training_loader_for_each_number_of_workers(jpeg_config, capsys):
    """12 JPEGs through the config's transforms (24 px crops of 40x30 images) in batches of 4: after the
    first batch, 2 timed batches of 4 images each, per number of workers."""
    assert main(['bench', '--loader', str(jpeg_config), '--workers', '0,1', '--batch', '4', '--batches', '2',
                 '--json', '--device', 'cpu']) == 0
    report = json.loads(capsys.readouterr().out)
    assert report['train_images'] == 12 and report['img_size'] == 24 and not report['pin_memory']
    assert [r['workers'] for r in report['rows']] == [0, 1]
    for r in report['rows']:
        assert r['images'] == 8 and r['shape'] == [4, 3, 24, 24]
        assert _finite_positive(r['images_per_s'], r['first_batch_s'])
    assert main(['bench', '--loader', str(jpeg_config), '--workers', '0', '--batch', '4', '--batches', '2']) == 0
    table = capsys.readouterr().out
    assert '(12 images): 24 px, batch 4' in table and table.splitlines()[-1].split()[0] == '0'


@pytest.mark.parametrize('args, message', [
    (['--batches', '3', '--batch', '4'], 'has 12 training images: 4 batches of 4 need 16'),
    (['--workers', '0,two'], "--workers takes comma-separated numbers of workers, got '0,two'"),
    (['--workers', '-1'], '--workers >= 0'),
])
def test_loader_bench_refuses_what_it_cannot_time_in_one_line(jpeg_config, args, message, capsys):
    assert main(['bench', '--loader', str(jpeg_config), '--device', 'cpu', *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_default_worker_counts_double_up_to_the_cpu_count():
    from scalekd.tools.loader_bench import default_worker_counts
    assert default_worker_counts(12) == [0, 1, 2, 4, 8, 12] and default_worker_counts(1) == [0, 1]


def test_the_full_check_benches_the_papers_swin_l_resnet_50_d_pair_and_runs_100_demo_steps(tmp_path):
    """What a GPU machine runs: the parts in their order, the bench at 224 px with the pair's options,
    bf16 + channels_last at batch 64 and 128 eager and compiled, fp32 at 64; 100 demo steps of 32 images."""
    parts = {p.name: p for p in gpu_check.plan(tmp_path, 'cuda', tiny=False)}
    assert list(parts) == ['tests', 'bench bf16 eager 64', 'bench bf16 eager 128', 'demo', 'bench bf16 compiled 64',
                           'bench bf16 compiled 128', 'bench fp32 eager 64', 'loader']
    for name, part in parts.items():
        if not name.startswith('bench'):
            continue
        cmd = ' '.join(part.command)
        _, precision, mode, batch = name.split()
        assert (f'bench --teacher swin_large_patch4_window7_224.ms_in22k_ft_in1k --student resnet50d --img-size 224 '
                f'--batch {batch} --steps 10 --precision {precision} --channels-last --device cuda') in cmd
        assert '--option s3_heads=16 --option s4_heads=24' in cmd and '--in-process' not in cmd
        assert ('--compile' in part.command) == (mode == 'compiled') and '--compile-backend' not in cmd
        assert f"--variants {'kd,scalekd' if mode == 'compiled' else 'student,kd,scalekd'}" in cmd
    demo = ' '.join(parts['demo'].command)
    assert 'train configs/demo/cnn-scalekd.yaml --device cuda' in demo
    assert 'data.train_subset=3200' in demo and 'train.batch_size=32' in demo and 'sched.epochs=1' in demo
    assert parts['tests'].command[2:6] == ['pytest', '-m', 'cuda', 'tests/test_cuda.py']
    assert sum(p.timeout_s for p in parts.values()) > gpu_check.FULL.budget_s  # the budget, not the sum, bounds it
