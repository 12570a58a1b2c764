"""configs/demo/*.yaml are the demo's student runs: same values as ``scalekd demo`` trains."""
import dataclasses
import runpy
from pathlib import Path

import pytest
import yaml

from scalekd.engine.inputs.config import load_config
from scalekd.tools.demo import METHOD_LABELS, STUDENTS, DemoSettings, run_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = runpy.run_path(str(ROOT / 'scripts' / 'make_demo_configs.py'))


@pytest.mark.parametrize('student', sorted(STUDENTS))
@pytest.mark.parametrize('method', sorted(METHOD_LABELS))
def test_a_demo_config_is_the_demo_run(student, method):
    path = ROOT / 'configs' / 'demo' / f'{student}-{METHOD_LABELS[method]}.yaml'
    cfg = load_config(path)
    expected = run_config(DemoSettings(teacher_weights=SCRIPT['TEACHER']), student, method)
    assert cfg == dataclasses.replace(expected, log=dataclasses.replace(expected.log, console=True))
    assert cfg.distill.method == method and cfg.data.train_subset == 800
    if method != 'none':
        assert (ROOT / cfg.teacher.checkpoint).is_file()


def test_the_files_are_what_the_script_writes():
    made = {name: header + yaml.safe_dump(cfg, sort_keys=False) for name, header, cfg in SCRIPT['demo_configs']()}
    on_disk = {p.name: p.read_text() for p in (ROOT / 'configs' / 'demo').glob('*-*.yaml')}
    assert on_disk == made and len(made) == 9


def test_a_dry_run_of_a_demo_config_loads_the_shipped_teacher(monkeypatch):
    import torch
    from scalekd.engine.loop.dry_run import dry_run
    monkeypatch.chdir(ROOT)  # the teacher's path is relative to the repository root
    report = dry_run(load_config(ROOT / 'configs' / 'demo' / 'cnn-scalekd.yaml'), torch.device('cpu'))
    assert report['weights'] == {'teacher': f'loaded {SCRIPT["TEACHER"]}', 'student': 'random'}
    assert report['finite'] and {'s4_ori', 's4_alt', 'proxy_ori', 'proxy_alt', 'kd_loss'} <= set(report['losses'])
