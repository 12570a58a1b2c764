"""Every teacher family x every student family, at tiny sizes: the core guarantees of the distiller."""
import pytest
import torch

from scalekd import build_distiller
from scalekd.adapters import ScaleKDTeacher
from tiny_models import NUM_CLASSES, STUDENTS, TEACHERS, make_student, make_teacher, teacher_img


def _build(teacher: str, student: str, **options):
    img = teacher_img(teacher)
    return build_distiller(make_teacher(teacher, img), make_student(student, img), img_size=img, **options), img


@pytest.mark.parametrize('teacher', sorted(TEACHERS))
@pytest.mark.parametrize('student', STUDENTS)
def test_pair_trains_with_frozen_teacher_and_clean_student(teacher, student):
    distiller, img = _build(teacher, student)
    distiller.train()
    x, y = torch.randn(2, 3, img, img), torch.tensor([1, 7])
    out = distiller(x, y)
    assert set(out) == {'loss', 'output', 'task_loss', 'kd_loss', 'proxy_ori', 'proxy_alt', 's4_ori', 's4_alt'}
    assert out['output'].shape == (2, NUM_CLASSES)
    for name, value in out.items():
        assert torch.isfinite(value).all(), name
    # the s4 losses alone reach the s3 (proxy) projectors and the student's first layer, through the
    # adaptive queries (not detached)
    proxy_params = list(distiller.trainable_module.proxy.parameters())
    stem = next(distiller.student.parameters())
    grads = torch.autograd.grad(out['s4_ori'] + out['s4_alt'], proxy_params + [stem], retain_graph=True,
                                allow_unused=True)
    assert sum(g.abs().sum().item() for g in grads[:-1] if g is not None) > 0
    assert grads[-1] is not None and grads[-1].abs().sum() > 0
    out['loss'].backward()

    teacher_module = distiller.teacher.model
    assert not distiller.teacher.training and not any(m.training for m in teacher_module.modules())
    assert all(not p.requires_grad and p.grad is None for p in teacher_module.parameters())
    assert distiller.student.training
    student_grads = [p.grad for p in distiller.student.parameters() if p.requires_grad]
    assert all(g is not None for g in student_grads[:3])

    plain = make_student(student, img)
    assert list(distiller.student.state_dict()) == list(plain.state_dict())


@pytest.mark.parametrize('teacher', sorted(TEACHERS))
def test_teacher_last_stage_reproduces_its_final_feature(teacher):
    img = teacher_img(teacher)
    adapter = ScaleKDTeacher(make_teacher(teacher, img), (img, img))
    feats = adapter.extract(torch.randn(3, 3, img, img))
    torch.testing.assert_close(adapter.last_stage(feats.stage_input, feats.prefix), feats.final, atol=1e-5, rtol=1e-5)
    # and for a stacked batch of two views of the same images (prefix tokens repeated)
    stacked = adapter.last_stage(torch.cat([feats.stage_input] * 2), feats.prefix)
    torch.testing.assert_close(stacked, torch.cat([feats.final] * 2), atol=1e-5, rtol=1e-5)


def _grads_of_s4_losses(distiller, img):
    out = distiller(torch.randn(2, 3, img, img), torch.tensor([0, 1]))
    (out['s4_ori'] + out['s4_alt']).backward()
    proxy = distiller.trainable_module.proxy.mimicking
    proxy_grad = sum(p.grad.abs().sum().item() for p in proxy.parameters() if p.grad is not None)
    return proxy_grad


@pytest.mark.parametrize('teacher,student', [('swin', 'resnet'), ('eva02', 'vit'), ('beit', 'mixer')])
def test_s4_losses_reach_s3_projectors_and_early_stages_through_adaptive_queries(teacher, student):
    distiller, img = _build(teacher, student)
    assert _grads_of_s4_losses(distiller, img) > 0
    stem = next(p for p in distiller.student.parameters())  # the student's first (early-stage) weight
    assert stem.grad is not None and stem.grad.abs().sum() > 0
    # without adaptive queries the s4 losses do not touch the proxy path
    distiller, img = _build(teacher, student, adaptive_queries=False)
    assert _grads_of_s4_losses(distiller, img) == 0


def test_teacher_stays_in_eval_after_train_unless_asked():
    distiller, _ = _build('vit', 'resnet')
    distiller.train()
    assert not distiller.teacher.training
    distiller, _ = _build('vit', 'resnet', teacher_train_mode=True)
    distiller.train()
    assert distiller.teacher.model.training
    distiller.eval()
    assert not distiller.teacher.model.training
