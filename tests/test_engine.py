"""The training engine end to end on a tiny generated ImageFolder (CPU, fp32)."""
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from engine_fixtures import tiny_config
from scalekd.engine.run_folder.checkpoint import checkpoints_by_age, load_checkpoint
from scalekd.cli import main
from scalekd.engine.inputs.task_build import build_task
from scalekd.engine.inputs.config import load_config
from scalekd.tools.model_files import load_model
from scalekd.engine.inputs.weights import WeightsError
from scalekd.task.distiller import Distiller



@pytest.fixture(scope='module')
def trained(tmp_path_factory, data_root):
    tmp = tmp_path_factory.mktemp('trained')
    cfg = tiny_config(tmp, data_root)
    assert main(['train', str(cfg)]) == 0
    return tmp / 'run', cfg


def _records(run: Path):
    return [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]


def test_train_writes_checkpoints_metrics_tensorboard_and_config(trained):
    run, _ = trained
    assert {'checkpoint-0001.pth', 'checkpoint-0002.pth', 'best.pth', 'config.yaml', 'metrics.jsonl',
            'train.log'} <= set(os.listdir(run))
    assert any(f.startswith('events.out.tfevents') for f in os.listdir(run / 'tensorboard'))
    records = _records(run)
    epochs = [r for r in records if 'val_top1' in r]
    assert [r['epoch'] for r in epochs] == [1, 2]
    steps = [r for r in records if 'val_top1' not in r]
    assert steps[0]['step'] == 1 and {'loss', 'task_loss', 'kd_loss', 'proxy_ori', 's4_alt', 'lr'} <= set(steps[0])
    state = load_checkpoint(run / 'checkpoint-0002.pth')
    assert {'student', 'task_state', 'optimizer', 'scaler', 'ema', 'rng', 'config', 'progress',
            'format_version'} <= set(state)
    assert state['progress']['epoch'] == 2 and state['progress']['step'] == 6
    assert not any(k.startswith('student.') for k in state['task_state']['distill'])
    log = (run / 'train.log').read_text()
    assert 'params: student' in log and 'tap s4' in log and 'best top-1' in log


def test_eval_reproduces_logged_top1_and_export_loads_in_timm(trained, data_root, tmp_path, capsys):
    run, cfg_path = trained
    best = max((r for r in _records(run) if 'val_top1' in r), key=lambda r: r['val_top1'])
    assert main(['eval', str(run / 'best.pth'), '--data', str(data_root / 'val'), '--workers', '0', '--json']) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics['top1'] == pytest.approx(best['val_top1']) and metrics['count'] == 12

    assert main(['export', str(run / 'best.pth'), '--out', str(tmp_path / 'export')]) == 0
    assert 'exported student to' in capsys.readouterr().out
    weights = tmp_path / 'export' / 'model.safetensors'
    cfg = load_config(cfg_path)
    model = timm.create_model('resnet18', pretrained=True, pretrained_cfg_overlay=dict(file=str(weights), num_classes=3),
                              num_classes=3, layers=[1, 1, 1, 1]).eval()
    trained_student = load_model(run / 'best.pth').model
    x = torch.randn(2, 3, cfg.data.img_size, cfg.data.img_size)
    torch.testing.assert_close(model(x), trained_student.eval()(x))
    assert main(['eval', str(tmp_path / 'export'), '--data', str(data_root / 'val'), '--workers', '0', '--json']) == 0
    assert json.loads(capsys.readouterr().out)['top1'] == pytest.approx(best['val_top1'])


def test_existing_output_is_refused_and_nothing_half_written(trained, data_root, tmp_path, capsys):
    run, cfg_path = trained
    assert main(['train', str(cfg_path)]) == 2
    assert 'already holds a run; pass --resume auto' in capsys.readouterr().err
    # a bad model name fails before the output folder exists
    cfg = tiny_config(tmp_path, data_root, student=dict(model='resnet_18'))
    assert main(['train', str(cfg)]) == 2
    assert "unknown student model 'resnet_18'" in capsys.readouterr().err
    assert not (tmp_path / 'run').exists()
    cfg = tiny_config(tmp_path, tmp_path / 'nowhere')
    assert main(['train', str(cfg)]) == 2
    assert 'nowhere/train does not exist' in capsys.readouterr().err
    assert not (tmp_path / 'run').exists()


