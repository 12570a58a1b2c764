"""``scalekd inspect`` on the paper's pairs at real size (random weights), and its errors."""
import json
import subprocess
import sys

import pytest

import scalekd.task.builder as builder
from scalekd.cli import main
from scalekd.tools.paper_pairs import PAPER_PAIRS


def _inspect_json(capsys, *args):
    code = main(['inspect', '--json', *args])
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out)


def _taps(report):
    return {t['name']: (t['student_shape'], t['target_shape']) for t in report['taps']}


@pytest.mark.slow
def test_headline_pair_shapes_params_and_one_training_step(capsys):
    report = _inspect_json(capsys, '--teacher', 'swin_large_patch4_window7_224', '--student', 'resnet50')
    assert _taps(report) == {'s3': ([1024, 14, 14], [768, 14, 14]), 's4': ([2048, 7, 7], [1536, 7, 7])}
    assert report['teacher_last_stage'] == {'input_shape': [768, 14, 14], 'output_shape': [1536, 7, 7]}
    params = report['params']
    assert params['student'] == 25_557_032          # timm resnet50
    assert 196_000_000 < params['teacher'] < 198_000_000
    assert 170_000_000 < params['distill'] < 182_000_000  # "about 176M" (paper, Table 15)
    assert params['distill'] == sum(t['params'] for t in report['taps'])
    step = report['train_step']
    assert step['ok'] and set(step['losses']) >= {'loss', 'task_loss', 'kd_loss', 'proxy_ori', 's4_alt'}


EXPECTED_TAPS = {
    'swin_l-mobilenet_v1': ([512, 14, 14], [1024, 7, 7]),
    'swin_l-resnet50': ([1024, 14, 14], [2048, 7, 7]),
    'swin_l-convnext_t': ([384, 14, 14], [768, 7, 7]),
    'swin_l-mixer_s16': ([512, 14, 14], [512, 14, 14]),
    'swin_l-mixer_b16': ([768, 14, 14], [768, 14, 14]),
    'swin_l-vit_s16': ([384, 14, 14], [384, 14, 14]),
    'swin_l-swin_t': ([384, 14, 14], [768, 7, 7]),
    'swin_l-vit_b16': ([768, 14, 14], [768, 14, 14]),
    'beit_l-resnet50': ([1024, 14, 14], [2048, 7, 7]),
    'beit_l-mixer_b14': ([768, 16, 16], [768, 16, 16]),
    'beit_l-vit_b14': ([768, 16, 16], [768, 16, 16]),
}


@pytest.fixture(scope='module')
def shared_teachers():
    """The frozen teachers are built once (random weights) for all pairs that share them."""
    create = builder.create_timm_model
    cache = {}

    def cached(name, img_size, role='model', **kwargs):
        if role != 'teacher':
            return create(name, img_size, role=role, **kwargs)
        key = (name, tuple(img_size), tuple(sorted(kwargs.items())))
        if key not in cache:
            cache.clear()
            cache[key] = create(name, img_size, role=role, **kwargs)
        return cache[key]
    return cached


@pytest.mark.slow
@pytest.mark.parametrize('pair', sorted(PAPER_PAIRS))
def test_every_table3_pair_builds_at_224(capsys, pair, shared_teachers, monkeypatch):
    monkeypatch.setattr(builder, 'create_timm_model', shared_teachers)
    report = _inspect_json(capsys, '--pair', pair, '--no-step')
    s3, s4 = EXPECTED_TAPS[pair]
    taps = _taps(report)
    assert taps['s3'][0] == s3 and taps['s4'][0] == s4
    if pair.startswith('swin_l'):
        assert taps['s3'][1] == [768, 14, 14] and taps['s4'][1] == [1536, 7, 7]
    else:  # EVA (BEiT-L/14) teacher at 224: 16x16 tokens of width 1024, last 6 of 24 blocks
        assert taps['s3'][1] == [1024, 16, 16] and taps['s4'][1] == [1024, 16, 16]


@pytest.mark.slow
def test_other_resolutions(capsys):
    # Swin teacher at 256 with a window that divides every stage grid
    report = _inspect_json(capsys, '--teacher', 'swin_tiny_patch4_window7_224', '--teacher-kwarg', 'window_size=8',
                           '--student', 'resnet18', '--img-size', '256', '--num-classes', '10')
    assert _taps(report) == {'s3': ([256, 16, 16], [384, 16, 16]), 's4': ([512, 8, 8], [768, 8, 8])}
    assert report['train_step']['ok']
    # ViT student at 160 (10x10 tokens) under a Swin teacher with window 5
    report = _inspect_json(capsys, '--teacher', 'swin_tiny_patch4_window7_224', '--teacher-kwarg', 'window_size=5',
                           '--student', 'vit_tiny_patch16_224', '--img-size', '160', '--num-classes', '10')
    assert _taps(report) == {'s3': ([192, 10, 10], [384, 10, 10]), 's4': ([192, 10, 10], [768, 5, 5])}
    assert report['train_step']['ok']


def test_method_and_options_reach_the_report(capsys):
    report = _inspect_json(capsys, '--teacher', 'vit_tiny_patch16_224', '--student', 'resnet18', '--img-size', '64',
                           '--teacher-kwarg', 'patch_size=8', '--method', 'fd', '--option', 'stages=[s3, s4]',
                           '--num-classes', '10')
    assert [(t['name'], t['projector'], t['views']) for t in report['taps']] == [
        ('s3', 'linear', ['ori']), ('s4', 'linear', ['ori'])]
    assert set(report['train_step']['losses']) == {'loss', 'task_loss', 's3_ori', 's4_ori'}


@pytest.mark.slow
def test_text_report_and_errors_exit_non_zero(capsys):
    run = [sys.executable, '-m', 'scalekd.cli', 'inspect']
    ok = subprocess.run(run + ['--teacher', 'vit_tiny_patch16_224', '--student', 'resnet18', '--img-size', '32',
                               '--teacher-kwarg', 'patch_size=8', '--no-step'], capture_output=True, text=True)
    assert ok.returncode == 0 and 's4' in ok.stdout and 'params: student' in ok.stdout
    bad = subprocess.run(run + ['--teacher', 'swin_lage_patch4_window7_224', '--student', 'resnet50', '--no-step'],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert "unknown teacher model 'swin_lage_patch4_window7_224'" in bad.stderr and 'did you mean' in bad.stderr
    assert 'Traceback' not in bad.stderr
    assert main(['inspect', '--teacher', 'twins_svt_small', '--student', 'resnet18', '--img-size', '64', '--no-step']) == 2
    assert "twins_svt_small (Twins): its feature_info names 'block.3' as the last stage" in capsys.readouterr().err
    assert main(['inspect', '--pair', 'swin_l-resnet50', '--option', 'betta=0.5', '--no-step']) == 2
    assert 'unknown distillation option(s) betta' in capsys.readouterr().err
