"""YAML configs validated into typed objects: errors name the key and the file."""
import pytest
import yaml

from scalekd.engine.inputs.config import ConfigError, load_config, save_config


def _write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_base_merge_overrides_and_saved_config(tmp_path):
    _write(tmp_path / 'recipe.yaml', dict(optim=dict(opt='adamw', lr=1e-3), train=dict(batch_size=64)))
    cfg_path = _write(tmp_path / 'run.yaml', dict(base='recipe.yaml', student=dict(model='resnet18'),
                                                  optim=dict(lr=5e-3), data=dict(scale=[0.5, 1])))
    cfg = load_config(cfg_path, ['sched.epochs=3', 'distill.beta=0.4'])
    assert (cfg.optim.opt, cfg.optim.lr, cfg.train.batch_size, cfg.sched.epochs) == ('adamw', 5e-3, 64, 3)
    assert cfg.data.scale == (0.5, 1.0) and cfg.distill.beta == 0.4
    assert cfg.distill_options().w_ori == pytest.approx(0.4)
    save_config(cfg, tmp_path / 'resolved.yaml')
    again = load_config(tmp_path / 'resolved.yaml')
    assert again == cfg


@pytest.mark.parametrize('override,message', [
    ('train.batchsize=3', r"unknown config key 'train.batchsize' in .*run.yaml.*did you mean 'batch_size'"),
    ('train.batch_size=abc', r"train.batch_size in .*run.yaml.* must be int, got str 'abc'"),
    ('optim.lr=true', r'optim.lr in .* must be float, got bool'),
    ('data.scale=[1]', r'data.scale in .* must have 2 items'),
    ('distill.tpp=3', r'distill.tpp in .* must be bool'),
    ('distill.method=kd', r'distill section of .*run.yaml.*need a feature method'),
    ('teacher=3', r'teacher in .* must be a mapping'),
    ('nonsense', r"-o expects KEY=VALUE, got 'nonsense'"),
    ('=3', r"-o expects KEY=VALUE, got '=3'"),
    ('optim.lr=[1,', r"-o 'optim.lr=\[1,': the value is not valid YAML"),
])
def test_bad_keys_and_values_name_key_and_file(tmp_path, override, message):
    path = _write(tmp_path / 'run.yaml', dict(student=dict(model='resnet18'), distill=dict(stages=['s3', 's4'])))
    with pytest.raises(ConfigError, match=message):
        load_config(path, [override])


def test_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match='does not exist'):
        load_config(tmp_path / 'missing.yaml')
    (tmp_path / 'bad.yaml').write_text('a: [1,\n')
    with pytest.raises(ConfigError, match='bad.yaml is not valid YAML'):
        load_config(tmp_path / 'bad.yaml')
    (tmp_path / 'loop.yaml').write_text('base: loop.yaml\n')
    with pytest.raises(ConfigError, match='includes itself'):
        load_config(tmp_path / 'loop.yaml')
