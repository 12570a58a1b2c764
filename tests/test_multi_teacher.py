"""Several teachers at once: each with its own branch of projectors, size, weight, kd and tpp."""
import copy

import pytest
import timm
import torch

from scalekd import build_distiller
from scalekd.method.errors import UserError
from scalekd.method.options import ablation
from scalekd.method.teacher_norm import FeatureStandardizer
from scalekd.task.builder import TeacherSpec
from scalekd.task.report import tap_rows, teacher_rows
from tiny_models import IMG, NUM_CLASSES, make_student, make_teacher

X = torch.randn(4, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
Y = torch.tensor([0, 1, 2, 3])


def _copy_branch(one, several, name):
    several.branches()[name].load_state_dict(one.branches()['teacher'].state_dict())


def _grads(distiller, loss):
    distiller.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in distiller.student.named_parameters() if p.grad is not None}


def test_a_second_teacher_of_weight_0_gives_the_one_teacher_loss_and_gradients():
    """The second teacher (a Swin-free other ViT, weight 0) adds terms of weight 0 and no share of the KD
    target: loss, every term of the first teacher and the student's gradients are the one-teacher ones."""
    torch.manual_seed(0)
    teacher, other, student = make_teacher('vit', IMG), make_teacher('deit', IMG), make_student('resnet', IMG)
    one = build_distiller(teacher, copy.deepcopy(student), img_size=IMG)
    two = build_distiller([TeacherSpec(teacher, name='a'), TeacherSpec(other, name='b', weight=0.0)],
                          copy.deepcopy(student), img_size=IMG)
    _copy_branch(one, two, 'a')
    a, b = one(X, Y), two(X, Y)
    assert {k for k in b if k.startswith('b/')} == {'b/proxy_ori', 'b/proxy_alt', 'b/s4_ori', 'b/s4_alt'}
    assert b['b/s4_ori'].item() > 0  # the second teacher's terms exist, weighted 0
    torch.testing.assert_close(b['loss'], a['loss'], rtol=0, atol=1e-6)
    for term in ('task_loss', 'kd_loss'):
        torch.testing.assert_close(b[term], a[term], rtol=0, atol=1e-6)
    for term in ('proxy_ori', 'proxy_alt', 's4_ori', 's4_alt'):
        torch.testing.assert_close(b[f'a/{term}'], a[term], rtol=0, atol=1e-6)
    ga, gb = _grads(one, a['loss']), _grads(two, b['loss'])
    assert ga.keys() == gb.keys()
    for name, grad in ga.items():
        torch.testing.assert_close(gb[name], grad, rtol=0, atol=1e-6)


def test_two_copies_of_a_teacher_at_half_weight_give_the_one_teacher_loss():
    torch.manual_seed(0)
    teacher, student = make_teacher('vit', IMG), make_student('resnet', IMG)
    one = build_distiller(teacher, copy.deepcopy(student), img_size=IMG)
    two = build_distiller([TeacherSpec(teacher, name='a', weight=0.5), TeacherSpec(copy.deepcopy(teacher), name='b',
                                                                                  weight=0.5)],
                          copy.deepcopy(student), img_size=IMG)
    _copy_branch(one, two, 'a')
    _copy_branch(one, two, 'b')
    a, b = one(X, Y), two(X, Y)
    torch.testing.assert_close(b['loss'], a['loss'], rtol=0, atol=1e-6)
    torch.testing.assert_close(b['kd_loss'], a['kd_loss'], rtol=0, atol=1e-6)
    ga, gb = _grads(one, a['loss']), _grads(two, b['loss'])
    for name, grad in ga.items():
        torch.testing.assert_close(gb[name], grad, rtol=0, atol=1e-6)
    assert two.loss_weights(['a/s4_ori', 'b/proxy_alt']) == pytest.approx({'a/s4_ori': 0.04, 'b/proxy_alt': 0.03})


def test_the_kd_target_is_the_weighted_mean_of_the_labelled_teachers_distributions():
    torch.manual_seed(0)
    t1, t2, student = make_teacher('vit', IMG), make_teacher('deit', IMG), make_student('resnet', IMG)
    two = build_distiller([TeacherSpec(t1, name='a', weight=3.0), TeacherSpec(t2, name='b', weight=1.0)], student,
                          img_size=IMG, method='kd', kd_temperature=2.0)
    out = two(X, Y)
    with torch.no_grad():
        q = 0.75 * torch.softmax(t1(two.teacher_input('a', X)) / 2, -1) + \
            0.25 * torch.softmax(t2(two.teacher_input('b', X)) / 2, -1)
        expected = -(q * torch.log_softmax(out['output'] / 2, -1)).sum(-1).mean() * 4
    torch.testing.assert_close(out['kd_loss'], expected, rtol=1e-5, atol=1e-6)
    assert set(out) == {'loss', 'output', 'task_loss', 'kd_loss'}