def _train_cmd(cfg, *extra):
    return [sys.executable, '-m', 'scalekd.cli', 'train', str(cfg), *extra]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(trained, data_root, tmp_path):
    run, _ = trained
    cfg = tiny_config(tmp_path, data_root)
    proc = subprocess.Popen(_train_cmd(cfg), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = tmp_path / 'run' / 'checkpoint-0001.pth'
    while proc.poll() is None and not first.exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists() and not (tmp_path / 'run' / 'checkpoint-0002.pth').exists()
    assert main(['train', str(cfg), '--resume', 'auto']) == 0
    resumed = load_checkpoint(tmp_path / 'run' / 'checkpoint-0002.pth')
    straight = load_checkpoint(run / 'checkpoint-0002.pth')
    for key, value in straight['student'].items():
        assert torch.equal(value, resumed['student'][key]), key
    for key, value in straight['task_state']['distill'].items():
        assert torch.equal(value, resumed['task_state']['distill'][key]), key
    assert resumed['optimizer']['param_groups'] == straight['optimizer']['param_groups']  # lr of the schedule too


@pytest.mark.slow
def test_torchrun_two_processes_match_single_process_at_step_1(data_root, tmp_path):
    # no BatchNorm anywhere (ConvNeXt student -> LayerNorm CAP) and deterministic crops, so the
    # 2 x 4 split of the global batch of 8 must give the single-process loss
    sections = dict(student=dict(model='convnext_tiny', kwargs=dict(depths=[1, 1, 1, 1], dims=[16, 32, 64, 128])),
                    data=dict(scale=[1.0, 1.0], ratio=[1.0, 1.0], hflip=0.0),
                    sched=dict(epochs=1))
    (tmp_path / 'single').mkdir()
    single = tiny_config(tmp_path / 'single', data_root, output=str(tmp_path / 'single' / 'run'), **sections)
    assert main(['train', str(single)]) == 0
    (tmp_path / 'ddp').mkdir()
    ddp = tiny_config(tmp_path / 'ddp', data_root, output=str(tmp_path / 'ddp' / 'run'), **sections)
    env = dict(os.environ, OMP_NUM_THREADS='1')
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
                             '--master_port', '29517', '-m', 'scalekd.cli', 'train', str(ddp)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = _records(tmp_path / 'single' / 'run'), _records(tmp_path / 'ddp' / 'run')
    for key in ('loss', 'task_loss', 'kd_loss', 'proxy_ori', 'proxy_alt', 's4_ori', 's4_alt'):
        assert two[0][key] == pytest.approx(one[0][key], rel=1e-4), key
    assert two[-1]['val_count'] == one[-1]['val_count'] == 12  # every val image counted once over 2 ranks


@pytest.mark.slow
def test_teacher_checkpoint_loading(data_root, tmp_path):
    cfg_path = tiny_config(tmp_path, data_root)
    cfg = load_config(cfg_path)
    teacher = build_task(cfg, torch.device('cpu')).teacher.model
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    save_file(state, str(tmp_path / 'teacher.safetensors'))
    torch.save({'state_dict': state}, tmp_path / 'teacher.pth')
    for name in ('teacher.safetensors', 'teacher.pth'):
        cfg = load_config(cfg_path, [f'teacher.checkpoint={tmp_path / name}'])
        loaded = build_task(cfg, torch.device('cpu')).teacher.model
        assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    bad = dict(state)
    bad.pop('head.weight')
    bad['extra.weight'] = torch.zeros(1)
    save_file(bad, str(tmp_path / 'bad.safetensors'))
    cfg = load_config(cfg_path, [f'teacher.checkpoint={tmp_path / "bad.safetensors"}'])
    with pytest.raises(WeightsError, match=r'missing keys: head.weight; unexpected keys: extra.weight'):
        build_task(cfg, torch.device('cpu'))


def test_dry_run_writes_nothing(data_root, tmp_path, capsys):
    cfg = tiny_config(tmp_path, tmp_path / 'no-data-needed')
    assert main(['train', str(cfg), '--dry-run']) == 0
    report = json.loads(capsys.readouterr().out)
    assert report['finite'] and {'proxy_ori', 's4_alt', 'kd_loss'} <= set(report['losses'])
    assert not (tmp_path / 'run').exists()


@pytest.mark.slow
def test_ema_accumulation_and_speed_switches(data_root, tmp_path, capsys):
    cfg = tiny_config(tmp_path, data_root, train=dict(batch_size=8, accum_steps=2, ema=True, ema_decay=0.5,
                                                      channels_last=True), sched=dict(epochs=1))
    assert main(['train', str(cfg)]) == 0
    state = load_checkpoint(tmp_path / 'run' / 'checkpoint-0001.pth')
    assert state['progress']['step'] == 3  # 24 images = 6 micro-batches of 4 = 3 updates of 2
    assert state['ema'] is not None and any(not torch.equal(state['ema'][k], state['student'][k])
                                            for k in state['student'] if state['student'][k].is_floating_point())
    epoch = _records(tmp_path / 'run')[-1]
    assert 'ema_top1' in epoch and 'val_top1' in epoch
    assert main(['export', str(tmp_path / 'run' / 'checkpoint-0001.pth'), '--out', str(tmp_path / 'ema')]) == 0
    assert 'exported EMA student' in capsys.readouterr().out
    # bf16 autocast with channels_last runs a full ScaleKD step (slow without AMX, so a dry run only)
    (tmp_path / 'bf16').mkdir()
    report_cfg = tiny_config(tmp_path / 'bf16', data_root, train=dict(precision='bf16', channels_last=True))
    assert main(['train', str(report_cfg), '--dry-run']) == 0
    report = json.loads(capsys.readouterr().out)
    assert report['precision'] == 'bf16' and report['finite']


def test_no_weight_decay_on_norms_biases_and_embeddings(data_root, tmp_path):
    from timm.optim import create_optimizer_v2
    cfg = load_config(tiny_config(tmp_path, data_root, student=dict(
        model='vit_tiny_patch16_224', kwargs=dict(patch_size=8, embed_dim=64, depth=2, num_heads=2))))
    task = build_task(cfg, torch.device('cpu'))
    optimizer = create_optimizer_v2(task.trainable_module, opt='adamw', lr=1e-3, weight_decay=0.05)
    names = {id(p): n for n, p in task.trainable_module.named_parameters()}
    no_decay = {names[id(p)] for g in optimizer.param_groups if g['weight_decay'] == 0 for p in g['params']}
    decay = {names[id(p)] for g in optimizer.param_groups if g['weight_decay'] > 0 for p in g['params']}
    assert {'student.pos_embed', 'student.cls_token', 'student.norm.weight', 'student.blocks.0.attn.qkv.bias',
            'branches.teacher.s4.projectors.ori.pos_embed', 'branches.teacher.s4.projectors.ori.norm.weight'} <= no_decay
    assert {'student.blocks.0.attn.qkv.weight', 'branches.teacher.s4.projectors.ori.student_conv.weight'} <= decay


def test_a_mixed_precision_run_says_its_val_top1_is_not_eval_s(data_root, tmp_path):
    cfg = tiny_config(tmp_path, data_root, train=dict(precision='bf16'), sched=dict(epochs=1),
                      data=dict(train_subset=8, val_subset=3))
    assert main(['train', str(cfg)]) == 0
    log = (tmp_path / 'run' / 'train.log').read_text()
    assert 'val top-1 is measured under bf16 autocast; scalekd eval measures in fp32' in log
    (tmp_path / 'fp32').mkdir()
    fp32 = tiny_config(tmp_path / 'fp32', data_root, sched=dict(epochs=1), data=dict(train_subset=8, val_subset=3))
    assert main(['train', str(fp32)]) == 0
    assert 'autocast' not in (tmp_path / 'fp32' / 'run' / 'train.log').read_text()


# -- accumulation windows: 3 updates of 2 micro-batches of 4 images an epoch -------------------------
@contextmanager
def _nan_at_the_fourth_forward():
    """The 4th training forward (the second window's second micro-batch) has a NaN loss; yields the
    student's bn1 statistics as they were when that window began."""
    forward, calls, window_start = Distiller.forward, [0], {}

    def poisoned(self, input, target):
        calls[0] += 1
        if calls[0] == 3:
            window_start.update({k: v.clone() for k, v in self.student.bn1.state_dict().items()})
        out = forward(self, input, target)
        return dict(out, loss=out['loss'] * float('nan')) if calls[0] == 4 else out
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Distiller, 'forward', poisoned)
        yield window_start


