"""Faults of the core: checkpointed BatchNorm statistics, loss-term names, task-state mismatches,
stale teacher block inputs and the relabelling of probe errors."""
import pytest
import timm
import torch
import torch.nn as nn

import scalekd.adapters.common as common
import scalekd.adapters.last_stage as last_stage
import scalekd.adapters.student as student_adapter
import scalekd.adapters.teacher as teacher_adapter
from scalekd import ScaleKDTeacher, StudentAdapter, UnsupportedModelError, build_distiller
from scalekd.adapters.common import map_to_tokens
from scalekd.task.distiller import TaskStateMismatchError
from tiny_models import IMG, NUM_CLASSES, make_student, make_teacher

X, Y = torch.randn(2, 3, IMG, IMG), torch.tensor([3, 4])


def _distiller(method='scalekd', student='resnet', **options):
    return build_distiller(make_teacher('vit', IMG), make_student(student, IMG), method, img_size=IMG, **options)


def _norm_buffers(distiller):
    return {f'{n}.{b}': t for n, m in distiller.distill_modules().named_modules()
            if isinstance(m, nn.modules.batchnorm._NormBase) for b, t in m.named_buffers(recurse=False)}


def _step(distiller):
    distiller.train()
    torch.manual_seed(1)
    distiller(X, Y)['loss'].backward()
    return {n: p.grad for n, p in distiller.trainable_module.named_parameters()}


def test_activation_checkpointing_updates_projector_norm_statistics_once():
    plain = _distiller()
    checkpointed = _distiller(activation_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    grads, ckpt_grads = _step(plain), _step(checkpointed)
    buffers, ckpt_buffers = _norm_buffers(plain), _norm_buffers(checkpointed)
    tracked = [n for n in buffers if n.endswith('num_batches_tracked')]
    assert len(tracked) == 4 and all(buffers[n].item() == 1 for n in tracked)
    assert set(buffers) == set(ckpt_buffers)
    for name, value in buffers.items():
        torch.testing.assert_close(ckpt_buffers[name], value, rtol=0, atol=0, msg=name)
    assert set(grads) == set(ckpt_grads)
    for name, grad in grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, msg=name)


def test_loss_weights_refuse_unknown_terms():
    distiller = _distiller()
    assert distiller.loss_weights(['task_loss', 'kd_loss', 'proxy_ori', 'proxy_alt', 's4_ori', 's4_alt']) == \
        pytest.approx(dict(task_loss=0.5, kd_loss=0.5, proxy_ori=0.08, proxy_alt=0.06, s4_ori=0.08, s4_alt=0.06))
    for term in ('s3_ori', 's4_typo', 'feature_loss'):
        with pytest.raises(ValueError, match=rf"unknown loss term '{term}'.*known terms.*proxy_alt.*s4_ori"):
            distiller.loss_weights(['task_loss', term])
    with pytest.raises(ValueError, match="unknown loss term 's4_alt'"):
        _distiller(views='single').loss_weights(['s4_alt'])
    assert _distiller('fd', stages=['s3', 's4']).loss_weights(['s3_ori']) == {'s3_ori': 0.08}


def test_mismatched_task_state_is_a_user_error_naming_the_keys():
    state = _distiller().get_task_state()
    with pytest.raises(TaskStateMismatchError, match='distillation state does not match') as info:
        _distiller('fd', stages=['s3', 's4']).load_task_state(state)
    missing, unexpected = str(info.value).split('unexpected')
    assert "'branches.teacher.s3.projectors.ori.proj.weight'" in missing and '.proxy.' not in missing
    assert "'branches.teacher.proxy.mimicking.projectors.alt.query_embed'" in unexpected and '.s3.' not in unexpected


def _beit_teacher():
    return timm.create_model('beit_base_patch16_224', img_size=IMG, num_classes=NUM_CLASSES, patch_size=8, embed_dim=32,
                             depth=4, num_heads=2, use_shared_rel_pos_bias=True, use_rel_pos_bias=False)


