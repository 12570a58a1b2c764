"""The paper's teacher and student families, at tiny sizes: the core guarantees of the distiller."""
import pytest
import torch

from scalekd import build_distiller
from scalekd.adapters import ScaleKDTeacher
from tiny_models import NUM_CLASSES, STUDENTS, TEACHERS, make_student, make_teacher, teacher_img


def _build(teacher: str, student: str, **options):
    img = teacher_img(teacher)
    return build_distiller(make_teacher(teacher, img), make_student(student, img), img_size=img, **options), img


# each student with the ViT teacher (the fast set, -m "not slow"), each teacher with a CNN and a Swin student
PAIRS = [pytest.param(t, s, marks=() if t == 'vit' else pytest.mark.slow) for s in STUDENTS for t in sorted(TEACHERS)
         if t == 'vit' or s in ('resnet', 'swin')]


@pytest.mark.parametrize('teacher, student', PAIRS)
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
    proxy_params = list(distiller.branches()['teacher'].proxy.parameters())
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
    proxy = distiller.branches()['teacher'].proxy.mimicking
    proxy_grad = sum(p.grad.abs().sum().item() for p in proxy.parameters() if p.grad is not None)
    return proxy_grad


@pytest.mark.parametrize('teacher,student', [pytest.param('swin', 'resnet', marks=pytest.mark.slow),
                                             pytest.param('eva02', 'vit', marks=pytest.mark.slow), ('beit', 'mixer')])
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


@pytest.mark.parametrize('family', ['vit', 'mixer'])
@pytest.mark.parametrize('depth, block', [(2, 1), (3, 2), (4, 3), (8, 6), (12, 9), (24, 18)])
def test_plain_student_s3_is_the_block_three_quarters_deep(family, depth, block):
    """s3 of a ViT / Mixer student: the output of block round(3/4 depth) (1-based; at least 1, before
    the last), e.g. block 9 of 12 as in the paper, read from the block itself by a hook."""
    import timm
    from timm.models.mlp_mixer import MlpMixer
    from scalekd.adapters import StudentAdapter
    if family == 'vit':
        model = timm.create_model('vit_tiny_patch16_224', img_size=16, patch_size=8, embed_dim=16, depth=depth,
                                  num_heads=2, num_classes=3)
    else:
        model = MlpMixer(img_size=16, patch_size=8, embed_dim=16, num_blocks=depth, num_classes=3)
    adapter = StudentAdapter(model.eval(), (16, 16))
    assert adapter.s3_index == block - 1
    seen = {}
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, o)) for k, b in enumerate(model.blocks)]
    with torch.no_grad():
        _, s3, _ = adapter(model, torch.randn(2, 3, 16, 16))
    for h in hooks:
        h.remove()
    tokens = seen[block - 1][:, getattr(model, 'num_prefix_tokens', 0):]  # (N, 4, C): a 2 x 2 grid
    torch.testing.assert_close(s3, tokens.transpose(1, 2).reshape(2, 16, 2, 2), rtol=0, atol=0)
    assert not torch.equal(s3, seen[block - 2 if block > 1 else block][:, -4:].transpose(1, 2).reshape(2, 16, 2, 2))
