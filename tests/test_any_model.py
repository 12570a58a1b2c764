"""Any timm model as a student or a teacher: the general adapters, on a fixed sample of the model matrix."""
import pytest
import timm
import torch

from scalekd import ScaleKDTeacher, StudentAdapter, UnsupportedModelError, build_distiller
from scalekd.method.errors import OptionError, UserError
from scalekd.tools.matrix import CI_SAMPLE, REPRESENTATIVES, format_matrix, run_matrix

IMG = 64


def _model(name: str, **kwargs):
    return timm.create_model(name, num_classes=10, **kwargs)


@pytest.mark.parametrize('role, module', [(role, m) for role, modules in CI_SAMPLE.items() for m in modules])
def test_matrix_sample_trains(role, module):
    """One representative per module: as a student, a finite training step with the ViT and the Swin teacher;
    as a teacher, with a ResNet student; the loss reaching the student's first weight."""
    (row,) = run_matrix((role,), [module])
    assert (row.module, row.model, row.role) == (module, REPRESENTATIVES[module], role)
    assert row.works and row.img == 64, row.results
    assert [p for p, _ in row.results] == (['vit', 'swin'] if role == 'student' else ['resnet'])
    table = format_matrix([row])
    assert f'### As a {role} (1 of 1 modules work)' in table and f'| {module} | {REPRESENTATIVES[module]} | 64 |' in table


def test_a_refused_model_is_a_row_with_its_reason():
    (row,) = run_matrix(('teacher',), ['twins'])
    assert not row.works
    assert row.results == (('resnet', "twins_svt_small (Twins): its feature_info names 'block.3' as the last "
                                      "stage, which is not one of its modules"),)
    with pytest.raises(UserError, match="unknown timm model module\\(s\\) resnett"):
        run_matrix(('student',), ['resnett'])


@pytest.mark.parametrize('name, s3, s4', [
    ('resnet18', (256, 4, 4), (512, 2, 2)),                    # previous stage; forward_features is s4
    ('efficientnet_b0', (112, 4, 4), (1280, 2, 2)),            # s4 after conv_head, s3 the stride-16 stage
    ('swinv2_cr_tiny_ns_224', (384, 4, 4), (768, 2, 2)),       # NHWC final feature read as a map
    ('gmlp_ti16_224', (128, 4, 4), (128, 4, 4)),               # plain: s3 three quarters deep
])
def test_student_taps_come_from_the_models_own_intermediates(name, s3, s4):
    kwargs = dict(img_size=IMG) if timm.models.get_pretrained_cfg_value(name, 'fixed_input_size') else {}
    model = _model(name, **kwargs)
    taps = StudentAdapter(model, (IMG, IMG))
    assert (taps.taps.s3, taps.taps.s4) == (s3, s4)
    x = torch.randn(2, 3, IMG, IMG)
    model.eval()
    logits, s3_map, s4_map = taps(model, x)
    torch.testing.assert_close(logits, model(x))  # the taps come from the classifier's own forward
    if taps.s4_layout in ('NCHW', 'NHWC'):
        final = model.forward_features(x)
        torch.testing.assert_close(s4_map, final.permute(0, 3, 1, 2) if taps.s4_layout == 'NHWC' else final)


def test_plain_students_take_the_s3_block_option_and_hierarchical_ones_refuse_it():
    model = _model('gmlp_ti16_224', img_size=IMG)
    assert StudentAdapter(model, (IMG, IMG), s3_block=2).s3_index == 1
    with pytest.raises(OptionError, match=r'student_s3_block applies to plain students .* regnetx_002'):
        StudentAdapter(_model('regnetx_002'), (IMG, IMG), s3_block=2)


@pytest.mark.parametrize('name, tail', [('swinv2_tiny_window8_256', ['norm']), ('efficientnet_b0', ['conv_head', 'bn2']),
                                        ('maxvit_rmlp_pico_rw_256', ['norm']), ('convnext_atto', ['norm_pre'])])
def test_a_teacher_whose_replayed_last_stage_is_wrong_is_refused(name, tail):
    """The general rule (last feature_info module + what forward_features runs after it) replays each
    teacher's final feature; with the modules after the last stage left out it is refused."""
    kwargs = dict(img_size=IMG) if timm.models.get_pretrained_cfg_value(name, 'fixed_input_size') else {}
    teacher = ScaleKDTeacher(_model(name, **kwargs), (IMG, IMG))
    assert teacher.stage.tail == tail
    feats = teacher.extract(torch.randn(2, 3, IMG, IMG))
    torch.testing.assert_close(teacher.last_stage(feats.stage_input), feats.final, rtol=1e-5, atol=1e-5)
    if name.startswith(('convnext', 'swinv2')):
        return  # an identity norm_pre; a final norm of a map that its last (post-norm) block normalised already
    original = ScaleKDTeacher.__init__

    def without_tail(self, *args, **kw):
        from scalekd.adapters import last_stage
        trace = last_stage.ModuleStage._trace
        last_stage.ModuleStage._trace = lambda stage, model, x: (trace(stage, model, x)[0], [])
        try:
            original(self, *args, **kw)
        finally:
            last_stage.ModuleStage._trace = trace
    ScaleKDTeacher.__init__ = without_tail
    try:
        with pytest.raises(UnsupportedModelError, match="replayed on the recorded stage input, does not give"):
            ScaleKDTeacher(_model(name, **kwargs), (IMG, IMG))
    finally:
        ScaleKDTeacher.__init__ = original


@pytest.mark.parametrize('teacher, student', [('swinv2_tiny_window8_256', 'mobilenetv3_small_050'),
                                              ('convnext_atto', 'regnetx_002')])