def test_a_teacher_at_twice_the_resolution_gets_its_own_grid_and_every_teacher_trains_the_stem():
    """The student at 32 px; teacher 'big' sees the images resized to 64 px (an 8x8 grid of 8-px patches),
    'small' at 32 px (4x4): each CAP targets its own teacher's grid, and each teacher's terms alone reach
    the student's stem."""
    torch.manual_seed(0)
    big = make_teacher('vit', 2 * IMG)
    small = make_teacher('vit', IMG)
    two = build_distiller([TeacherSpec(big, name='big', img_size=2 * IMG), TeacherSpec(small, name='small')],
                          make_student('resnet', IMG), img_size=IMG)
    targets = {(r['teacher'], r['name']): r['target_shape'] for r in tap_rows(two)}
    assert targets[('big', 's4')] == [64, 8, 8] and targets[('small', 's4')] == [64, 4, 4]
    rows = {r['name']: r for r in teacher_rows(two)}
    assert rows['big']['img_size'] == [64, 64] and rows['small']['img_size'] == [32, 32]
    resized = two.teacher_input('big', X)
    assert resized.shape[-2:] == (64, 64)
    out = two(X, Y)
    stem = two.student.conv1.weight
    for name in ('big', 'small'):
        terms = sum(v for k, v in out.items() if k.startswith(f'{name}/'))
        grad, = torch.autograd.grad(terms, stem, retain_graph=True)
        assert grad.abs().sum() > 0, name


def test_standardize_gives_a_teacher_scaled_per_channel_the_terms_of_the_unscaled_one():
    """Teacher B's final map is teacher A's times a per-channel scale of 1 to 100, plus an offset: with
    teacher_norm standardize both give the same s4 terms from the same projectors; without, they differ."""
    torch.manual_seed(0)
    teacher, student = make_teacher('vit', IMG), make_student('resnet', IMG)
    feats = build_distiller(teacher, copy.deepcopy(student), img_size=IMG).teacher_features(X)['teacher']
    channels = feats.final.shape[1]
    scaled = copy.copy(feats)
    scaled.final = feats.final * torch.logspace(0, 2, channels).view(1, -1, 1, 1) + \
        torch.linspace(-50, 50, channels).view(1, -1, 1, 1)
    for norm, same in (('standardize', True), ('none', False)):
        terms = []
        for f in (feats, scaled):
            torch.manual_seed(0)  # the same projectors for both teachers
            distiller = build_distiller(copy.deepcopy(teacher), copy.deepcopy(student), img_size=IMG,
                                        teacher_norm=norm, teacher_norm_batches=1, **ablation('cap_dfm'))
            terms.append(distiller.trainable_module(X, {'teacher': f})[1])  # observes its own target first
        for name in ('s4_ori', 's4_alt'):
            close = torch.allclose(terms[0][name], terms[1][name], rtol=1e-4, atol=1e-5)
            assert close == same, (norm, name, terms[0][name], terms[1][name])


def test_the_standardisation_statistics_are_frozen_after_their_batches_and_kept_in_the_task_state():
    norm = FeatureStandardizer(3, batches=2)
    a = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    b = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(1)) * 5 + 2
    for batch in (a, b, b * 100):  # the third is not observed: frozen after two
        norm.observe(batch)
    both = torch.cat([a, b])
    mean, std = norm.stats()
    torch.testing.assert_close(mean.flatten(), both.mean((0, 2, 3)).double())
    torch.testing.assert_close(std.flatten(), both.std((0, 2, 3), unbiased=False).double())
    assert norm.frozen and int(norm.seen) == 2

    torch.manual_seed(0)
    distiller = build_distiller(make_teacher('vit', IMG), make_student('resnet', IMG), img_size=IMG,
                                teacher_norm='standardize', teacher_norm_batches=2)
    for _ in range(3):
        distiller(X, Y)
    state = distiller.get_task_state()['distill']
    assert int(state['branches.teacher.norms.final.seen']) == 2
    fresh = build_distiller(make_teacher('vit', IMG), make_student('resnet', IMG), img_size=IMG,
                            teacher_norm='standardize', teacher_norm_batches=2)
    fresh.load_task_state({'distill': state})
    assert torch.equal(fresh.branches()['teacher'].norms['final'].total, state['branches.teacher.norms.final.total'])


