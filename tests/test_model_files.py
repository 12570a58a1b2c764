"""One loader for a training checkpoint, an export folder or a weight file, each read once."""
import json
import os
import warnings
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import scalekd.engine.run_folder.checkpoint as checkpoint_module
from engine_fixtures import tiny_config
from scalekd.adapters.models import create_timm_model
from scalekd.engine.run_folder.checkpoint import save_checkpoint
from scalekd.engine.inputs.config import config_to_dict, load_config
from scalekd.engine.inputs.weights import WeightsError
from scalekd.tools.export import export_checkpoint
from scalekd.tools.model_files import load_model


def _student(cfg, seed):
    torch.manual_seed(seed)
    d = cfg.data
    return create_timm_model(cfg.student.model, (d.img_size, d.img_size), role='student', num_classes=d.num_classes,
                             in_chans=d.in_chans, **cfg.student.kwargs)


@pytest.fixture
def run_files(tmp_path):
    """best.pth-shaped file with distinct raw and EMA students, and the run config."""
    cfg = load_config(tiny_config(tmp_path, tmp_path / 'data'))
    raw, ema = _student(cfg, 1).state_dict(), _student(cfg, 2).state_dict()
    path = tmp_path / 'best.pth'
    save_checkpoint(dict(format_version=2, config=config_to_dict(cfg), progress=dict(step=3, epoch=1),
                         student=raw, ema=ema), path)
    return cfg, path, raw, ema


def _reads(monkeypatch):
    calls = []
    real = checkpoint_module.torch.load
    monkeypatch.setattr(checkpoint_module.torch, 'load', lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    return calls


def test_a_training_checkpoint_gives_its_ema_student_unless_asked_for_the_raw_one(run_files, monkeypatch):
    cfg, path, raw, ema = run_files
    calls = _reads(monkeypatch)
    loaded = load_model(path)
    assert len(calls) == 1  # read once
    assert loaded.ema and loaded.run_config == cfg
    assert torch.equal(loaded.model.state_dict()['conv1.weight'], ema['conv1.weight'])
    assert loaded.data_config['input_size'] == (3, 32, 32) and loaded.data_config['crop_pct'] == 1.0
    plain = load_model(path, use_ema=False)
    assert not plain.ema and torch.equal(plain.model.state_dict()['conv1.weight'], raw['conv1.weight'])


def test_an_export_folder_round_trips_and_is_not_exported_again(run_files, tmp_path):
    cfg, path, _, ema = run_files
    weights, used_ema = export_checkpoint(path, tmp_path / 'export')
    assert used_ema and weights == tmp_path / 'export' / 'model.safetensors'
    for given in (tmp_path / 'export', weights):  # the folder or its weight file
        loaded = load_model(given)
        assert loaded.run_config is None
        assert torch.equal(loaded.model.state_dict()['fc.weight'], ema['fc.weight'])
        assert loaded.model.num_classes == 3 and tuple(loaded.data_config['input_size']) == (3, 32, 32)
    described = json.loads((tmp_path / 'export' / 'config.json').read_text())['pretrained_cfg']
    assert described['tag'] == 'scalekd' and not {'license', 'origin_url', 'paper_ids', 'hf_hub_id'} & set(described)
    with pytest.raises(WeightsError, match='is an export already'):
        export_checkpoint(tmp_path / 'export', tmp_path / 'again')
    assert not (tmp_path / 'again').exists()


def test_an_export_has_the_mode_the_umask_gives_not_owner_only(run_files, tmp_path):
    """safetensors writes owner-only files: an export another user (a serving account) reads gets 0644."""
    _, path, _, _ = run_files
    old = os.umask(0o022)
    try:
        export_checkpoint(path, tmp_path / 'export')
        os.umask(0o077)
        export_checkpoint(path, tmp_path / 'private')
    finally:
        os.umask(old)
    assert {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / 'export').iterdir()} == {
        'model.safetensors': 0o644, 'config.json': 0o644}
    assert (tmp_path / 'private' / 'model.safetensors').stat().st_mode & 0o777 == 0o600


