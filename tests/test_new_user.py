"""What a new user met in the first hour: errors that name the fix, ``scalekd config show``, and a test run
that says how many tests passed."""
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml

from scalekd import build_distiller
from scalekd.cli import main
from scalekd.engine.inputs.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_ready_one_channel_models_without_in_chans_are_refused_naming_it():
    teacher = timm.create_model('test_vit', in_chans=1, img_size=64, num_classes=3)
    student = timm.create_model('test_resnet', in_chans=1, num_classes=3)
    with pytest.raises(ValueError, match=r'takes 1 input channel\(s\), but in_chans is 3: pass in_chans=1'):
        build_distiller(teacher, student, img_size=64)
    assert build_distiller(teacher, student, img_size=64, in_chans=1).in_chans == 1


def test_inspect_refuses_kd_with_a_headless_teacher_naming_its_own_option(capsys):
    code = main(['inspect', '--teacher', 'test_vit', '--teacher-kwarg', 'num_classes=0', '--student', 'test_resnet',
                 '--img-size', '64', '--no-step'])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert 'has no classifier' in err[0] and '--option kd=false on the command line' in err[0]
    assert main(['inspect', '--teacher', 'test_vit', '--teacher-kwarg', 'num_classes=0', '--student', 'test_resnet',
                 '--img-size', '64', '--no-step', '--option', 'kd=false']) == 0


def test_inspect_says_the_size_it_builds_at_when_none_is_given(capsys):
    assert main(['inspect', '--teacher', 'test_vit', '--student', 'test_resnet', '--no-step']) == 0
    out, err = capsys.readouterr()
    assert err.strip() == ('scalekd inspect: building at 160x160, the pretrained input size of the models '
                           '(--img-size N for another)')  # test_vit's; DINOv2's is 518
    assert out.startswith('method scalekd at 160x160')


def test_inspect_refuses_a_bad_option_in_one_line_before_saying_the_size(capsys):
    assert main(['inspect', '--teacher', 'test_vit', '--student', 'test_resnet', '--option', 'betta=0.5']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'unknown distillation option(s) betta' in err[0]


def test_config_show_prints_the_resolved_config_a_run_would_use(tmp_path, capsys):
    config = ROOT / 'configs' / 'table3' / 'swin_l-resnet50.yaml'  # base: a recipe and a teacher
    overrides = ['train.batch_size=512', 'distill.kd=false']
    assert main(['config', 'show', str(config), '-o', overrides[0], '-o', overrides[1]]) == 0
    shown = capsys.readouterr().out
    (tmp_path / 'shown.yaml').write_text(shown)
    expected, again = load_config(config, overrides), load_config(tmp_path / 'shown.yaml')
    assert again.distill_options() == expected.distill_options()
    assert {k: v for k, v in vars(again).items() if k != 'distill'} == \
        {k: v for k, v in vars(expected).items() if k != 'distill'}
    data = yaml.safe_load(shown)
    assert data['train']['batch_size'] == 512 and data['teacher']['model'].startswith('swin_large')  # base and -o
    assert data['distill']['projector'] == 'cap' and data['distill']['kd'] is False  # the method's defaults resolved
    assert data['distill']['s4_heads'] == 24 and data['train']['keep_checkpoints'] == 2  # the teacher's base; a default
    assert set(data) == set(vars(expected))


def test_config_show_refuses_a_bad_key_in_one_line(capsys):
    assert main(['config', 'show', str(ROOT / 'examples' / 'own_data.yaml'), '-o', 'data.img_sise=64']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown config key 'data.img_sise'" in err[0] and "did you mean 'img_size'" in err[0]


def test_the_own_data_example_config_is_valid():
    cfg = load_config(ROOT / 'examples' / 'own_data.yaml', ['data.num_classes=5'])
    assert cfg.distill_options().kd is False and cfg.data.num_classes == 5


@pytest.mark.slow
def test_a_quiet_test_run_still_says_how_many_passed():
    run = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', 'tests/test_docs.py',
                          '-k', 'test_a_key_without_a_description'], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0 and '1 passed' in run.stdout.splitlines()[-1]


@pytest.mark.slow
def test_a_run_says_on_the_console_which_precision_auto_picked(tmp_path, data_root, capsys):
    from engine_fixtures import tiny_config
    from scalekd.engine.runtime.precision import resolve_precision
    cfg = tiny_config(tmp_path, data_root, sched=dict(sched='cosine', epochs=1, warmup_epochs=0),
                      train=dict(batch_size=8, precision='auto'))
    assert main(['train', str(cfg)]) == 0
    picked = resolve_precision('auto', torch.device('cpu'))
    assert f'process(es) on cpu, {picked} picked by precision auto)' in capsys.readouterr().out
