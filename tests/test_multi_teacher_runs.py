"""Several teachers in a run config: validation, one-line refusals, a run's terms and its resume."""
import json
from pathlib import Path

import pytest
import torch
import yaml

from engine_fixtures import tiny_config
from run_tools import kill_group, start, wait_for
from scalekd.cli import main
from scalekd.engine.inputs.config import ConfigError, load_config
from scalekd.engine.run_folder.checkpoint import checkpoint_name, load_checkpoint, save_checkpoint

VIT = dict(model='vit_tiny_patch16_224', kwargs=dict(patch_size=8, embed_dim=64, depth=4, num_heads=2))
TWO = [dict(VIT, name='a'), dict(VIT, name='big', img_size=64, weight=0.5, kwargs=dict(VIT['kwargs'], embed_dim=32))]


def _two_teacher_config(tmp: Path, data_root: Path, teachers=None, **sections) -> Path:
    """``tiny_config`` with a ``teachers`` list instead of its ``teacher`` block."""
    path = tiny_config(tmp, data_root, **sections)
    cfg = yaml.safe_load(path.read_text())
    del cfg['teacher']
    cfg['teachers'] = TWO if teachers is None else teachers
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize('change, match', [
    (lambda c: c.update(teacher=VIT), r'teacher and teachers are both given in .*: give one teacher in teacher'),
    (lambda c: c.update(teachers=[]), r'teachers in .* is an empty list'),
    (lambda c: c['teachers'][1].update(name='a'), r"teachers\[1\].name in .* is 'a', the name of teachers\[0\] too"),
    (lambda c: c['teachers'][0].pop('name'), r'teachers\[0\].name in .* is not set'),
    (lambda c: c['teachers'][1].update(tpp='sometimes'), r'teachers\[1\].tpp in .* must be true, false or auto'),
    (lambda c: c['teachers'][0].update(weight=-1), r'teachers\[0\].weight in .* must be a finite number >= 0'),
    (lambda c: c['teachers'][0].update(img_sise=64), r"unknown config key 'teachers\[0\].img_sise'.*'img_size'"),
    (lambda c: c['teachers'][1].update(mean=[0.5]), r'teachers\[1\].mean in .* is given without teachers\[1\].std'),
])
def test_a_bad_teachers_list_is_one_error_naming_the_key(tmp_path, data_root, change, match):
    path = _two_teacher_config(tmp_path, data_root)
    cfg = yaml.safe_load(path.read_text())
    change(cfg)
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=match) as info:
        load_config(path)
    assert '\n' not in str(info.value)


@pytest.mark.parametrize('entry, message', [
    (dict(VIT, name='dino', kd=True, kwargs=dict(VIT['kwargs'], num_classes=0)),
     "logit KD cannot be used: teacher 'dino': the teacher vit_tiny_patch16_224 (VisionTransformer) has no classifier"),
    (dict(VIT, name='odd', img_size=36), "image size 36 is not a multiple of the teacher 'vit_tiny_patch16_224' patch "
                                         "size 8: the last 4 pixel rows and columns would be dropped "
                                         "(teachers[1].img_size: use 32 or 40)"),
])
def test_a_teacher_that_cannot_teach_as_asked_is_one_line_at_build(tmp_path, data_root, capsys, entry, message):
    path = _two_teacher_config(tmp_path, data_root, teachers=[TWO[0], entry])
    assert main(['train', str(path), '--dry-run']) == 2
    err = capsys.readouterr().err
    assert message in err and err.count('\n') == 1, err
    assert not (tmp_path / 'run').exists()


def test_the_dry_run_and_inspect_report_every_teacher(tmp_path, data_root, capsys):
    path = _two_teacher_config(tmp_path, data_root)
    assert main(['train', str(path), '--dry-run']) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(t['name'], t['img_size'], t['weight']) for t in report['teachers']] == [('a', [32, 32], 1.0),
                                                                                    ('big', [64, 64], 0.5)]
    assert {(t['teacher'], t['name'], tuple(t['target_shape'])) for t in report['taps']} == {
        ('a', 's3', (64, 4, 4)), ('a', 's4', (64, 4, 4)), ('big', 's3', (32, 8, 8)), ('big', 's4', (32, 8, 8))}
    assert {'a/s4_ori', 'big/proxy_alt', 'kd_loss'} <= set(report['losses']) and report['finite']
    assert main(['inspect', '--config', str(path)]) == 0
    out = capsys.readouterr().out
    assert 'teacher big: vit_tiny_patch16_224 (VisionTransformer) at 64x64, weight 0.5, kd on, tpp on' in out
    assert 'train step: ok' in out and 'big/s4_ori' in out
    assert main(['inspect', '--config', str(path), '--teacher', 'vit_tiny_patch16_224']) == 2


