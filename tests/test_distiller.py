"""Methods, ablation switches, loss weighting, task state, teacher precision, compilation and errors of the
distiller."""
import copy
import re
import shutil

import pytest
import torch
import torch.nn as nn

from scalekd import (ConvProjector, CrossAttentionProjector, DistillOptions, LinearProjector, ScaleKDTeacher,
                     StudentAdapter, UnknownModelError, UnsupportedModelError, build_distiller, remove_dc)
from scalekd.adapters import FAMILIES
from scalekd.method.errors import OptionError, UserError
from scalekd.method.mimicking import FeatureMimicking
from scalekd.method.options import ABLATIONS, ablation
from scalekd.method.views import build_views
from scalekd.task.distiller import TaskStateMismatchError
from tiny_models import IMG, NUM_CLASSES, make_student, make_teacher, teacher_img

X, Y = torch.randn(2, 3, IMG, IMG), torch.tensor([3, 4])


def _distiller(method='scalekd', student='resnet', **options):
    return build_distiller(make_teacher('vit', IMG), make_student(student, IMG), method, img_size=IMG, **options)


def _projectors(distiller):
    return [m for m in distiller.distill_modules().modules()
            if isinstance(m, (CrossAttentionProjector, LinearProjector, ConvProjector))]


# options -> (feature loss names, projector class, projector count): the ablation presets and the paper's other rows
DFM_TPP = {'proxy_ori', 'proxy_alt', 's4_ori', 's4_alt'}
ROWS = {
    'student': (ablation('student'), set(), None, 0),
    'kd': (ablation('kd'), set(), None, 0),
    'fd': (ablation('fd'), {'s4_ori'}, LinearProjector, 1),
    'fd_kd': (ablation('fd_kd'), {'s4_ori'}, LinearProjector, 1),
    'fd_s3_s4': (dict(ablation('fd'), stages=['s3', 's4']), {'s3_ori', 's4_ori'}, LinearProjector, 2),
    'projector_conv': (dict(ablation('fd'), projector='conv'), {'s4_ori'}, ConvProjector, 1),
    'cap': (ablation('cap'), {'s4_ori'}, CrossAttentionProjector, 1),
    'dual_path_cap': (dict(ablation('cap'), views='dual'), {'s4_ori', 's4_alt'}, CrossAttentionProjector, 2),
    'cap_dfm': (ablation('cap_dfm'), {'s4_ori', 's4_alt'}, CrossAttentionProjector, 2),
    'cap_tpp_proxy_only': (dict(ablation('cap_tpp'), adaptive_queries=False), {'proxy_ori', 's4_ori'},
                           CrossAttentionProjector, 2),
    'cap_tpp': (ablation('cap_tpp'), {'proxy_ori', 's4_ori'}, CrossAttentionProjector, 2),
    'cap_dfm_tpp': (ablation('cap_dfm_tpp'), DFM_TPP, CrossAttentionProjector, 4),
    'scalekd': (ablation('scalekd'), DFM_TPP, CrossAttentionProjector, 4),
    'dir_alt': (dict(original_view='dc'), DFM_TPP, CrossAttentionProjector, 4),
}


def test_every_ablation_preset_is_a_row():
    assert all(ROWS[name][0] == ablation(name) for name in ABLATIONS)
    with pytest.raises(OptionError, match="unknown ablation 'cap_kd'; choose one of student, kd"):
        ablation('cap_kd')


def test_switches_write_out_what_tells_the_presets_apart():
    switches = {name: DistillOptions.from_kwargs(**ablation(name)).switches() for name in ABLATIONS}
    assert switches['cap'] == dict(method='scalekd', projector='cap', stages=('s4',), views='single', tpp=False,
                                   adaptive_queries=False, kd=False)
    assert switches['scalekd'] == dict(method='scalekd', projector='cap', stages=('s3', 's4'), views='dfm', tpp=True,
                                       adaptive_queries=True, kd=True)
    assert len({tuple(s.items()) for s in switches.values()}) == len(ABLATIONS)


@pytest.mark.parametrize('row', sorted(ROWS))
def test_ablation_rows_build_what_they_say(row):
    options, feature_terms, projector_cls, count = ROWS[row]
    distiller = _distiller(**options)
    out = distiller(X, Y)
    kd = distiller.options.kd
    assert set(out) == {'loss', 'output', 'task_loss'} | ({'kd_loss'} if kd else set()) | feature_terms
    projectors = _projectors(distiller)
    assert len(projectors) == count and all(isinstance(p, projector_cls) for p in projectors)
    out['loss'].backward()
    # every trainable parameter is used (DDP needs no find_unused_parameters)
    unused = [n for n, p in distiller.trainable_module.named_parameters() if p.grad is None]
    assert unused == []