def test_plain_weights_need_the_model_name(run_files, tmp_path, monkeypatch):
    cfg, _, raw, _ = run_files
    torch.save({'state_dict': {f'module.{k}': v for k, v in raw.items()}}, tmp_path / 'plain.pth')
    save_file({k: v.contiguous() for k, v in raw.items()}, str(tmp_path / 'plain.safetensors'))
    for name in ('plain.pth', 'plain.safetensors'):
        with pytest.raises(WeightsError, match='holds plain weights.*--model'):
            load_model(tmp_path / name)
    calls = _reads(monkeypatch)
    model = load_model(tmp_path / 'plain.pth', cfg.student.model, num_classes=3, layers=[1, 1, 1, 1]).model
    assert len(calls) == 1
    assert torch.equal(model.state_dict()['layer1.0.conv1.weight'], raw['layer1.0.conv1.weight'])
    with pytest.raises(WeightsError, match=r'does not fit the resnet18.*shape-mismatched keys: fc\.bias, fc\.weight'):
        load_model(tmp_path / 'plain.safetensors', 'resnet18', num_classes=5, layers=[1, 1, 1, 1])


def test_damaged_export_files_are_named(run_files, tmp_path):
    _, path, _, _ = run_files
    weights, _ = export_checkpoint(path, tmp_path / 'export')
    config = weights.with_name('config.json')
    config.write_text(config.read_text()[:-20])
    with pytest.raises(WeightsError, match=f'{config} is not valid JSON'):
        load_model(tmp_path / 'export')
    export_checkpoint(path, tmp_path / 'export2')
    truncated = tmp_path / 'export2' / 'model.safetensors'
    truncated.write_bytes(truncated.read_bytes()[:1000])
    with pytest.raises(WeightsError, match=f'{truncated} is not a readable safetensors file'):
        load_model(tmp_path / 'export2')


def _tiny_vit(img_size):
    torch.manual_seed(0)
    return create_timm_model('vit_tiny_patch16_224', (img_size, img_size), num_classes=10, in_chans=1, patch_size=7,
                             embed_dim=32, depth=1, num_heads=2)


def test_weights_of_another_image_size_are_resampled_as_timm_does_for_hub_weights(tmp_path):
    from timm.layers import resample_abs_pos_embed
    from scalekd.engine.inputs.weights import load_weights
    small = _tiny_vit(28)
    save_file(small.state_dict(), str(tmp_path / 'vit28.safetensors'))
    large = _tiny_vit(35)
    load_weights(large, tmp_path / 'vit28.safetensors')
    grid = resample_abs_pos_embed(small.pos_embed.detach(), new_size=(5, 5), old_size=(4, 4), num_prefix_tokens=1)
    assert large.pos_embed.shape == (1, 26, 32) and torch.allclose(large.pos_embed, grid)
    assert torch.equal(large.blocks[0].mlp.fc1.weight, small.blocks[0].mlp.fc1.weight)


def test_position_embeddings_that_cannot_be_resampled_name_the_image_size(tmp_path, monkeypatch):
    import timm.models.vision_transformer as vit
    from scalekd.engine.inputs.weights import load_weights
    save_file(_tiny_vit(28).state_dict(), str(tmp_path / 'vit28.safetensors'))
    monkeypatch.setattr(vit, 'checkpoint_filter_fn', lambda state, model: state)
    with pytest.raises(WeightsError, match=r'shape-mismatched keys: pos_embed \(position embeddings of another image '
                                           r'size: check data.img_size'):
        load_weights(_tiny_vit(35), tmp_path / 'vit28.safetensors')