@pytest.fixture(scope='module')
def two_teacher_run(tmp_path_factory, data_root):
    """An uninterrupted deterministic two-teacher run (standardised targets, statistics from 4 of its 6
    steps: the resume below lands while they are still being estimated), a checkpoint every step."""
    tmp = tmp_path_factory.mktemp('two_teachers')
    cfg = _two_teacher_config(tmp, data_root, distill=dict(method='scalekd', teacher_norm='standardize',
                                                           teacher_norm_batches=4),
                              train=dict(checkpoint_every_steps=1, keep_checkpoints=20))
    assert main(['train', str(cfg), '--deterministic']) == 0
    return tmp / 'run'


@pytest.mark.slow
def test_a_two_teacher_run_logs_each_teachers_terms(two_teacher_run):
    steps = [json.loads(line) for line in (two_teacher_run / 'metrics.jsonl').read_text().splitlines()]
    step = next(r for r in steps if 'task_loss' in r)
    assert {k for k in step if '/' in k} == {f'{t}/{term}' for t in ('a', 'big')
                                            for term in ('proxy_ori', 'proxy_alt', 's4_ori', 's4_alt')}
    log = (two_teacher_run / 'train.log').read_text()
    assert ('teachers a vit_tiny_patch16_224 (VisionTransformer) (32x32, weight 1, kd, tpp), big vit_tiny_patch16_224 '
            '(VisionTransformer) (64x64, weight 0.5, kd, tpp)') in log
    state = load_checkpoint(two_teacher_run / 'checkpoint-0002.pth')['task_state']['distill']
    assert int(state['branches.big.norms.final.seen']) == 4 and int(state['branches.a.norms.final.seen']) == 4


def _same_final(a: Path, b: Path) -> None:
    sa, sb = load_checkpoint(a / 'checkpoint-0002.pth'), load_checkpoint(b / 'checkpoint-0002.pth')
    for part in ('student',):
        for key, value in sa[part].items():
            assert torch.equal(value, sb[part][key]), key
    assert sa['task_state']['distill'].keys() == sb['task_state']['distill'].keys()
    for key, value in sa['task_state']['distill'].items():
        assert torch.equal(value, sb['task_state']['distill'][key]), key


@pytest.mark.slow
def test_a_two_teacher_run_killed_mid_epoch_resumes_to_the_same_weights_and_statistics(two_teacher_run, data_root,
                                                                                       tmp_path):
    cfg = _two_teacher_config(tmp_path, data_root, distill=dict(method='scalekd', teacher_norm='standardize',
                                                                teacher_norm_batches=4),
                              train=dict(checkpoint_every_steps=1, keep_checkpoints=20))
    proc = start(cfg, '--deterministic')
    wait_for(tmp_path / 'run' / checkpoint_name(0, 2), proc)  # mid-epoch 1, statistics from 2 of 4 batches
    kill_group(proc)
    assert not (tmp_path / 'run' / 'checkpoint-0002.pth').exists()
    assert main(['train', str(cfg), '--resume', 'auto', '--deterministic']) == 0
    _same_final(two_teacher_run, tmp_path / 'run')


@pytest.mark.slow
def test_a_checkpoint_of_the_one_teacher_layout_resumes(straight, data_root, tmp_path):
    """A mid-run checkpoint of a one-teacher run whose task state has the layout before several teachers
    (``s4.*`` at the top, no ``branches.teacher.``) resumes to the uninterrupted run's weights."""
    state = load_checkpoint(straight / checkpoint_name(0, 2))
    state['task_state']['distill'] = {k.removeprefix('branches.teacher.'): v
                                      for k, v in state['task_state']['distill'].items()}
    assert any(k.startswith('proxy.') for k in state['task_state']['distill'])
    legacy = tmp_path / 'legacy' / checkpoint_name(0, 2)
    legacy.parent.mkdir()
    save_checkpoint(state, legacy)
    cfg = tiny_config(tmp_path, data_root, train=dict(checkpoint_every_steps=1, keep_checkpoints=20))
    assert main(['train', str(cfg), '--resume', str(legacy), '--deterministic']) == 0
    _same_final(straight, tmp_path / 'run')


def test_a_teachers_config_with_method_none_builds_the_student_alone(tmp_path, data_root):
    from scalekd.engine.inputs.task_build import build_task
    cfg = load_config(_two_teacher_config(tmp_path, data_root, distill=dict(method='none')))
    task = build_task(cfg, torch.device('cpu'), random_weights=True)
    assert len(task.teachers) == 0 and task.options.method == 'none'