def test_teacher_last_stage_uses_the_shared_bias_of_weights_loaded_after_build():
    distiller = build_distiller(_beit_teacher(), make_student('resnet', IMG), img_size=IMG)
    teacher = distiller.teacher
    with pytest.raises(RuntimeError, match=r'call extract\(\) first'):
        teacher.last_stage(torch.zeros(1, *teacher.stage_input_shape), torch.zeros(1, 1, teacher.stage_input_shape[0]))
    model = teacher.model
    state = model.state_dict()
    table = state['rel_pos_bias.relative_position_bias_table']
    state['rel_pos_bias.relative_position_bias_table'] = torch.randn_like(table)
    model.load_state_dict(state)
    feats = teacher.extract(teacher.normalize_input(X, distiller.student_mean, distiller.student_std))

    with torch.no_grad():
        bias = model.rel_pos_bias()
        tokens = torch.cat([feats.prefix, map_to_tokens(feats.stage_input)], dim=1)
        for blk in model.blocks[teacher.stage.stage_start:]:
            tokens = blk(tokens, shared_rel_pos_bias=bias)
        expected = model.fc_norm(tokens[:, 1:]).transpose(1, 2).reshape(feats.final.shape)
        torch.testing.assert_close(teacher.last_stage(feats.stage_input, feats.prefix), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(expected, feats.final, rtol=0, atol=1e-5)
    out = distiller(X, Y)
    assert torch.isfinite(out['loss'])


def test_teacher_blocks_with_extra_positional_inputs_are_refused():
    class TakesABias(nn.Module):
        def __init__(self, blk: nn.Module):
            super().__init__()
            self.blk = blk

        def forward(self, x: torch.Tensor, bias: float = 0.0) -> torch.Tensor:
            return self.blk(x) + bias

    model = make_teacher('vit', IMG)
    model.blocks[-1] = TakesABias(model.blocks[-1])
    model.blocks[-1].register_forward_pre_hook(lambda m, args: (args[0], 0.0))  # timm passing a positional input
    with pytest.raises(UnsupportedModelError, match='its blocks take extra positional inputs'):
        ScaleKDTeacher(model, (IMG, IMG))


@pytest.mark.parametrize('role', ['teacher', 'student'])
def test_a_model_that_cannot_run_at_the_size_is_unsupported(role):
    if role == 'teacher':
        with pytest.raises(UnsupportedModelError, match=r'^teacher vit_tiny_patch16_224 \(VisionTransformer\) '
                                                        r'cannot run at 48x48: Input height \(48\)') as info:
            ScaleKDTeacher(make_teacher('vit', IMG), (48, 48))
    else:
        with pytest.raises(UnsupportedModelError, match=r'^student vit_tiny_patch16_224 \(VisionTransformer\) '
                                                        r'cannot run at 48x48: Input height \(48\)') as info:
            StudentAdapter(make_student('vit', IMG), (48, 48))
    assert info.value.__cause__ is None


def _innermost(excinfo) -> str:
    return excinfo.traceback[-1].name


def test_bugs_in_our_own_adapter_code_are_not_relabelled(monkeypatch):
    monkeypatch.setattr(student_adapter, 'tokens_to_map',
                        lambda tokens, grid, num_prefix=0: common.tokens_to_map(tokens, None, num_prefix))
    with pytest.raises(TypeError, match='not subscriptable') as info:
        StudentAdapter(make_student('vit', IMG), (IMG, IMG))
    assert _innermost(info) == 'tokens_to_map'

    monkeypatch.setattr(teacher_adapter, 'dummy_input',
                        lambda model, size, chans: common.dummy_input(model, (-1, -1), chans))
    with pytest.raises(RuntimeError, match='must be non-negative') as info:
        ScaleKDTeacher(make_teacher('vit', IMG), (IMG, IMG))
    assert _innermost(info) == 'dummy_input'


def test_deliberate_errors_of_our_own_code_propagate_unchanged(monkeypatch):
    monkeypatch.setattr(last_stage, 'tokens_to_map',
                        lambda tokens, grid: common.tokens_to_map(tokens, (grid[0], grid[1] + 1)))
    with pytest.raises(ValueError, match=r'^16 patch tokens do not fill a 4x5 grid$') as info:
        ScaleKDTeacher(make_teacher('vit', IMG), (IMG, IMG))
    assert type(info.value) is ValueError
