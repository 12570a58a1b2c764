"""``train.eval_terms``: each evaluation logs every loss term over the validation images, and changes nothing."""
import math

import pytest
import torch

from engine_fixtures import tiny_config
from run_tools import epoch_lines
from scalekd.cli import main
from scalekd.engine.inputs.config import load_config
from scalekd.engine.inputs.data import build_datasets
from scalekd.engine.inputs.task_build import build_task, normalization_from_config
from scalekd.engine.run_folder.checkpoint import load_checkpoint

DETERMINISTIC = dict(precision='fp32', deterministic=True)


@pytest.fixture(scope='module')
def runs(tmp_path_factory, data_root):
    """The same tiny ScaleKD run with and without ``eval_terms`` (teacher-norm statistics on: they must not
    see the validation images), at 64 px: a 2x2 student map at s4 (at 1x1 the DC-free view is rounding noise)."""
    out = {}
    for terms in (False, True):
        tmp = tmp_path_factory.mktemp(f'terms_{terms}')
        cfg = tiny_config(tmp, data_root, train=dict(DETERMINISTIC, eval_terms=terms),
                          distill=dict(method='scalekd', teacher_norm='standardize', teacher_norm_batches=4),
                          data=dict(img_size=64))
        assert main(['train', str(cfg)]) == 0
        out[terms] = tmp / 'run', cfg
    return out


def test_every_term_is_logged_for_the_validation_images(runs):
    run, _ = runs[True]
    for line in epoch_lines(run):
        train = {k[len('train_'):] for k in line if k.startswith('train_')} - {'img_per_s', 'peak_mem_mb', 'loss'}
        assert train == {'task_loss', 'kd_loss', 'proxy_ori', 'proxy_alt', 's4_ori', 's4_alt'}
        assert {f'val_{t}' for t in train} | {'val_total_loss'} <= set(line)
    assert not any(k.startswith('val_s4') for line in epoch_lines(runs[False][0]) for k in line)


def test_the_logged_terms_are_the_final_models_terms_image_by_image(runs):
    """Recomputed one image at a time from the last checkpoint (the student, projectors and statistics)."""
    run, cfg_path = runs[True]
    cfg = load_config(cfg_path)
    task = build_task(cfg, torch.device('cpu'), random_weights=True)
    state = load_checkpoint(sorted(run.glob('checkpoint-*.pth'))[-1])
    task.student.load_state_dict(state['student'])
    task.load_task_state(state['task_state'])
    task.eval()
    val = build_datasets(cfg.data, *normalization_from_config(cfg)).val
    sums = {}
    with torch.no_grad():
        for image, target in val:
            terms = task(image[None], torch.tensor([target]))
            for name, value in terms.items():
                if name != 'output':
                    sums[name] = sums.get(name, 0.0) + float(value)
    logged = epoch_lines(run)[-1]
    assert logged['val_count'] == len(val) == 12
    for name, total in sums.items():
        key = 'val_total_loss' if name == 'loss' else f'val_{name}'
        assert logged[key] == pytest.approx(total / len(val), rel=1e-4, abs=1e-6), name


def test_evaluating_the_terms_changes_nothing_of_the_run(runs):
    """Same training losses, validation top-1 and final weights (teacher-norm statistics included)."""
    (plain, _), (terms, _) = runs[False], runs[True]
    for a, b in zip(epoch_lines(plain), epoch_lines(terms), strict=True):
        for key in ('train_loss', 'train_s4_ori', 'val_top1', 'val_loss'):
            assert a[key] == b[key], key
    a, b = (load_checkpoint(sorted(r.glob('checkpoint-*.pth'))[-1]) for r in (plain, terms))
    for part in ('student', 'task_state'):
        flat_a, flat_b = _flat(a[part]), _flat(b[part])
        assert flat_a.keys() == flat_b.keys()
        for key in flat_a:
            assert torch.equal(flat_a[key], flat_b[key]), key
    assert any('norms' in k for k in _flat(a['task_state']))


def _flat(state, prefix=''):
    out = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out.update(_flat(value, f'{prefix}{key}.'))
        else:
            out[f'{prefix}{key}'] = value
    return out


@pytest.mark.slow
def test_two_processes_one_without_validation_images_log_the_others_terms(data_root, tmp_path):
    """One validation image on two processes: rank 1's shard is empty. The terms' evaluation runs no
    collective per batch (DDP's forward would sync buffers), and the ranks agree on the terms' names."""
    from run_tools import finish, start_torchrun
    cfg = tiny_config(tmp_path, data_root, data=dict(img_size=64, val_subset=1),
                      train=dict(eval_terms=True, dist_timeout_s=60), sched=dict(epochs=1))
    finish(start_torchrun(cfg, port=29763), timeout=300)
    line = epoch_lines(tmp_path / 'run')[-1]
    assert line['val_count'] == 1
    assert all(math.isfinite(line[f'val_{t}']) for t in ('task_loss', 'kd_loss', 's4_ori', 's4_alt', 'proxy_ori',
                                                         'total_loss'))


def test_a_mixup_run_logs_its_task_loss_on_the_labels(data_root, tmp_path):
    """Mixup trains on class distributions (timm's SoftTargetCrossEntropy); on the validation labels the
    task term is then the plain cross entropy of the student, which evaluation logs as val_loss."""
    cfg = tiny_config(tmp_path, data_root, data=dict(img_size=64, mixup=0.2, val_batch_size=5),
                      train=dict(DETERMINISTIC, eval_terms=True), sched=dict(epochs=1))
    assert main(['train', str(cfg)]) == 0
    line = epoch_lines(tmp_path / 'run')[-1]
    assert line['val_task_loss'] == pytest.approx(line['val_loss'], rel=1e-5)