@pytest.fixture(scope='module')
def accumulated_with_a_skip(tmp_path_factory, data_root):
    """One epoch at ``accum_steps: 2`` with a checkpoint after every update; its second window skipped."""
    tmp = tmp_path_factory.mktemp('accumulated')
    cfg = tiny_config(tmp, data_root, sched=dict(epochs=1),
                      train=dict(accum_steps=2, max_nan_skips=1, checkpoint_every_steps=1, keep_checkpoints=0))
    with _nan_at_the_fourth_forward():
        assert main(['train', str(cfg)]) == 0
    return tmp / 'run'


@pytest.mark.slow
def test_checkpoints_are_named_by_updates_not_micro_batches(accumulated_with_a_skip):
    run = accumulated_with_a_skip
    assert [p.name for p in checkpoints_by_age(run)] == ['checkpoint-0000-000001.pth', 'checkpoint-0000-000002.pth',
                                                         'checkpoint-0001.pth']
    progress = load_checkpoint(run / 'checkpoint-0000-000002.pth')['progress']
    assert (progress['updates'], progress['step'], progress['nan_skips']) == (2, 2, 1)  # the skipped one counts


def test_a_skipped_window_leaves_none_of_its_micro_batches_in_the_norm_statistics(accumulated_with_a_skip):
    student = load_checkpoint(accumulated_with_a_skip / 'checkpoint-0001.pth')['student']
    assert int(student['bn1.num_batches_tracked']) == 4  # 6 micro-batches, the skipped window's 2 not counted


def test_a_stop_in_an_accumulation_window_saves_the_norm_statistics_from_before_it(data_root, tmp_path, capsys):
    cfg = tiny_config(tmp_path, data_root, sched=dict(epochs=1), train=dict(accum_steps=2))
    with _nan_at_the_fourth_forward() as window_start:
        assert main(['train', str(cfg)]) == 2
    assert 'non-finite loss at epoch 1, step 2 in term(s) loss' in capsys.readouterr().err
    state = load_checkpoint(tmp_path / 'run' / 'checkpoint-0000-000001.pth')
    assert (state['progress']['updates'], state['progress']['step']) == (1, 1)
    assert int(window_start['num_batches_tracked']) == 2
    for key, value in window_start.items():
        assert torch.equal(state['student'][f'bn1.{key}'], value), key
