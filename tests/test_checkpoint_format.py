"""Checkpoints outlive releases: a checkpoint of the first format (scalekd 0.1.0, commit b6babac,
before versioning) is evaluated, exported and resumed by today's code, forever."""
import json
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file

from engine_fixtures import make_image_folder
from scalekd.engine.run_folder.checkpoint import FORMAT_VERSION, CheckpointError, migrate, read_training_checkpoint, save_checkpoint
from scalekd.cli import main

FIXTURE = Path(__file__).parent / 'fixtures' / 'checkpoint_format1.pth'
# printed by `scalekd eval FIXTURE --data <val> --json` at b6babac, on make_image_folder(train 4, val 2, 32 px)
EVAL_AT_B6BABAC = dict(top1=33.33333206176758, top5=100.0, loss=1.0857972304026287, count=6)


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('fixture_data'), train_per_class=4, val_per_class=2)


def test_the_fixture_is_of_the_first_format():
    raw = torch.load(FIXTURE, weights_only=True)
    assert 'format_version' not in raw and 'seen' in raw['progress']


def test_a_format_1_checkpoint_evaluates_as_it_did(images, capsys):
    assert main(['eval', str(FIXTURE), '--data', str(images / 'val'), '--json', '--workers', '0',
                 '--device', 'cpu']) == 0
    got = json.loads(capsys.readouterr().out)
    assert got['count'] == EVAL_AT_B6BABAC['count'] and got['top1'] == pytest.approx(EVAL_AT_B6BABAC['top1'])
    assert got['loss'] == pytest.approx(EVAL_AT_B6BABAC['loss'], abs=1e-6)


def test_a_format_1_checkpoint_exports_its_ema_weights(tmp_path):
    assert main(['export', str(FIXTURE), '--out', str(tmp_path / 'export')]) == 0
    exported = load_file(str(tmp_path / 'export' / 'model.safetensors'))
    ema = torch.load(FIXTURE, weights_only=True)['ema']
    assert set(exported) == set(ema)
    for key, value in ema.items():
        assert torch.equal(exported[key], value), key
    model = timm.create_model('local-dir:' + str(tmp_path / 'export'), pretrained=True)
    assert model.num_classes == 3


def test_a_format_1_checkpoint_resumes_training(images, tmp_path):
    cfg = dict(read_training_checkpoint(FIXTURE)['config'], output=str(tmp_path / 'run'))
    cfg['data']['root'] = str(images)
    cfg['sched']['epochs'] = 2
    (tmp_path / 'config.yaml').write_text(yaml.safe_dump(cfg))
    (tmp_path / 'run').mkdir()
    save_checkpoint(torch.load(FIXTURE, weights_only=True), tmp_path / 'run' / 'checkpoint-0001.pth')
    assert main(['train', str(tmp_path / 'config.yaml'), '--resume', 'auto']) == 0
    state = read_training_checkpoint(tmp_path / 'run' / 'checkpoint-0002.pth')
    assert state['format_version'] == FORMAT_VERSION and state['progress']['step'] == 6
    assert state['progress']['best_step'] in (3, 6)


def test_migration_fills_what_format_1_lacks():
    state = read_training_checkpoint(FIXTURE)
    progress = state['progress']
    assert state['format_version'] == FORMAT_VERSION
    assert progress['best_step'] == 3 and progress['loss_updates'] == 0 and 'seen' not in progress
    mid_epoch = dict(progress=dict(seen=12, totals={'loss': 1.5}, history=[], best_epoch=-1), world_size=2,
                     config=dict(train=dict(batch_size=8, accum_steps=1)))
    migrated = migrate(mid_epoch)['progress']  # rank 0 saw 12 images in batches of 4: 3 updates of loss 0.5
    assert migrated['loss_updates'] == 3 and migrated['loss_sums'] == {'loss': 1.5}


def test_a_newer_format_is_refused_with_the_remedy(tmp_path):
    save_checkpoint(dict(format_version=FORMAT_VERSION + 1, config={}, student={}), tmp_path / 'new.pth')
    with pytest.raises(CheckpointError, match=rf'has format {FORMAT_VERSION + 1}, newer than this scalekd reads '
                                              rf'\({FORMAT_VERSION}\): upgrade scalekd'):
        read_training_checkpoint(tmp_path / 'new.pth')