def test_s4_losses_reach_the_proxy_projectors_and_the_stem_for_new_pairs(teacher, student):
    kwargs = dict(img_size=IMG) if timm.models.get_pretrained_cfg_value(teacher, 'fixed_input_size') else {}
    task = build_distiller(_model(teacher, **kwargs), _model(student), img_size=IMG)
    out = task(torch.randn(2, 3, IMG, IMG), torch.tensor([0, 1]))
    (out['s4_ori'] + out['s4_alt']).backward()
    proxy = task.branches()['teacher'].proxy.mimicking
    assert sum(p.grad.abs().sum().item() for p in proxy.parameters() if p.grad is not None) > 0
    stem = next(task.student.parameters())
    assert stem.grad is not None and stem.grad.abs().sum() > 0


def test_matrix_command_prints_and_writes_the_table(tmp_path, capsys):
    from scalekd.cli import main
    out = tmp_path / 'matrix.md'
    assert main(['matrix', '--role', 'teacher', '--modules', 'regnet', '--output', str(out)]) == 0
    printed = capsys.readouterr()
    assert out.read_text() in printed.out and '| regnet | regnetx_002 | 64 | works |' in out.read_text()
    assert 'teacher regnet (regnetx_002, 64 px' in printed.err
    assert main(['matrix', '--modules', 'regnett']) == 2
    assert 'unknown timm model module(s) regnett' in capsys.readouterr().err


@pytest.mark.parametrize('name', ['vit_small_patch14_reg4_dinov2', 'vit_base_patch16_clip_224',
                                  'vit_base_patch16_siglip_224', 'eva02_tiny_patch14_224'])
def test_headless_vit_teachers_train_feature_only(name):
    """DINOv2 (4 registers: 5 prefix tokens), CLIP, SigLIP (attention-pool head) and EVA-02 (rotary)
    towers without a classifier: feature-only ScaleKD takes a finite step; logit KD is refused."""
    teacher = _model(name, img_size=IMG, patch_size=8, embed_dim=64, depth=4, num_heads=2)
    teacher.reset_classifier(0)
    with pytest.raises(OptionError, match='has no classifier'):
        build_distiller(teacher, _model('resnet18'), img_size=IMG)
    task = build_distiller(teacher, _model('resnet18'), img_size=IMG, kd=False)
    out = task(torch.randn(2, 3, IMG, IMG), torch.tensor([0, 1]))
    assert 'kd_loss' not in out and torch.isfinite(out['loss']) and out['proxy_alt'] > 0
    assert task.teacher.stage.num_prefix_tokens == getattr(teacher, 'num_prefix_tokens')


def _teacher_at(name: str) -> ScaleKDTeacher:
    return ScaleKDTeacher(_model(name, img_size=IMG), (IMG, IMG))


@pytest.mark.parametrize('name, family, grid', [('hiera_tiny_224', 'hiera', 4), ('mvitv2_tiny', 'mvitv2', 4),
                                                ('mvitv2_small_cls', 'mvitv2', 4)])
def test_hiera_and_mvitv2_teachers_replay_their_last_stage(name, family, grid):
    """Hiera (unrolled tokens) and MViTv2 (stages called with the grid size; a class token in the _cls
    variant) replay their final feature from the stage input, differentiably."""
    teacher = _teacher_at(name)
    assert teacher.family == family and teacher.stage_input_shape == (384, grid, grid)
    feats = teacher.extract(torch.randn(2, 3, IMG, IMG))
    assert feats.final.shape == (2, 768, grid // 2, grid // 2) and (feats.prefix is not None) == name.endswith('_cls')
    stage_input = feats.stage_input.clone().requires_grad_()
    replay = teacher.last_stage(stage_input, feats.prefix)
    torch.testing.assert_close(replay, feats.final, rtol=1e-5, atol=1e-5)
    replay.square().sum().backward()
    assert stage_input.grad.abs().sum() > 0


def test_hiera_fed_raster_order_tokens_and_mvitv2_without_its_final_norm_are_refused(monkeypatch):
    """The replay check catches a wrong token order (Hiera's tokens taken in raster order) and a missing
    module after the last stage (MViTv2's final norm)."""
    from scalekd.adapters.token_stages import SizedStage, UnrolledStage
    order = UnrolledStage._order

    def raster_order(self, *args):
        grid, to_raster, _ = order(self, *args)
        return grid, to_raster, torch.arange(len(to_raster))
    monkeypatch.setattr(UnrolledStage, '_order', raster_order)
    replay = SizedStage.replay

    def without_final_norm(self, model, x, prefix):
        norm, model.norm = model.norm, torch.nn.Identity()
        try:
            return replay(self, model, x, prefix)
        finally:
            model.norm = norm
    monkeypatch.setattr(SizedStage, 'replay', without_final_norm)
    for name in ('hiera_tiny_224', 'mvitv2_tiny'):
        with pytest.raises(UnsupportedModelError, match="replayed on the recorded stage input, does not give"):
            _teacher_at(name)


@pytest.mark.parametrize('name, stage', [('hiera_tiny_224', 'blocks.10'), ('mvitv2_tiny', 'stages.3'),
                                         ('resnet18', 'layer4')])
def test_a_teacher_whose_forward_features_skips_its_last_stage_is_refused_naming_it(name, stage):
    """Each rule (Hiera's, MViTv2's and the general one) names the stage that forward_features never ran."""
    kwargs = dict(img_size=IMG) if not name.startswith('resnet') else {}
    model = _model(name, **kwargs)
    stem = model.patch_embed if hasattr(model, 'patch_embed') else model.conv1
    model.forward_features = lambda x: stem(x)  # stops after the stem: the last stage never runs
    with pytest.raises(UnsupportedModelError, match=rf'forward_features does not run its last stage \({stage}\)'):
        ScaleKDTeacher(model, (IMG, IMG))
