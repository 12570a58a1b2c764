"""Every value of a run config is checked against its range before anything is built or written:
one line naming the key, the file and what is allowed (table-driven)."""
from pathlib import Path

import pytest

from engine_fixtures import tiny_config
from scalekd.cli import main
from scalekd.engine.inputs.config import ConfigError, load_config
from scalekd.engine.inputs.config_rules import RULES

# (override, what the one line must say)
CASES = [
    ('sched.epochs=0', 'sched.epochs in {cfg} (with overrides) must be >= 1, got 0'),
    ('train.accum_steps=0', 'train.accum_steps in {cfg} (with overrides) must be >= 1, got 0'),
    ('log.interval=0', 'log.interval in {cfg} (with overrides) must be >= 1, got 0'),
    ('train.eval_every=0', 'train.eval_every in {cfg} (with overrides) must be >= 1, got 0'),
    ('data.label_smoothing=2.0', 'data.label_smoothing in {cfg} (with overrides) must be in [0, 1), got 2.0'),
    ('optim.lr=0', 'optim.lr in {cfg} (with overrides) must be > 0, got 0.0'),
    ('optim.lr=-1e-3', 'optim.lr in {cfg} (with overrides) must be > 0, got -0.001'),
    ('train.ema_decay=2.0', 'train.ema_decay in {cfg} (with overrides) must be in (0, 1), got 2.0'),
    ('data.num_classes=1', 'data.num_classes in {cfg} (with overrides) must be >= 2, got 1'),
    ('data.scale=[1.0,0.5]', 'data.scale in {cfg} (with overrides) must be [min, max] with 0 < min <= max <= 1'),
    ('data.ratio=[0,1]', 'data.ratio in {cfg} (with overrides) must be [min, max] with 0 < min <= max'),
    ('sched.warmup_epochs=2', 'sched.warmup_epochs in {cfg} (with overrides) must be less than sched.epochs (2)'),
    ('train.batch_size=0', 'train.batch_size in {cfg} (with overrides) must be >= 1, got 0'),
    ('data.workers=-1', 'data.workers in {cfg} (with overrides) must be >= 0, got -1'),
    ('optim.opt=adamq', "optim.opt in {cfg} (with overrides) must be an optimizer timm knows"),
    ('sched.sched=cosin', 'sched.sched in {cfg} (with overrides) must be one of cosine, tanh, step'),
    ('train.precision=fp8', 'train.precision in {cfg} (with overrides) must be one of fp32, bf16, fp16, auto'),
    ('train.teacher_precision=fp8',
     'train.teacher_precision in {cfg} (with overrides) must be null or one of fp32, bf16, fp16, auto'),
    ('data.interpolation=cubic', 'data.interpolation in {cfg} (with overrides) must be one of bilinear'),
    ('optim.momentum=1.5', 'optim.momentum in {cfg} (with overrides) must be in [0, 1), got 1.5'),
    ('data.crop_pct=0', 'data.crop_pct in {cfg} (with overrides) must be in (0, 1], got 0.0'),
    ('data.hflip=2', 'data.hflip in {cfg} (with overrides) must be in [0, 1], got 2.0'),
    ('data.re_prob=-0.5', 'data.re_prob in {cfg} (with overrides) must be in [0, 1], got -0.5'),
    ('data.re_mode=noise', 'data.re_mode in {cfg} (with overrides) must be one of const, rand, pixel'),
    ('train.max_nan_skips=-1', 'train.max_nan_skips in {cfg} (with overrides) must be >= 0, got -1'),
    ('train.keep_checkpoints=-1', 'train.keep_checkpoints in {cfg} (with overrides) must be >= 0 (0 keeps every'),
    ('train.checkpoint_every_steps=-2', 'train.checkpoint_every_steps in {cfg} (with overrides) must be >= 0'),
    ('data.train_subset=0', 'data.train_subset in {cfg} (with overrides) must be null or >= 1, got 0'),
    ('data.subset_draw=stratified', 'data.subset_draw in {cfg} (with overrides) must be one of random, balanced'),
    ('data.val_batch_size=0', 'data.val_batch_size in {cfg} (with overrides) must be null or >= 1, got 0'),
    ('train.dist_timeout_s=0', 'train.dist_timeout_s in {cfg} (with overrides) must be >= 1, got 0'),
    ('data.mixup=-0.1', 'data.mixup in {cfg} (with overrides) must be >= 0, got -0.1'),
    ('optim.clip_grad=0', 'optim.clip_grad in {cfg} (with overrides) must be null or > 0, got 0.0'),
    ('optim.weight_decay=-1', 'optim.weight_decay in {cfg} (with overrides) must be >= 0, got -1.0'),
    ('data.img_size=0', 'data.img_size in {cfg} (with overrides) must be in [1, 4096] (one 4096 x 4096 image takes '
                        '200 MB as float32 before any activation), got 0'),
    ('data.img_size=100000', 'data.img_size in {cfg} (with overrides) must be in [1, 4096]'),
    ('seed=-1', 'seed in {cfg} (with overrides) must be in [0, 4294967295] (the seeds NumPy takes), got -1'),
    ('data.mean=[]', 'data.mean in {cfg} (with overrides) is given without data.std: give both or neither'),
    ('teacher.std=[0.2,0.2,0.2]', 'teacher.std in {cfg} (with overrides) is given without teacher.mean'),
    ('distill.w_ori=-0.1', 'distill.w_ori in {cfg} (with overrides) must be null or >= 0 (a negative loss weight '
                           'pushes the student away from its target), got -0.1'),
    ('distill.w_alt=-1', 'distill.w_alt in {cfg} (with overrides) must be null or >= 0'),
    ('distill.alpha=-2', 'distill.alpha in {cfg} (with overrides) must be null or >= 0'),
    ('distill.beta=1.5', 'distill.beta in {cfg} (with overrides) must be null or in [0, 1], got 1.5'),
    ('distill.kd_weight=-0.5', 'distill.kd_weight in {cfg} (with overrides) must be in [0, 1], got -0.5'),
    ('distill.kd_temperature=0', 'distill.kd_temperature in {cfg} (with overrides) must be > 0, got 0.0'),
    ('distill.softmax_scale=-5', 'distill.softmax_scale in {cfg} (with overrides) must be > 0, got -5.0'),
    ('distill.s3_heads=0', 'distill.s3_heads in {cfg} (with overrides) must be >= 1, got 0'),
    ('distill.s4_heads=-8', 'distill.s4_heads in {cfg} (with overrides) must be >= 1, got -8'),
    ('data.dataset=imagenet', 'data.dataset in {cfg} (with overrides) must be one of folder, fashion_mnist'),
    ('sched.decay_rate=0', 'sched.decay_rate in {cfg} (with overrides) must be > 0, got 0.0'),
    ('distill.kd_temperature=.inf',
     'distill.kd_temperature in {cfg} (with overrides) must be a finite number, got inf'),
    ('optim.lr=.inf', 'optim.lr in {cfg} (with overrides) must be a finite number, got inf'),
    ('distill.w_ori=.inf', 'distill.w_ori in {cfg} (with overrides) must be a finite number, got inf'),
    ('data.ratio=[0.75,.inf]', 'data.ratio in {cfg} (with overrides) must be a finite number, got (0.75, inf)'),
]