def test_a_task_state_of_the_one_teacher_layout_loads_into_its_branch():
    torch.manual_seed(0)
    distiller = build_distiller(make_teacher('vit', IMG), make_student('resnet', IMG), img_size=IMG)
    state = distiller.get_task_state()['distill']
    legacy = {k.removeprefix('branches.teacher.'): v for k, v in state.items()}
    assert 's4.projectors.ori.query_embed' in legacy or 's4.projectors.ori.pos_embed' in legacy
    torch.manual_seed(1)
    other = build_distiller(make_teacher('vit', IMG), make_student('resnet', IMG), img_size=IMG)
    other.load_task_state({'distill': legacy})
    for key, value in other.get_task_state()['distill'].items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize('specs, match', [
    (lambda t, h: [TeacherSpec(t, name='a'), TeacherSpec(h, name='a')], r"teacher name 'a' is given to more than one"),
    (lambda t, h: [], r'the list of teachers is empty'),
    (lambda t, h: [TeacherSpec(t, name='a'), TeacherSpec(h, name='dino', kd=True)],
     r"logit KD cannot be used: teacher 'dino': the teacher .* has no classifier"),
    (lambda t, h: [TeacherSpec(t, name='a'), TeacherSpec(t, name='odd', img_size=36)],
     r"image size 36 is not a multiple of the teacher .* patch size 8: .* \(the img_size of teacher 'odd': use 32 or 40\)"),
    (lambda t, h: [TeacherSpec(t, name='a', weight=-1.0)], r"teacher 'a': weight must be a finite number >= 0"),
])
def test_bad_teachers_are_refused_in_one_line_naming_them(specs, match):
    torch.manual_seed(0)
    teacher = make_teacher('vit', IMG)
    headless = timm.create_model('vit_tiny_patch16_224', img_size=IMG, num_classes=0, patch_size=8, embed_dim=64,
                                 depth=4, num_heads=2)
    with pytest.raises(UserError, match=match) as info:
        build_distiller(specs(teacher, headless), make_student('resnet', IMG), img_size=IMG, num_classes=NUM_CLASSES)
    assert '\n' not in str(info.value)


def test_a_headless_teacher_teaches_features_beside_a_labelled_one():
    torch.manual_seed(0)
    headless = timm.create_model('vit_tiny_patch16_224', img_size=IMG, num_classes=0, patch_size=8, embed_dim=64,
                                 depth=4, num_heads=2)
    two = build_distiller([TeacherSpec(make_teacher('vit', IMG), name='labelled'),
                           TeacherSpec(headless, name='dino', kd=False)], make_student('resnet', IMG), img_size=IMG)
    assert two.kd_teachers == ['labelled']
    out = two(X, Y)
    assert {'kd_loss', 'labelled/s4_ori', 'dino/s4_ori', 'dino/proxy_alt'} <= set(out)
    assert all(torch.isfinite(v).all() for k, v in out.items() if k != 'output')


def test_compile_and_the_teacher_precision_apply_to_every_teacher():
    torch.manual_seed(0)
    two = build_distiller([TeacherSpec(make_teacher('vit', IMG), name='a'), TeacherSpec(make_teacher('deit', IMG), name='b')],
                          make_student('resnet', IMG), img_size=IMG, teacher_dtype=torch.bfloat16)
    feats = two.teacher_features(X)
    for name, teacher in two.teachers.items():
        with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
            expected = teacher.extract(two.teacher_input(name, X))
        assert feats[name].final.dtype == torch.float32
        torch.testing.assert_close(feats[name].final, expected.final.float(), rtol=0, atol=0)
    module = two.compile(backend='eager')
    for name, teacher in two.teachers.items():
        assert hasattr(teacher.extract, '_torchdynamo_orig_callable'), name
        assert all(hasattr(getattr(module.branches[name], piece), '_torchdynamo_orig_callable')
                   for piece in ('proxy_views', 's4_views', 'tap_losses')), name
    assert torch.isfinite(two(X, Y)['loss'])