class _Meta:
    """Training metadata of another toolkit (mmengine's HistoryBuffer, say): not loadable weights-only."""

    def __init__(self, values):
        self.values = values


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_weights_beside_foreign_objects_load_and_a_payload_is_refused(tmp_path):
    from scalekd.engine.inputs.weights import read_state_dict
    weights = {'backbone.w': torch.arange(4.0), 'head.b': torch.ones(2)}
    path = tmp_path / 'mmcls.pth'
    torch.save({'meta': {'hub': _Meta([1.0, 2.0])}, 'state_dict': weights}, path)
    with pytest.raises(Exception, match='Weights only load failed'):
        torch.load(path, weights_only=True)  # what a plain safe load says
    state = read_state_dict(path)  # the metadata loads as inert stand-ins
    assert state.keys() == weights.keys() and all(torch.equal(state[k], weights[k]) for k in weights)
    marker = tmp_path / 'pwned'
    torch.save({'meta': {'hook': _Payload(marker)}, 'state_dict': weights}, path)
    with pytest.raises(WeightsError, match='mmcls.pth cannot be loaded safely'):
        read_state_dict(path)
    assert not marker.exists()
    path.write_bytes(path.read_bytes()[:300])  # truncated
    with pytest.raises(WeightsError, match='mmcls.pth cannot be loaded safely'):
        read_state_dict(path)


def test_a_model_file_with_foreign_metadata_loads_by_name(tmp_path):
    """load_model (eval, export, the analysis commands) reads torch files as the weight loader does: a
    timm model's weights saved beside another toolkit's metadata load."""
    model = timm.create_model('resnet18', layers=[1, 1, 1, 1], num_classes=3)
    path = tmp_path / 'mmcls.pth'
    torch.save({'meta': {'hub': _Meta([1.0])}, 'state_dict': model.state_dict()}, path)
    loaded = load_model(path, name='resnet18', layers=[1, 1, 1, 1], num_classes=3)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key


def test_non_finite_weights_load_with_a_warning_naming_them(run_files, tmp_path):
    cfg, path, raw, ema = run_files
    ema = dict(ema, **{'fc.bias': torch.full_like(ema['fc.bias'], float('nan'))})
    save_checkpoint(dict(format_version=2, config=config_to_dict(cfg), progress={}, student=raw, ema=ema), path)
    with pytest.warns(UserWarning, match=r'best.pth: 1 tensor\(s\) hold NaN or infinite values \(fc.bias\)'):
        loaded = load_model(path)
    assert loaded.model.fc.bias.isnan().all()
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        load_model(path, use_ema=False)  # the raw weights are finite: no warning


def test_an_export_onto_a_full_disk_is_named_and_leaves_nothing(run_files, tmp_path, monkeypatch):
    import errno
    import scalekd.tools.export as export
    _, path, _, _ = run_files

    def full(state, filename, metadata=None):
        Path(filename).write_bytes(b'x' * 100)
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(export, 'save_file', full)
    with pytest.raises(WeightsError, match='failed: the disk is full; nothing was written'):
        export_checkpoint(path, tmp_path / 'out')
    assert not (tmp_path / 'out').exists()


def test_an_export_into_a_folder_that_cannot_be_written_is_named(run_files, tmp_path, monkeypatch):
    import scalekd.tools.export as export
    _, path, _, _ = run_files

    def denied(state, filename, metadata=None):
        raise PermissionError(13, 'Permission denied', filename)
    monkeypatch.setattr(export, 'save_file', denied)
    with pytest.raises(WeightsError, match='out cannot be written: Permission denied; nothing was written'):
        export_checkpoint(path, tmp_path / 'out')
    assert not (tmp_path / 'out').exists()
    monkeypatch.setattr(Path, 'mkdir', lambda self, **kwargs: (_ for _ in ()).throw(PermissionError(13, 'Permission denied')))
    with pytest.raises(WeightsError, match='export folder .*deep/out cannot be created: Permission denied'):
        export_checkpoint(path, tmp_path / 'deep' / 'out')