def test_total_is_the_release_weighting_of_eq5():
    out = _distiller()(X, Y)
    expected = (0.5 * out['task_loss'] + 0.5 * out['kd_loss'] + 0.08 * (out['proxy_ori'] + out['s4_ori'])
                + 0.06 * (out['proxy_alt'] + out['s4_alt']))
    torch.testing.assert_close(out['loss'], expected)
    out = _distiller('none')(X, Y)
    torch.testing.assert_close(out['loss'], out['task_loss'])
    out = _distiller('fd', w_ori=2.0)(X, Y)
    torch.testing.assert_close(out['loss'], out['task_loss'] + 2.0 * out['s4_ori'])


def test_alpha_beta_weights_are_the_paper_form():
    opts = DistillOptions(alpha=1.0, beta=0.6).resolve()
    assert (opts.w_ori, opts.w_alt) == pytest.approx((0.6, 0.4))
    opts = DistillOptions(alpha=0.1, beta=0.8).resolve()
    assert (opts.w_ori, opts.w_alt) == pytest.approx((0.08, 0.02))
    assert (DistillOptions().resolve().w_ori, DistillOptions().resolve().w_alt) == (0.08, 0.06)
    out = _distiller(alpha=1.0, beta=0.25, kd=False)(X, Y)
    expected = out['task_loss'] + 0.25 * (out['proxy_ori'] + out['s4_ori']) + 0.75 * (out['proxy_alt'] + out['s4_alt'])
    torch.testing.assert_close(out['loss'], expected)


def test_views_apply_phi_only_to_the_alternative_path():
    x, t = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    from scalekd import feature_distance as d
    dfm = FeatureMimicking(build_views('dfm'), nn.Identity)
    losses = dfm.losses(dfm.project(x), t, 's4')
    torch.testing.assert_close(losses['s4_ori'], d(x, t))
    torch.testing.assert_close(losses['s4_alt'], d(remove_dc(x), remove_dc(t)))
    dual = FeatureMimicking(build_views('dual'), nn.Identity)
    torch.testing.assert_close(dual.losses(dual.project(x), t, 's4')['s4_alt'], d(x, t))
    dir_alt = FeatureMimicking(build_views('dfm', original='dc'), nn.Identity)
    dc = dir_alt.losses(dir_alt.project(x), t, 's4')['s4_ori']
    torch.testing.assert_close(dc, d(x.mean((2, 3), keepdim=True), t.mean((2, 3), keepdim=True)) * 9)


@pytest.mark.parametrize('options,message', [
    (dict(projectr='cap'), 'unknown distillation option.*projectr.*valid options'),
    (dict(method='crd'), "unknown method 'crd'"),
    (dict(method='kd', tpp=True), r'tpp need a feature method'),
    (dict(tpp=False), 'adaptive_queries come from the TPP proxy path'),
    (dict(stages=['s4']), r'tpp uses both s3 \(proxy path\) and s4'),
    (dict(projector='linear'), "adaptive_queries need the cap projector, not 'linear'"),
    (dict(w_ori=0.1, beta=0.5), r'\(w_ori, w_alt\) or as \(alpha, beta\), not both'),
    (dict(beta=1.5), r'beta must be in \[0, 1\]'),
    (dict(w_ori=-0.1), r'loss weights must be >= 0 .*, got w_ori=-0.1'),
    (dict(alpha=-1.0, beta=0.5), r'got alpha=-1.0'),
    (dict(views='triple'), "unknown views 'triple'"),
    (dict(method='fd', stages=['s3']), 'stages must include s4'),
])
def test_bad_options_are_named(options, message):
    with pytest.raises(OptionError, match=message):
        DistillOptions.from_kwargs(**options).resolve()


