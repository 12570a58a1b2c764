"""The analysis tools: feature spectrum and linear probing."""
import json
import math

import pytest
import torch

from engine_fixtures import make_fashion_mnist, make_image_folder
from scalekd.tools.analysis import feature_spectrum
from scalekd.tools.analysis.linear_probe import few_shot_indices, fit_linear
from scalekd.engine.run_folder.checkpoint import save_checkpoint
from scalekd.cli import main
from scalekd.tools.export import export_student
from scalekd.adapters.models import create_timm_model
from scalekd.engine.errors import UserError


def test_a_constant_map_has_all_its_energy_at_dc():
    spectrum = feature_spectrum(torch.full((3, 4, 7, 5), 2.5))
    assert spectrum['dc_share'] == pytest.approx(1.0)
    assert spectrum['bands'][0] == pytest.approx(1.0) and sum(spectrum['bands'][1:]) == pytest.approx(0, abs=1e-9)


def test_a_single_cosine_sits_at_its_frequency():
    h, w, (u0, v0) = 8, 6, (3, 2)
    y = torch.arange(h, dtype=torch.float64).view(-1, 1)
    x = torch.arange(w, dtype=torch.float64).view(1, -1)
    wave = torch.cos(math.pi * (2 * y + 1) * u0 / (2 * h)) * torch.cos(math.pi * (2 * x + 1) * v0 / (2 * w))
    spectrum = feature_spectrum(wave.expand(2, 3, h, w))
    response = torch.tensor(spectrum['response'])
    assert divmod(response.argmax().item(), w) == (u0, v0)
    assert response[u0, v0] / response.sum() == pytest.approx(1.0)
    assert spectrum['dc_share'] == pytest.approx(0.0, abs=1e-12)
    assert spectrum['bands'][u0 + v0] == pytest.approx(1.0)
    # a constant added to the wave shows up at DC only
    shifted = feature_spectrum(wave.expand(2, 3, h, w) + 1.0)
    assert 0.2 < shifted['dc_share'] < 0.9 and torch.tensor(shifted['response'])[u0, v0] == pytest.approx(response[u0, v0])


@pytest.fixture(scope='module')
def tiny_export(tmp_path_factory):
    """A tiny grey-input ViT exported like a trained student (model.safetensors + config.json)."""
    model = create_timm_model('vit_tiny_patch16_224', (28, 28), num_classes=10, in_chans=1,
                              patch_size=7, embed_dim=32, depth=2, num_heads=2)
    folder = tmp_path_factory.mktemp('export')
    export_student(model, folder, dict(input_size=(1, 28, 28), mean=(0.5,), std=(0.5,), crop_pct=1.0,
                                       interpolation='bilinear'))
    return folder


def test_spectrum_command_writes_a_plot_and_real_numbers(tmp_path, tiny_export, capsys):
    data = make_fashion_mnist(tmp_path / 'fm', n_train=10, n_test=24)
    out = tmp_path / 'fig' / 'spectrum.png'
    assert main(['spectrum', '--checkpoint', str(tiny_export), '--data', str(data), '--samples', '12',
                 '--out', str(out)]) == 0
    assert out.read_bytes()[:4] == b'\x89PNG'
    spectrum = json.loads(out.with_suffix('.json').read_text())
    assert spectrum['shape'] == [12, 32, 4, 4] and spectrum['samples'] == 12
    assert 0 < spectrum['dc_share'] < 1 and sum(spectrum['bands']) == pytest.approx(1.0)
    assert main(['spectrum', '--model', 'resnet5O', '--data', str(data), '--out', str(tmp_path / 'bad.png')]) == 2
    assert not (tmp_path / 'bad.png').exists()
    err = capsys.readouterr().err
    assert "unknown timm model 'resnet5O'" in err and 'did you mean resnet50' in err


