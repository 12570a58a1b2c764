"""``ScaleKDLoss`` on features computed outside the package equals the Distiller on the same inputs."""
import pytest
import torch

from scalekd import ScaleKDLoss, build_distiller
from tiny_models import IMG, NUM_CLASSES, make_student, make_teacher


def _pair(student_family: str = 'resnet', **options):
    """A distiller, and a ScaleKDLoss with the same teacher and the distiller's projector weights."""
    teacher, student = make_teacher('vit', IMG), make_student(student_family, IMG)
    distiller = build_distiller(teacher, student, img_size=IMG, **options)
    taps = distiller.taps.taps
    mean, std = distiller.student_mean.flatten().tolist(), distiller.student_std.flatten().tolist()  # the images' own
    loss_fn = ScaleKDLoss(teacher, taps.s3, taps.s4, num_classes=NUM_CLASSES, img_size=IMG, input_mean=mean,
                          input_std=std, **options)
    loss_fn.distiller.load_task_state(distiller.get_task_state())
    return distiller, loss_fn


@pytest.mark.parametrize('student_family,options', [('resnet', {}), ('vit', {}), ('resnet', dict(tpp=False, adaptive_queries=False, kd=False)),
                                                    ('resnet', dict(method='fd'))])
def test_the_loss_and_its_gradients_equal_the_distillers(student_family, options):
    distiller, loss_fn = _pair(student_family, **options)
    images, targets = torch.randn(4, 3, IMG, IMG), torch.randint(0, NUM_CLASSES, (4,))
    expected = distiller(images, targets)
    expected['loss'].backward()
    student = distiller.student
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    projector_grads = {n: p.grad.clone() for n, p in distiller.distill_modules().named_parameters()}
    student.zero_grad()

    logits, s3, s4 = distiller.taps(student, images)  # the features a user's own code computes
    got = loss_fn(images, s3, s4, logits, targets)
    assert set(got) == set(expected) - {'output'}
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-6, msg=name)
    got['loss'].backward()
    assert grads and set(grads) == {n for n, p in student.named_parameters() if p.grad is not None}
    for name, grad in grads.items():
        torch.testing.assert_close(student.get_parameter(name).grad, grad, rtol=1e-5, atol=1e-6, msg=name)
    trained = dict(loss_fn.projectors.named_parameters())
    assert set(trained) == set(projector_grads)
    for name, grad in projector_grads.items():
        torch.testing.assert_close(trained[name].grad, grad, rtol=1e-5, atol=1e-6, msg=name)


def test_the_teacher_is_frozen_and_not_among_the_trained_parameters():
    _, loss_fn = _pair()
    teacher = {id(p) for p in loss_fn.distiller.teacher.model.parameters()}
    assert teacher and not any(p.requires_grad for p in loss_fn.distiller.teacher.model.parameters())
    assert not teacher & {id(p) for p in loss_fn.projectors.parameters()}


def test_features_only_without_logits():
    _, loss_fn = _pair(kd=False)
    distiller = build_distiller(make_teacher('vit', IMG), make_student('resnet', IMG), img_size=IMG, kd=False)
    _, s3, s4 = distiller.taps(distiller.student, torch.randn(2, 3, IMG, IMG))
    out = loss_fn(torch.randn(2, 3, IMG, IMG), s3, s4)
    assert set(out) == {'loss', 'proxy_ori', 'proxy_alt', 's4_ori', 's4_alt'}
    assert torch.isclose(out['loss'], 0.08 * (out['proxy_ori'] + out['s4_ori']) + 0.06 * (out['proxy_alt'] + out['s4_alt']))


def test_wrong_shapes_and_missing_logits_are_named():
    _, loss_fn = _pair()
    s3_shape, s4_shape = loss_fn.slot.shapes
    images = torch.randn(2, 3, IMG, IMG)
    s3, s4 = torch.randn(2, *s3_shape), torch.randn(2, *s4_shape)
    with pytest.raises(ValueError, match=r's4 must be \(2, '):
        loss_fn(images, s3, s4[:, 1:], torch.randn(2, NUM_CLASSES))
    with pytest.raises(ValueError, match='needs the student logits'):
        loss_fn(images, s3, s4)
    with pytest.raises(ValueError, match="method 'fd' or 'scalekd'"):
        ScaleKDLoss(make_teacher('vit', IMG), s3_shape, s4_shape, img_size=IMG, method='kd')