@pytest.mark.parametrize('adaptive_queries', [True, False])
def test_the_s4_losses_train_the_proxy_path_through_its_queries_only_when_adaptive(adaptive_queries):
    """TPP: the proxy path's outputs are the s4 CAPs' queries, in the graph (not detached), so the s4
    losses train the proxy path's projectors; with learned queries they do not reach it."""
    distiller = _distiller(adaptive_queries=adaptive_queries)
    out = distiller(X, Y)
    proxy = list(distiller.branches()['teacher'].proxy.parameters())
    grads = torch.autograd.grad(out['s4_ori'] + out['s4_alt'], proxy, allow_unused=True)
    reached = sum(float(g.abs().sum()) for g in grads if g is not None)
    assert (reached > 0) == adaptive_queries


def test_task_state_holds_projectors_beside_a_clean_student():
    distiller = _distiller().eval()
    state = distiller.get_task_state()['distill']
    assert state and not any(k.startswith('student.') for k in state)
    assert distiller.get_eval_model() is distiller.student
    ckpt = distiller.get_checkpoint_state()
    assert set(ckpt['state_dict']) == set(distiller.student.state_dict())

    other = build_distiller(distiller.teacher.model, make_student('resnet', IMG), img_size=IMG).eval()
    other.student.load_state_dict(ckpt['state_dict'])
    other.load_task_state(ckpt['task_state'])
    a, b = distiller(X, Y), other(X, Y)
    for key in ('loss', 'proxy_ori', 's4_alt'):
        torch.testing.assert_close(a[key], b[key])
    with pytest.raises(TaskStateMismatchError, match='distillation state does not match'):
        _distiller(views='single').load_task_state(ckpt['task_state'])


def test_unsupported_models_are_named_with_what_is_missing():
    with pytest.raises(UnsupportedModelError, match=r'Sequential is not a supported ScaleKD student: it has no forward_intermediates'):
        build_distiller(make_teacher('vit', IMG), nn.Sequential(nn.Conv2d(3, 8, 3)), img_size=IMG)
    with pytest.raises(UnsupportedModelError, match=r'Sequential cannot be a ScaleKD teacher: it has no feature_info'):
        build_distiller(nn.Sequential(nn.Conv2d(3, 8, 3)), 'resnet18', img_size=IMG)
    with pytest.raises(UnknownModelError, match="unknown teacher model 'swin_lage_patch4_window7_224'.*did you mean "
                                                 'swin_large_patch4_window7_224'):
        build_distiller('swin_lage_patch4_window7_224', 'resnet18')


def test_beit_and_eva_are_plain_families_of_their_own():
    """The adapters read BEiT / EVA-02 like a ViT; no weight export knows their key layout."""
    classes = [c for f in FAMILIES for c in f.classes]
    assert len(classes) == len(set(classes))
    for name, family in (('beit', 'beit'), ('eva02', 'eva'), ('eva', 'vit')):  # EVA-L is a timm VisionTransformer
        teacher = ScaleKDTeacher(make_teacher(name, IMG), (IMG, IMG))
        assert teacher.family == family and teacher.stage.num_prefix_tokens == 1
    student = StudentAdapter(make_student('eva02', IMG), (IMG, IMG))
    assert (student.family, student.plain) == ('eva', True)
    assert not any(f.openmmlab or f.torchvision for f in FAMILIES if f.name in ('beit', 'eva'))


def test_tap_options_are_checked_against_the_models():
    with pytest.raises(OptionError, match='student_s3_block applies to plain students .* only; .* is hierarchical'):
        _distiller(student_s3_block=3)
    distiller = _distiller(student='vit', student_s3_block=2)
    assert distiller.taps.s3_index == 1
    with pytest.raises(OptionError, match=r'student_s3_block must be in \[1, 3\]'):
        _distiller(student='vit', student_s3_block=4)
    with pytest.raises(OptionError, match=r'teacher_last_blocks must be in \[1, 3\]'):
        _distiller(teacher_last_blocks=4)
    assert _distiller(teacher_last_blocks=2).teacher.stage.stage_start == 2


def test_kd_needs_matching_classes():
    with pytest.raises(OptionError, match='logit KD cannot be used: the teacher .* predicts 10 classes, the student 5'):
        build_distiller(make_teacher('vit', IMG), 'resnet18', 'kd', img_size=IMG, student_kwargs=dict(num_classes=5))


def test_method_none_needs_no_teacher():
    distiller = build_distiller(None, make_student('resnet', IMG), 'none', img_size=IMG)
    assert distiller.teacher is None and distiller(X, Y)['loss'].item() > 0


