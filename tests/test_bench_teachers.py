"""``scalekd bench --config``: a run config's teachers timed and measured one by one."""
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from engine_fixtures import tiny_config
from scalekd.cli import main
from scalekd.engine.inputs.config import load_config
from scalekd.tools import bench

VIT = dict(model='vit_tiny_patch16_224', kwargs=dict(patch_size=8, embed_dim=64, depth=4, num_heads=2))
TEACHERS = [dict(VIT, name='small'), dict(VIT, name='large', img_size=64)]  # the student sees 32 px


def _two_teacher_config(tmp: Path) -> Path:
    """``tiny_config`` with two tiny ViT teachers, one at twice the student's image size (no data read)."""
    path = tiny_config(tmp, tmp / 'data', student=dict(kwargs=dict(layers=[1, 1, 1, 1], output_stride=16)))
    cfg = yaml.safe_load(path.read_text())
    del cfg['teacher']
    cfg['teachers'] = TEACHERS
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_config_bench_times_and_measures_each_teacher(tmp_path, capsys):
    path = _two_teacher_config(tmp_path)
    assert main(['bench', '--config', str(path), '--batch', '4', '--steps', '1', '--in-process', '--json',
                 '--device', 'cpu']) == 0
    report = json.loads(capsys.readouterr().out)
    assert report['config'] == str(path) and report['img_size'] == 32 and report['student'] == 'resnet18'
    rows = {r['name']: r for r in report['variants']}
    assert list(rows) == ['student', 'scalekd']
    assert rows['student']['params']['teacher'] == 0 and rows['student']['components'] is None
    parts = report['components']
    names = [f'{t}/{p}' for t in ('small', 'large') for p in ('teacher', 'proxy', 's4')]
    assert set(parts) == {'student', *names, 'optimizer', 'sum', 'full', 'unexplained'}
    assert all(parts[n] > 0 for n in names)
    assert parts['sum'] == pytest.approx(sum(v for k, v in parts.items() if k not in ('sum', 'full', 'unexplained')))

    small, large = report['teachers']
    assert [(t['name'], t['img_size']) for t in (small, large)] == [('small', [32, 32]), ('large', [64, 64])]
    assert large['params'] - small['params'] == (64 - 16) * 64  # the position embedding of 48 more 8-px patches
    assert small['distill_params'] + large['distill_params'] == rows['scalekd']['params']['distill']
    assert small['params'] + large['params'] == rows['scalekd']['params']['teacher']
    for t in (small, large):  # each projector part allocates at least its own fp32 gradients
        assert t['proxy_peak_mb'] > 0 and t['s4_peak_mb'] > 0
        assert t['proxy_peak_mb'] + t['s4_peak_mb'] >= t['distill_params'] * 4 / 2 ** 20
    # 4x the tokens and 16x the attention maps: the 64-px forward holds more than the 32-px one
    assert large['forward_peak_mb'] > small['forward_peak_mb'] > 0

    table = bench.format_table(report)
    for name in names + ['small subtotal', 'large subtotal']:
        assert f'  {name} ' in table
    assert any(line.startswith('small ') and '32x32' in line for line in table.splitlines())
    assert any(line.startswith('large ') and '64x64' in line for line in table.splitlines())


def test_config_bench_table_gives_each_part_its_ms_share_and_a_subtotal_per_teacher():
    """format_table on a canned two-teacher report (hand-computed milliseconds and shares)."""
    parts = {'student': 0.05, 'a/teacher': 0.01, 'a/proxy': 0.02, 'a/s4': 0.03, 'b/teacher': 0.04, 'b/s4': 0.02,
             'optimizer': 0.01}
    teacher = dict(model='vit_tiny_patch16_224 (VisionTransformer)', img_size=[32, 32], params=213_763,
                   distill_params=6_290_944, forward_peak_mb=0.7, s4_peak_mb=23.7)
    report = dict(config='two.yaml', teacher='vit + vit', student='resnet18', img_size=32, batch=4, precision='fp32',
                  teacher_precision=None, channels_last=False, compile=False, device='cuda', cpu='',
                  variants=[dict(name='scalekd', step_s=0.25, images_per_s=16.0, peak_mb=900.0,
                                 params=dict(distill=12_581_888), components=dict(parts, full=0.2))],
                  components=dict(parts, sum=0.18, full=0.2, unexplained=0.1),
                  teachers=[dict(teacher, name='a', proxy_peak_mb=9.9), dict(teacher, name='b', img_size=[64, 64])])
    lines = bench.format_table(report).splitlines()
    assert lines[0].startswith('two.yaml: vit + vit -> resnet18 at 32, batch 4, fp32 on cuda')
    rows = {line.split()[0]: line.split()[1:] for line in lines if line.startswith('  ')}
    assert rows['a/proxy'] == ['20.0', '10.0%'] and rows['b/teacher'] == ['40.0', '20.0%']
    assert [line.split()[-2:] for line in lines if 'subtotal' in line] == [['60.0', '30.0%'], ['60.0', '30.0%']]
    assert rows['optimizer'] == ['10.0', '5.0%'] and '  sum 180.0 ms vs full 200.0 ms (+10.0% unexplained)' in lines
    a, b = (line.split() for line in lines if line.startswith(('a ', 'b ')))
    assert a[-4:] == ['6,290,944', '0.7', '9.9', '23.7'] and b[-3:] == ['0.7', '-', '23.7']  # b has no proxy path
    assert '32x32' in a and '64x64' in b


def test_config_bench_takes_the_configs_settings_unless_given(tmp_path, monkeypatch):
    """What each variant's process is given: the config, with the command line's settings as overrides."""
    path = _two_teacher_config(tmp_path)
    seen = []

    def fake_run(cmd, **kwargs):
        spec = json.loads(cmd[-1])
        seen.append(load_config(spec['config'], spec['overrides']))
        row = dict(name=spec['variant'], step_s=1.0, peak_mb=1.0, images_per_s=4.0, precision='fp32',
                   params=dict(distill=0), losses={}, components=None, teachers=None)
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(row) + '\n', stderr='')
    monkeypatch.setattr(bench.subprocess, 'run', fake_run)
    report = bench.run_config_bench(str(path), ['train.channels_last=true'], variants=['scalekd'])
    assert (report['img_size'], report['channels_last'], report['compile']) == (32, True, False)
    assert [(c.data.img_size, c.train.teacher_precision, c.train.channels_last) for c in seen] == [(32, None, True)]
    report = bench.run_config_bench(str(path), img_size=48, teacher_precision='bf16', compile=True)
    assert [r['name'] for r in report['variants']] == ['student', 'scalekd']
    assert (report['img_size'], report['teacher_precision'], report['compile']) == (48, 'bf16', True)
    assert [(c.data.img_size, c.train.teacher_precision, c.train.compile) for c in seen[1:]] == [(48, 'bf16', True)] * 2


@pytest.mark.parametrize('args, message', [
    (['--teacher', 'vit_tiny_patch16_224'], 'give either --config or --teacher/--student, not both'),
    (['--variants', 'cap'], 'unknown bench variant(s) cap; choose from student, scalekd'),
])
def test_config_bench_refuses_what_does_not_apply_in_one_line(tmp_path, args, message, capsys):
    assert main(['bench', '--config', str(_two_teacher_config(tmp_path)), '--device', 'cpu', *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