def test_fit_linear_separates_separable_features():
    torch.manual_seed(0)
    centres = torch.randn(4, 16) * 4
    labels = torch.arange(200) % 4
    feats = centres[labels] + torch.randn(200, 16)
    linear = fit_linear(feats, labels, 4)
    assert (linear(feats).argmax(-1) == labels).float().mean() > 0.97
    picked = few_shot_indices(labels, 5, seed=1)
    assert len(picked) == 20 and torch.bincount(labels[picked]).tolist() == [5, 5, 5, 5]
    with pytest.raises(UserError, match='fewer than --shots 60'):
        few_shot_indices(labels, 60)


def test_linear_probe_command_on_an_easy_generated_case(tmp_path, capsys):
    root = make_image_folder(tmp_path / 'img', train_per_class=12, val_per_class=6, size=28)
    model = create_timm_model('resnet18', (28, 28), num_classes=3, layers=[1, 1, 1, 1])
    export_student(model, tmp_path / 'exp', dict(input_size=(3, 28, 28), crop_pct=1.0))
    args = ['linear-probe', '--checkpoint', str(tmp_path / 'exp'), '--train', str(root / 'train'),
            '--val', str(root / 'val'), '--json']
    assert main(args) == 0
    full = json.loads(capsys.readouterr().out)
    assert full['top1'] >= 90 and full['train_images'] == 36 and full['val_images'] == 18
    assert main(args + ['--shots', '4']) == 0
    few = json.loads(capsys.readouterr().out)
    assert few['train_images'] == 12 and few['top1'] >= 70


def _checkpoint(tmp_path, data_root, name, **distill):
    """A training checkpoint of the tiny engine config (untrained), its teacher saved as a weight file."""
    from safetensors.torch import save_file
    from engine_fixtures import tiny_config
    from scalekd.engine.inputs.config import config_to_dict, load_config
    from scalekd.engine.inputs.task_build import build_task
    (tmp_path / name).mkdir()
    cfg = load_config(tiny_config(tmp_path / name, data_root, distill=dict(method='scalekd', **distill)))
    task = build_task(cfg, torch.device('cpu'), random_weights=True)
    save_file({k: v.contiguous() for k, v in task.teacher.model.state_dict().items()}, str(tmp_path / 'teacher.safetensors'))
    cfg.teacher.checkpoint = str(tmp_path / 'teacher.safetensors')
    path = tmp_path / name / 'checkpoint-0001.pth'
    save_checkpoint(dict(config=config_to_dict(cfg), student=task.student.state_dict(),
                         task_state=task.get_task_state()), path)
    return path


@pytest.mark.slow
def test_feature_distances_are_the_training_distances_on_held_out_images(tmp_path, data_root, capsys):
    from scalekd.tools.analysis import feature_distances, image_dataset, task_from_checkpoint
    dfm = _checkpoint(tmp_path, data_root, 'dfm')
    single = _checkpoint(tmp_path, data_root, 'single', views='single')
    task, data_config = task_from_checkpoint(dfm)
    dataset, _ = image_dataset(data_root / 'val', data_config)
    distances = feature_distances(task, dataset, batch_size=len(dataset))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.no_grad():
        terms = task(images, torch.zeros(len(dataset), dtype=torch.long))
    assert distances['alternative'] == pytest.approx(terms['s4_alt'].item(), rel=1e-5)
    assert distances['original'] == pytest.approx(terms['s4_ori'].item(), rel=1e-5)
    assert 0 < distances['direct'] < distances['original']

    out = tmp_path / 'fd.png'
    assert main(['feature-distance', '--students', str(dfm), str(single), '--data', str(data_root / 'val'),
                 '--out', str(out)]) == 0
    rows = json.loads(out.with_suffix('.json').read_text())
    assert [r['label'] for r in rows] == ['dfm', 'single'] and out.read_bytes()[:4] == b'\x89PNG'
    assert rows[0]['distances']['alternative'] == pytest.approx(distances['alternative'], rel=1e-5)
    kd = torch.load(dfm, weights_only=True)
    kd['config']['distill']['method'] = 'kd'
    save_checkpoint(kd, tmp_path / 'kd.pth')
    with pytest.raises(UserError, match="method 'kd': it has no projector"):
        task_from_checkpoint(tmp_path / 'kd.pth')