@pytest.mark.parametrize('name', ['mobilenetv3_small_050', 'regnetx_002', 'ghostnet_050'])
def test_student_alone_and_kd_take_a_classifier_of_any_family(name):
    """No feature tap is read for method none / kd; ScaleKD finds the taps from the model's intermediates."""
    teacher = make_teacher('vit', IMG)
    for method in ('none', 'kd'):
        task = build_distiller(teacher, name, method, img_size=IMG, num_classes=NUM_CLASSES)
        assert len(task.distill_modules()) == 0
        x, y = torch.randn(2, 3, IMG, IMG), torch.tensor([1, 7])
        out = task(x, y)
        out['loss'].backward()
        task.eval()
        assert torch.equal(task(x, y)['output'], task.student(x))  # the logits are the plain student's
        grads = [p.grad for p in task.student.parameters() if p.requires_grad]
        assert all(g is not None for g in grads) and torch.isfinite(out['loss'])
        assert set(out) == {'loss', 'output', 'task_loss'} | ({'kd_loss'} if method == 'kd' else set())
    task = build_distiller(teacher, name, 'scalekd', img_size=IMG, num_classes=NUM_CLASSES)  # taps from the model
    out = task(torch.randn(2, 3, IMG, IMG), torch.tensor([1, 7]))
    assert torch.isfinite(out['loss']) and out['s4_ori'].item() > 0


def test_a_1x1_student_map_is_warned_about_where_the_alternative_view_reads_it():
    teacher = make_teacher('vit', IMG)
    with pytest.warns(UserWarning, match=r'1x1 s4 map at this image size: its alternative \(DC-removed\) view is '
                                         r'zero, so s4_alt teach\(es\) nothing.*output_stride=16'):
        build_distiller(teacher, 'resnet18', img_size=IMG, num_classes=NUM_CLASSES)  # stride 32 at 32 px: 1x1
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        build_distiller(teacher, 'resnet18', img_size=IMG, num_classes=NUM_CLASSES, views='single')  # no alt view
        build_distiller(teacher, 'resnet18', img_size=IMG, num_classes=NUM_CLASSES,
                        student_kwargs=dict(output_stride=16))  # 2x2



@pytest.mark.parametrize('name', ['resnet18', 'convnext_atto', 'mobilenetv3_small_050'])
def test_logit_kd_takes_a_teacher_of_any_family(name):
    """KD reads the teacher's logits alone: a CNN teacher without a feature adapter teaches a ViT."""
    from scalekd.adapters.models import create_timm_model
    teacher = create_timm_model(name, (IMG, IMG), num_classes=NUM_CLASSES).eval()
    task = build_distiller(teacher, make_student('vit', IMG), 'kd', img_size=IMG)
    x, y = torch.randn(2, 3, IMG, IMG), torch.tensor([1, 7])
    out = task(x, y)
    mean, std = task.teacher.mean_kd, task.teacher.std_kd  # the teacher sees its own normalisation
    expected = teacher(((x * task.student_std + task.student_mean) - mean) / std)
    with torch.no_grad():  # the release's soft-target cross entropy at T = 1
        soft = -(torch.softmax(expected, -1) * torch.log_softmax(out['output'], -1)).sum(-1).mean()
    assert out['kd_loss'].item() == pytest.approx(soft.item(), rel=1e-5)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_the_reports_of_a_logit_kd_task_have_no_feature_rows():
    from scalekd.adapters.models import create_timm_model
    from scalekd.task.report import param_counts, tap_rows
    from scalekd.tools.inspection import inspect_distiller
    teacher = create_timm_model('resnet18', (IMG, IMG), num_classes=NUM_CLASSES)
    task = build_distiller(teacher, make_student('vit', IMG), 'kd', img_size=IMG)
    assert tap_rows(task) == []
    report = inspect_distiller(task)
    assert 'teacher_last_stage' not in report and report['train_step']['ok']
    assert report['params'] == param_counts(task) and report['params']['distill'] == 0


