"""``scalekd demo`` end to end at a toy size, and the shipped teacher."""
import json
import os
import re

import pytest
import torch

import teacher_reference as ref
from engine_fixtures import make_fashion_mnist
from scalekd.adapters.models import create_timm_model
from scalekd.cli import main
from scalekd.engine.run_folder.checkpoint import load_checkpoint
from scalekd.engine.run_folder.files import RunFolder
from scalekd.tools.demo import STUDENTS, TEACHER_WEIGHTS, DemoSettings, format_table, load_teacher, run_demo

REFERENCE = json.loads(ref.FIXTURE.read_text())  # written by tests/teacher_reference.py

TOY = dict(subset=64, epochs=2, batch_size=32, test_sample=40, progress=False)


@pytest.fixture(scope='module')
def fashion_dir(tmp_path_factory):
    return make_fashion_mnist(tmp_path_factory.mktemp('fmnist'), n_train=200, n_test=80)


@pytest.fixture(scope='module')
def teacher():
    assert TEACHER_WEIGHTS.is_file() and TEACHER_WEIGHTS.stat().st_size <= 5_000_000
    return load_teacher(str(TEACHER_WEIGHTS))


def _assert_reference(got, record):
    assert got.argmax(1).tolist() == record['top1']
    torch.testing.assert_close(got, torch.tensor(record['logits']), rtol=0, atol=1e-4)


def test_shipped_teacher_gives_the_stored_logits_on_a_seeded_batch(teacher):
    """Weights, architecture and loading together: a changed file, key mapping or model config shows here."""
    assert not teacher.training
    _assert_reference(ref.logits(teacher, ref.synthetic_batch()), REFERENCE['synthetic'])


@pytest.mark.skipif(ref.fashion_mnist_batch() is None, reason='needs dataset-fashion-mnist (scripts/install)')
def test_shipped_teacher_classifies_the_first_test_images_as_stored(teacher):
    images, labels = ref.fashion_mnist_batch()
    assert labels == REFERENCE['fashion_mnist_test']['labels']
    _assert_reference(ref.logits(teacher, images), REFERENCE['fashion_mnist_test'])
    assert sum(p == t for p, t in zip(REFERENCE['fashion_mnist_test']['top1'], labels)) >= 15  # a trained teacher


def _accuracy(model, folder):
    """Top-1 (%) on a generated test split, read and normalised here, not by the project's data code."""
    images = ref._idx(folder / 't10k-images-idx3-ubyte.gz', 16).reshape(-1, 1, 28, 28)
    labels = torch.from_numpy(ref._idx(folder / 't10k-labels-idx1-ubyte.gz', 8).astype('int64'))
    return 100.0 * (ref.logits(model.eval(), images).argmax(1) == labels).float().mean().item()


def _table_numbers(table: str):
    rows = {}
    for line in table.splitlines():
        name = line.split(' ')[0]
        if name in STUDENTS or name == 'teacher':
            rows[name] = [float(x) for x in re.findall(r'[+-]?\d+\.\d\d', line)]
    return rows


@pytest.mark.slow
def test_demo_end_to_end_writes_results_plot_and_a_table_that_matches(tmp_path, fashion_dir, capsys):
    out = tmp_path / 'demo'
    code = main(['demo', '--data', str(fashion_dir), '--output', str(out), '--baselines', '--subset', '64',
                 '--epochs', '2', '--no-progress', '--option', 'w_ori=0.1', '--test-sample', '40',
                 '--batch-size', '32'])
    assert code == 0
    results = json.loads((out / 'results.json').read_text())
    assert results['teacher_top1'] == pytest.approx(_accuracy(load_teacher(str(TEACHER_WEIGHTS)), fashion_dir), abs=1e-6)
    assert set(results['students']) == set(STUDENTS)
    assert results['settings']['distill'] == {'w_ori': 0.1}
    for name, row in results['students'].items():
        for label in ('alone', 'kd', 'scalekd'):
            # every image of the 80-image test split counts (1.25 % each); the curve uses the 40-image sample
            assert row[f'{label}_top1'] / 1.25 == pytest.approx(round(row[f'{label}_top1'] / 1.25), abs=1e-6)
            assert len(row['curves'][label]) == 2
            assert all(v / 2.5 == pytest.approx(round(v / 2.5), abs=1e-6) for v in row['curves'][label])
            run = out / f'{name}-{label}'
            assert (run / 'config.yaml').is_file() and (run / 'metrics.jsonl').is_file()
    # the reported accuracies are those of the trained students: rebuild the CNN's from its last checkpoint
    top1 = {}
    for label in ('alone', 'scalekd'):
        cnn = create_timm_model(STUDENTS['cnn']['model'], (28, 28), num_classes=10, in_chans=1, **STUDENTS['cnn']['kwargs'])
        cnn.load_state_dict(load_checkpoint(out / f'cnn-{label}' / 'checkpoint-0002.pth')['student'])
        top1[label] = _accuracy(cnn, fashion_dir)
        assert results['students']['cnn'][f'{label}_top1'] == pytest.approx(top1[label], abs=1e-6)
    assert results['students']['cnn']['gain'] == pytest.approx(top1['scalekd'] - top1['alone'], abs=1e-6)
    assert (out / 'accuracy.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

    table = _table_numbers(capsys.readouterr().out)
    assert table['teacher'] == [round(results['teacher_top1'], 2)]
    for name, row in results['students'].items():
        expected = [row['alone_top1'], row['kd_top1'], row['scalekd_top1'], row['gain']]
        assert table[name] == pytest.approx([round(v, 2) for v in expected], abs=0.006)


@pytest.mark.slow
def test_demo_is_seeded_and_repeatable(tmp_path, fashion_dir):
    runs = [run_demo(DemoSettings(output=str(tmp_path / str(i)), students=['cnn'], data=str(fashion_dir), **TOY),
                     say=lambda m: None) for i in range(2)]
    a, b = (r['students']['cnn'] for r in runs)
    assert a['curves'] == b['curves'] and a['scalekd_top1'] == b['scalekd_top1']
    table = format_table(runs[0])
    assert table.split('\n')[1].split() == ['model', 'alone', 'ScaleKD', 'gain']


def test_demo_refuses_unknown_students_before_training(tmp_path, fashion_dir, capsys):
    assert main(['demo', '--students', 'cnn,resnet', '--data', str(fashion_dir), '--output', str(tmp_path / 'x')]) == 2
    assert 'unknown demo student(s) resnet; choose from cnn, mlp, vit' in capsys.readouterr().err
    assert not (tmp_path / 'x').exists()


def test_a_second_demo_on_the_output_of_a_live_one_is_refused_before_training(tmp_path, fashion_dir, capsys):
    """The demo holds its output's lock: a second command there is refused naming the holder, and trains nothing."""
    live = RunFolder(str(tmp_path / 'out'))
    live.acquire()  # as a live `scalekd demo` or `scalekd ablate` does (an flock: another open file conflicts)
    try:
        assert main(['demo', '--students', 'cnn', '--data', str(fashion_dir), '--output', str(tmp_path / 'out'),
                     '--quick', '--no-progress']) == 2
    finally:
        live.release()
    assert f'is in use by another scalekd run (pid {os.getpid()} on ' in capsys.readouterr().err
    assert [p.name for p in (tmp_path / 'out').iterdir()] == ['.scalekd.lock']
