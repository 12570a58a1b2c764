"""``scalekd demo`` end to end at a toy size, and the shipped teacher."""
import json
import re

import pytest
import torch

from engine_fixtures import make_fashion_mnist
from scalekd.cli import main
from scalekd.tools.demo import STUDENTS, TEACHER_WEIGHTS, DemoSettings, format_table, load_teacher, run_demo

TOY = dict(subset=64, epochs=2, batch_size=32, test_sample=40, progress=False)


@pytest.fixture(scope='module')
def fashion_dir(tmp_path_factory):
    return make_fashion_mnist(tmp_path_factory.mktemp('fmnist'), n_train=200, n_test=80)


def test_shipped_teacher_is_small_and_loads():
    assert TEACHER_WEIGHTS.is_file() and TEACHER_WEIGHTS.stat().st_size <= 5_000_000
    teacher = load_teacher(str(TEACHER_WEIGHTS))
    assert not teacher.training and sum(p.numel() for p in teacher.parameters()) > 1_000_000
    with torch.no_grad():
        logits = teacher(torch.zeros(2, 1, 28, 28))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


def _table_numbers(table: str):
    rows = {}
    for line in table.splitlines():
        name = line.split(' ')[0]
        if name in STUDENTS or name == 'teacher':
            rows[name] = [float(x) for x in re.findall(r'[+-]?\d+\.\d\d', line)]
    return rows


def test_demo_end_to_end_writes_results_plot_and_a_table_that_matches(tmp_path, fashion_dir, capsys):
    out = tmp_path / 'demo'
    code = main(['demo', '--data', str(fashion_dir), '--output', str(out), '--baselines', '--subset', '64',
                 '--epochs', '2', '--no-progress', '--option', 'w_ori=0.1', '--test-sample', '40',
                 '--batch-size', '32'])
    assert code == 0
    results = json.loads((out / 'results.json').read_text())
    assert 0 <= results['teacher_top1'] <= 100
    assert set(results['students']) == set(STUDENTS)
    assert results['settings']['distill'] == {'w_ori': 0.1}
    for name, row in results['students'].items():
        for label in ('alone', 'kd', 'scalekd'):
            assert 0 <= row[f'{label}_top1'] <= 100
            assert len(row['curves'][label]) == 2
            run = out / f'{name}-{label}'
            assert (run / 'config.yaml').is_file() and (run / 'metrics.jsonl').is_file()
        assert row['gain'] == pytest.approx(row['scalekd_top1'] - row['alone_top1'])
    assert (out / 'accuracy.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

    table = _table_numbers(capsys.readouterr().out)
    assert table['teacher'] == [round(results['teacher_top1'], 2)]
    for name, row in results['students'].items():
        expected = [row['alone_top1'], row['kd_top1'], row['scalekd_top1'], row['gain']]
        assert table[name] == pytest.approx([round(v, 2) for v in expected], abs=0.006)


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