@pytest.mark.parametrize('teacher', ['vit', 'swin'])
def test_teacher_precision_runs_the_teacher_forward_alone_in_its_dtype(teacher):
    """teacher_dtype=bf16 in an fp32 step: the teacher's features are those of its forward under bf16
    autocast (computed here directly), handed on in float32; the student and projectors stay fp32.
    teacher_dtype=float32 under a bf16 step gives the plain fp32 features."""
    torch.manual_seed(0)
    distiller = build_distiller(make_teacher(teacher, IMG), make_student('resnet', IMG), img_size=IMG,
                                teacher_dtype=torch.bfloat16)
    images = distiller.teacher.normalize_input(X, distiller.student_mean, distiller.student_std)
    with torch.no_grad():
        fp32 = distiller.teacher.extract(images)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            bf16 = distiller.teacher.extract(images)
    got = distiller.teacher_features(X)['teacher']
    assert bf16.logits.dtype == torch.bfloat16  # (a map after a LayerNorm is float32 under autocast)
    for name in ('logits', 'final', 'stage_input'):
        assert getattr(got, name).dtype == torch.float32
        torch.testing.assert_close(getattr(got, name), getattr(bf16, name).float(), rtol=0, atol=0)
        assert not torch.allclose(getattr(got, name), getattr(fp32, name), rtol=1e-5, atol=1e-5), name
    out = distiller(X, Y)
    out['loss'].backward()
    assert out['loss'].dtype == torch.float32 and torch.isfinite(out['loss'])
    grads = [p.grad for p in distiller.trainable_module.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 for g in grads)

    distiller.teacher_dtype = torch.float32
    with torch.autocast('cpu', dtype=torch.bfloat16):
        kept = distiller.teacher_features(X)['teacher']
    for name in ('logits', 'final', 'stage_input'):
        torch.testing.assert_close(getattr(kept, name), getattr(fp32, name), rtol=0, atol=0)


def _twins(teacher: str):
    """Two equal distillers (seeded builds, same weights)."""
    img = teacher_img(teacher)
    twins = []
    for _ in range(2):
        torch.manual_seed(0)
        twins.append(build_distiller(make_teacher(teacher, img), make_student('resnet', img), img_size=img))
    return twins, torch.randn(2, 3, img, img)


def _assert_same_step(plain, compiled, images, rtol: float, atol: float) -> None:
    outputs = [d(images, Y) for d in (plain, compiled)]
    for out in outputs:
        out['loss'].backward()
    for name, value in outputs[0].items():
        torch.testing.assert_close(outputs[1][name], value, rtol=rtol, atol=atol, msg=name)
    grads = [{n: p.grad for n, p in d.trainable_module.named_parameters()} for d in (plain, compiled)]
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=rtol, atol=atol, msg=name)


@pytest.mark.slow
def test_compile_compiles_the_teacher_and_each_piece_and_keeps_weights_and_keys():
    """Distiller.compile (timm's TrainingTask protocol): the teacher's extraction and last stage and each
    piece of the trainable module are compiled (traced by dynamo: the eager backend keeps the test
    fast); the state dict's keys are unchanged and a step equals the uncompiled one."""
    (plain, compiled), images = _twins('vit')
    keys = list(compiled.state_dict())
    module = compiled.compile(backend='eager')
    assert module is compiled.trainable_module and list(compiled.state_dict()) == keys
    branch = module.branches['teacher']
    compiled_fns = [compiled.teacher.extract, compiled.teacher.last_stage, module.student_pass] + [
        getattr(branch, n) for n in ('proxy_views', 's4_views', 'tap_losses')]
    assert all(hasattr(fn, '_torchdynamo_orig_callable') for fn in compiled_fns)
    clone = copy.deepcopy(compiled)  # (timm's setup_ema copies the task's module): plain pieces, its own
    assert 'student_pass' not in vars(clone.trainable_module)
    assert not {'proxy_views', 's4_views', 'tap_losses'} & set(vars(clone.trainable_module.branches['teacher']))
    assert not {'extract', 'last_stage'} & set(vars(clone.teacher))
    _assert_same_step(plain, compiled, images, rtol=0, atol=0)
    plain.zero_grad(set_to_none=True)
    _assert_same_step(plain, clone, images, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which('c++') or shutil.which('g++')), reason='inductor on CPU needs a C++ compiler')
def test_inductor_compiled_teacher_gives_the_eager_step():
    """train.compile's default backend on CPU for the teacher (a Swin teacher, whose last stage the proxy
    path replays and differentiates): losses and gradients of one step equal the uncompiled step's up
    to float rounding. The trainable pieces are traced as in the test above (inductor on all of them
    takes minutes on 2 cores)."""
    (plain, compiled), images = _twins('swin')
    compiled.compile(backend='eager')
    compiled.teacher.compile()
    _assert_same_step(plain, compiled, images, rtol=1e-4, atol=1e-5)


