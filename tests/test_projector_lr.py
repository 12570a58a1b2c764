"""``distill.projector_lr_scale``: the projectors learn at a multiple of ``optim.lr``, the student at it."""
import math

import pytest
import torch

from engine_fixtures import tiny_config
from scalekd.cli import main
from scalekd.engine.errors import ConfigError
from scalekd.engine.inputs.config import load_config
from scalekd.engine.loop.run_parts import build_run_parts
from scalekd.engine.run_folder.checkpoint import load_checkpoint, save_checkpoint
from scalekd.engine.runtime.distributed import DistEnv

LR, SCALE = 0.05, 0.25


def _parts(tmp_path, data_root, scale: float, weight_decay: float = 0.0):
    """A tiny ScaleKD run's parts with plain SGD (timm's ``momentum`` at 0: ``p - lr * grad``)."""
    cfg = load_config(tiny_config(tmp_path, data_root, distill=dict(method='scalekd', projector_lr_scale=scale),
                                  optim=dict(opt='momentum', lr=LR, momentum=0.0, weight_decay=weight_decay,
                                             clip_grad=None),
                                  sched=dict(sched='cosine', epochs=2, warmup_epochs=0, min_lr=0.0)))
    torch.manual_seed(0)
    return build_run_parts(cfg, DistEnv(), 'fp32', cfg.train.batch_size, note=lambda line: None)


def test_one_sgd_step_moves_the_projectors_at_the_scaled_rate_and_the_student_at_optim_lr(data_root, tmp_path):
    parts = _parts(tmp_path, data_root, SCALE)
    module = parts.task.trainable_module
    torch.manual_seed(1)
    images, targets = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    parts.task(images, targets)['loss'].backward()
    before = {n: (p.detach().clone(), p.grad.clone()) for n, p in module.named_parameters() if p.grad is not None}
    parts.optimizer.step()
    projectors = [n for n in before if not n.startswith('student.')]
    assert projectors and len(projectors) < len(before)
    for name, p in module.named_parameters():
        if name in before:
            old, grad = before[name]
            rate = LR * (SCALE if name in projectors else 1.0)  # plain SGD: p - rate * grad
            torch.testing.assert_close(p.detach(), old - rate * grad, rtol=0, atol=1e-7, msg=name)


def test_the_scheduler_keeps_the_ratio_through_the_schedule(data_root, tmp_path):
    parts = _parts(tmp_path, data_root, SCALE, weight_decay=1e-4)
    total = parts.epochs * parts.updates_per_epoch
    parts.scheduler.step_update(total // 2)
    student = {id(p) for p in parts.task.student.parameters()}
    lrs = {(id(g['params'][0]) in student, g['weight_decay'] > 0): g['lr'] for g in parts.optimizer.param_groups}
    assert len(lrs) == 4 == len(parts.optimizer.param_groups)  # decay / no decay x student / projectors
    cosine = 0.5 * LR * (1 + math.cos(math.pi * (total // 2) / total))
    for decay in (True, False):
        assert lrs[True, decay] == pytest.approx(cosine, rel=1e-9)
        assert lrs[False, decay] == pytest.approx(SCALE * cosine, rel=1e-9)


def test_scale_one_keeps_timms_own_groups(data_root, tmp_path):
    """At 1 the optimizer is timm's (two weight-decay groups), so checkpoints keep their parameter indices."""
    parts = _parts(tmp_path, data_root, 1.0, weight_decay=1e-4)
    assert len(parts.optimizer.param_groups) == 2 and all('lr_scale' not in g for g in parts.optimizer.param_groups)


@pytest.mark.parametrize('distill, words', [
    (dict(method='scalekd', projector_lr_scale=0), 'projector_lr_scale must be > 0, got 0'),
    (dict(method='kd', projector_lr_scale=0.5), "projector_lr_scale needs a feature method (fd or scalekd): method 'kd'"),
])
def test_a_bad_scale_is_one_line_naming_it(data_root, tmp_path, distill, words):
    with pytest.raises(ConfigError, match='distill section') as e:
        load_config(tiny_config(tmp_path, data_root, distill=distill))
    assert words in str(e.value) and '\n' not in str(e.value)


def test_a_resume_that_changes_the_groups_is_refused_in_one_line(straight, data_root, tmp_path, capsys):
    run = tmp_path / 'run'
    run.mkdir()
    save_checkpoint(load_checkpoint(straight / 'checkpoint-0000-000001.pth'), run / 'checkpoint-0000-000001.pth')
    cfg = tiny_config(tmp_path, data_root, distill=dict(method='scalekd', projector_lr_scale=0.5))
    assert main(['train', str(cfg), '--resume', 'auto']) == 2
    err = capsys.readouterr().err
    assert 'was trained with distill.projector_lr_scale 1.0, this run asks for 0.5' in err
    assert len(err.strip().splitlines()) == 1
