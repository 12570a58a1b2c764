"""Every experiment config of the paper loads and dry-runs at full size (random weights, batch 1)."""
import functools
from pathlib import Path

import pytest
import torch

import scalekd.engine.inputs.task_build as task_build
from scalekd.engine.inputs.config import load_config
from scalekd.engine.loop.dry_run import dry_run
from scalekd.method.errors import OptionError

CONFIGS = Path(__file__).resolve().parents[1] / 'configs'
PARTIALS = ('recipes', 'teachers')
FEATURE_ONLY = 'feature_only'  # ViT-L teachers of no paper row: dry-run with a shallow teacher of the same kind
MULTI_TEACHER = 'multi_teacher'  # two ViT-L-size teachers each: their full-size inspect is in docs/multi-teacher.md
EXPERIMENTS = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob('*.yaml')
                     if p.relative_to(CONFIGS).parts[0] not in PARTIALS + (FEATURE_ONLY, MULTI_TEACHER))


def test_every_paper_experiment_has_a_config():
    folders = {Path(p).parts[0] for p in EXPERIMENTS}
    assert {'table1', 'table2', 'table3', 'table4', 'table7', 'table9', 'table13', 'table17', 'fig4',
            'baselines'} <= folders
    assert len([p for p in EXPERIMENTS if p.startswith('table3/')]) == 11


@pytest.fixture(scope='module')
def shared_teachers():
    """Teachers are frozen, so one random-weight build per architecture serves every config."""
    create = task_build._create

    @functools.lru_cache(maxsize=2)
    def teacher(name, kwargs, img_size, num_classes, in_chans):
        from scalekd.engine.inputs.config import DataConfig, ModelConfig
        return create(ModelConfig(model=name, kwargs=dict(kwargs)),
                      DataConfig(img_size=img_size, num_classes=num_classes, in_chans=in_chans), 'teacher', True)

    def cached(model_cfg, data_cfg, role, random_weights, img_size=None, size_key='data.img_size'):
        if role != 'teacher':
            return create(model_cfg, data_cfg, role, random_weights)
        return teacher(model_cfg.model, tuple(sorted(model_cfg.kwargs.items())), img_size or data_cfg.img_size,
                       data_cfg.num_classes, data_cfg.in_chans)
    return cached


# sorted by teacher so the cache holds while one teacher's configs run
@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(EXPERIMENTS, key=lambda p: (load_config(CONFIGS / p).teacher.model, p)))
def test_config_dry_runs(name, shared_teachers, monkeypatch):
    monkeypatch.setattr(task_build, '_create', shared_teachers)
    cfg = load_config(CONFIGS / name)
    report = dry_run(cfg, torch.device('cpu'), batch=1)
    assert report['finite'], report['losses']
    options = cfg.distill_options()
    assert ('kd_loss' in report['losses']) == options.kd
    assert report['params']['distill'] > 0 or not options.uses_features


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(p.name for p in (CONFIGS / FEATURE_ONLY).glob('*.yaml')))
def test_feature_only_configs_dry_run_with_their_headless_teachers(name):
    """DINOv2 / EVA-02 MIM -> ResNet-50-D: the hub teacher keeps its own (absent) classifier, so the run is
    feature-only; built shallow (2 blocks of width 64) at 112 px to keep the test fast, everything else as
    configured."""
    assert load_config(CONFIGS / FEATURE_ONLY / name).data.img_size == 224
    shallow = ['teacher.kwargs.depth=2', 'teacher.kwargs.embed_dim=64', 'teacher.kwargs.num_heads=2',
               'data.img_size=112']
    cfg = load_config(CONFIGS / FEATURE_ONLY / name, shallow)
    assert cfg.teacher.pretrained and not cfg.distill_options().kd
    report = dry_run(cfg, torch.device('cpu'), batch=1)
    assert report['finite'], report['losses']
    assert 'kd_loss' not in report['losses'] and {'proxy_alt', 's4_alt'} <= set(report['losses'])
    with pytest.raises(OptionError, match='logit KD cannot be used: the teacher .* has no classifier'):
        dry_run(load_config(CONFIGS / FEATURE_ONLY / name, shallow + ['distill.kd=true']),
                       torch.device('cpu'), batch=1)


@pytest.mark.parametrize('name, teachers', [
    ('swin_l+dinov2_l-resnet50.yaml', [('swin_l', None, True), ('dinov2_l', 448, False)]),
    ('eva02_l+siglip_l-convnext_t.yaml', [('eva02_l', 448, None), ('siglip_l', 256, False)]),
])
def test_the_multi_teacher_configs_name_each_teacher_at_a_size_its_patches_tile(name, teachers):
    """The two full-size several-teacher configs load; each teacher at its own size, a multiple of its patch
    size (timm's pretrained cfg), the headless one without logit KD, the targets standardised."""
    import timm
    cfg = load_config(CONFIGS / MULTI_TEACHER / name)
    assert cfg.teacher.model == '' and cfg.distill.teacher_norm == 'standardize' and cfg.data.img_size == 224
    assert [(t.name, t.img_size, t.kd if t.kd is not None else True) for t in cfg.teachers] == \
        [(n, size, kd if kd is not None else True) for n, size, kd in teachers]
    for t in cfg.teachers:
        assert t.pretrained and timm.is_model(t.model.split('.')[0])
        patch = timm.create_model(t.model.split('.')[0], pretrained=False, num_classes=0, img_size=t.img_size or 224,
                                  depth=1).patch_embed.patch_size if t.img_size else None
        assert patch is None or (t.img_size % patch[0] == 0), (t.name, t.img_size, patch)