def test_one_image_with_a_one_by_one_map_names_the_batch_and_the_map():
    """The tiny ResNet's s4 map is 1x1 at 32 px: one image per step leaves its BatchNorm layers one value
    per channel; the error says so and what to change, instead of torch's bare message."""
    distiller = _distiller()
    with pytest.raises(UserError, match=r'one value per channel: 1 image\(s\) per step and process with a 1x1 map'):
        distiller(X[:1], Y[:1])
    assert torch.isfinite(distiller(X, Y)['loss'])


@pytest.mark.parametrize('teacher', ['vit', 'swin', 'beit', 'eva02'])
def test_a_teacher_whose_replayed_last_stage_is_wrong_is_refused(teacher, monkeypatch):
    """The teacher adapter replays its last stage on the stage input of its own forward at build time:
    every family passes as it is; with its final norm left out of the replay (a broken adapter) it is
    refused, naming the check."""
    img = teacher_img(teacher)
    ScaleKDTeacher(make_teacher(teacher, img), (img, img))
    replay = ScaleKDTeacher.last_stage

    def without_final_norm(self, x, prefix=None):
        owner, name = (self.stage, 'patch_norm') if isinstance(self.model.norm, nn.Identity) else (self.model, 'norm')
        norm = getattr(owner, name)
        setattr(owner, name, nn.Identity())
        try:
            return replay(self, x, prefix)
        finally:
            setattr(owner, name, norm)
    monkeypatch.setattr(ScaleKDTeacher, 'last_stage', without_final_norm)
    with pytest.raises(UnsupportedModelError, match="replayed on the recorded stage input, does not give the teacher's "
                                                    "own final feature"):
        ScaleKDTeacher(make_teacher(teacher, img), (img, img))


@pytest.mark.parametrize('teacher_classes, cause', [
    (0, "the teacher vit_tiny_patch16_224 (VisionTransformer) has no classifier (num_classes 0"),
    (7, f'the teacher vit_tiny_patch16_224 (VisionTransformer) predicts 7 classes, the student {NUM_CLASSES}')])
def test_a_teacher_without_the_students_classes_trains_features_only(teacher_classes, cause):
    """A headless teacher (DINOv2, EVA-02 MIM, a CLIP image tower) or one of other classes: logit KD is
    refused with the cause and the feature-only option, which then trains every feature term."""
    import timm
    name, kwargs = 'vit_tiny_patch16_224', dict(patch_size=8, embed_dim=64, depth=4, num_heads=2)
    teacher = timm.create_model(name, img_size=IMG, num_classes=teacher_classes, **kwargs)
    with pytest.raises(OptionError, match=re.escape(f'logit KD cannot be used: {cause}') + r'.*distill\.kd: false'):
        build_distiller(teacher, make_student('resnet', IMG), img_size=IMG)
    distiller = build_distiller(teacher, make_student('resnet', IMG), img_size=IMG, kd=False)
    out = distiller(X, Y)
    assert set(out) == {'loss', 'output', 'task_loss'} | DFM_TPP and torch.isfinite(out['loss'])


def test_a_pretrained_teacher_keeps_its_own_classifier(tmp_path):
    """Hub or file weights of a headless teacher (DINOv2, EVA-02 MIM) are loaded as they are: no random head
    is made for the student's classes (logit KD would teach noise), so KD is refused with the cause."""
    import timm
    from safetensors.torch import save_file
    name, kwargs = 'vit_tiny_patch16_224', dict(patch_size=8, embed_dim=64, depth=4, num_heads=2)
    path = tmp_path / 'headless.safetensors'
    save_file(timm.create_model(name, img_size=IMG, num_classes=0, **kwargs).state_dict(), str(path))
    weights = dict(kwargs, pretrained_cfg_overlay=dict(file=str(path), num_classes=0))
    with pytest.raises(OptionError, match=r'logit KD cannot be used: the teacher .* has no classifier'):
        build_distiller(name, make_student('resnet', IMG), img_size=IMG, num_classes=NUM_CLASSES,
                        teacher_pretrained=True, teacher_kwargs=weights)
    task = build_distiller(name, make_student('resnet', IMG), img_size=IMG, num_classes=NUM_CLASSES, kd=False,
                           teacher_pretrained=True, teacher_kwargs=weights)
    assert task.teacher.model.num_classes == 0 and torch.isfinite(task(X, Y)['loss'])