@pytest.mark.parametrize('override,message', CASES, ids=[c[0] for c in CASES])
def test_a_value_out_of_range_is_one_line_before_anything_is_built(override, message, tmp_path, data_root, capsys):
    cfg = tiny_config(tmp_path, data_root)
    assert main(['train', str(cfg), '-o', override]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [err.strip()] and message.format(cfg=cfg) in err, err
    assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('section,message', [
    (dict(data=dict(mean=[], std=[])), 'data.mean in {cfg} must have one value per input channel (data.in_chans: 3), '
                                       'got []'),
    (dict(data=dict(mean=[0.5, 0.5, 0.5], std=[0.2, 0.2])), 'data.std in {cfg} must have one value per input channel'),
    (dict(data=dict(mean=[0.5, 0.5, 0.5], std=[0.2, 0, 0.2])), 'data.std in {cfg} must be > 0 on every channel, '
                                                               'got [0.2, 0.0, 0.2]'),
    (dict(data=dict(mean=[0.5, float('nan'), 0.5], std=[0.2, 0.2, float('inf')])),
     'data.mean in {cfg} must be finite on every channel, got [0.5, nan, 0.5]'),
    (dict(teacher=dict(mean=[0.5], std=[0.2])), 'teacher.mean in {cfg} must have one value per input channel '
                                                '(data.in_chans: 3), got [0.5]'),
])
def test_an_input_normalisation_is_one_value_per_channel(section, message, tmp_path, data_root, capsys):
    cfg = tiny_config(tmp_path, data_root, **section)
    assert main(['train', str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [err.strip()] and message.format(cfg=cfg) in err, err
    assert not (tmp_path / 'run').exists()


def test_every_rule_is_exercised():
    covered = {case.split('=')[0] for case, _ in CASES}
    assert {rule.key for rule in RULES} - covered <= {
        'data.in_chans', 'data.val_subset', 'data.color_jitter', 'data.cutmix', 'sched.epochs',
        'sched.decay_epochs', 'sched.warmup_lr', 'sched.min_lr', 'sched.warmup_epochs'}


def test_timm_optimizer_names_and_lookahead_are_accepted(tmp_path, data_root):
    cfg = tiny_config(tmp_path, data_root)
    for name in ('adamw', 'AdamW', 'lamb', 'lookahead_adamw', 'sgd', 'momentum'):
        assert load_config(cfg, [f'optim.opt={name}']).optim.opt == name


def test_a_key_given_twice_in_one_file_is_refused(tmp_path):
    path = Path(tmp_path / 'twice.yaml')
    path.write_text('optim:\n  lr: 0.1\n  momentum: 0.9\n  lr: 0.01\n')
    with pytest.raises(ConfigError, match=r'twice.yaml is not valid YAML: key lr is given twice') as e:
        load_config(path)
    assert '\n' not in str(e.value)


def test_resume_and_force_together_are_refused(tmp_path, data_root, capsys):
    assert main(['train', str(tiny_config(tmp_path, data_root)), '--resume', 'auto', '--force']) == 2
    assert '--resume and --force contradict each other' in capsys.readouterr().err
    assert not (tmp_path / 'run').exists()


def test_a_sharded_lookahead_optimizer_is_refused_before_anything_is_built(tmp_path, data_root, capsys):
    cfg = tiny_config(tmp_path, data_root, train=dict(zero=True), optim=dict(opt='lookahead_sgd'))
    assert main(['train', str(cfg)]) == 2
    assert (f"train.zero in {cfg} shards a plain optimizer, and optim.opt 'lookahead_sgd' wraps one in Lookahead"
            in capsys.readouterr().err)
    assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('opt', ['sgd', 'nesterov', 'lookahead_SGD', 'sgdw', 'nlars'])
def test_nesterov_sgd_without_momentum_is_refused_in_one_line(tmp_path, data_root, capsys, opt):
    """timm's ``sgd`` (and ``sgdw``, ``nlars``, ...) is Nesterov SGD, which its optimizer refuses without
    momentum (a traceback from the optimizer)."""
    cfg = tiny_config(tmp_path, data_root, optim=dict(opt=opt, momentum=0.0))
    assert main(['train', str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"optim.momentum in {cfg} is 0, and optim.opt '{opt}' is timm's Nesterov variant" in err and 'Traceback' not in err
    assert not (tmp_path / 'run').exists()
    assert main(['train', str(tiny_config(tmp_path, data_root, optim=dict(opt='momentum', momentum=0.0))),
                 '--dry-run']) == 0
