"""timm <-> OpenMMLab key mapping against fixtures written by the real mmdet / mmseg / mmpretrain
(``scripts/make_openmmlab_fixtures.py``): full-size key lists, and outputs of small seeded models."""
import json

import pytest
import torch

from openmmlab_cases import (KEY_CASES, KEYS_FILE, OUTPUT_CASES, OUTPUTS_FILE, build_timm, seeded_input,
                             seeded_state, timm_output)
from scalekd.engine.checkpoint import save_checkpoint
from scalekd.cli import main
from scalekd.adapters.models import create_timm_model
from scalekd.tools.transfer import OpenMMLabKeyError, from_openmmlab, import_mmcls, to_format, to_openmmlab

KEYS = json.loads(KEYS_FILE.read_text())
OUTPUTS = json.loads(OUTPUTS_FILE.read_text())
DENSE_ONLY = {'mmdet/swin_tiny': {f'norm{i}.{p}' for i in range(3) for p in ('weight', 'bias')},
              'mmseg/swin_tiny': {f'norm{i}.{p}' for i in range(3) for p in ('weight', 'bias')}}


def _shapes(state):
    return {k: list(v.shape) for k, v in state.items()}


@pytest.mark.parametrize('case', sorted(KEY_CASES))
def test_full_size_keys_match_the_openmmlab_models(case):
    """Every key and shape the real package's model has, no more; dense-task extras (Swin's norm0-2) aside."""
    toolkit, name, kwargs, _ = KEY_CASES[case]
    expected = KEYS[case]
    model = build_timm(name, kwargs)
    exported = _shapes(to_openmmlab(model, toolkit))
    assert exported == {k: v for k, v in expected.items() if k not in DENSE_ONLY.get(case, ())}
    assert set(expected) - set(exported) == DENSE_ONLY.get(case, set())
    if toolkit == 'mmcls':  # and back: the OpenMMLab list fills the timm model exactly
        state = {k: torch.zeros(v) for k, v in expected.items() if not k.endswith('relative_position_index')}
        model.load_state_dict(from_openmmlab(model, state))


@pytest.mark.parametrize('case', sorted(OUTPUT_CASES))
def test_outputs_equal_the_openmmlab_models(case):
    """Seeded weights through the mapping give the outputs the OpenMMLab model computed from them."""
    toolkit, name, kwargs, _, input_shape = OUTPUT_CASES[case]
    record = OUTPUTS[case]
    model = build_timm(name, kwargs, input_shape[-1])
    state = seeded_state(record['shapes'])
    if toolkit == 'mmcls':
        model.load_state_dict(from_openmmlab(model, state))
    else:
        assert _shapes(model.state_dict()) == record['shapes']
        model.load_state_dict(state)
    got = timm_output(model, toolkit, seeded_input(input_shape), record['output_shape'])
    assert list(got.shape) == record['output_shape']
    want = torch.tensor(record['output'])
    assert want.std() > 0.05  # a real signal, not zeros
    torch.testing.assert_close(got.flatten()[:want.numel()], want, rtol=1e-4, atol=2e-5)


def test_import_reports_every_tensor_without_a_home():
    _, name, kwargs, _, input_shape = OUTPUT_CASES['mmcls/mixer']
    model = build_timm(name, kwargs, input_shape[-1])
    state = seeded_state(OUTPUTS['mmcls/mixer']['shapes'])
    with pytest.raises(OpenMMLabKeyError, match='backbone.extra.weight'):
        from_openmmlab(model, dict(state, **{'backbone.extra.weight': torch.zeros(1)}))
    with pytest.raises(OpenMMLabKeyError, match='timm keys left without weights: head.weight'):
        from_openmmlab(model, {k: v for k, v in state.items() if not k.startswith('head.fc.w')})
    wrong = dict(state, **{'head.fc.weight': torch.zeros(7, 32)})
    with pytest.raises(OpenMMLabKeyError, match=r'head.fc.weight \(7, 32\) -> head.weight \(5, 32\)'):
        from_openmmlab(model, wrong)


@pytest.mark.parametrize('name, kwargs, fmt, match', [
    ('mobilenetv3_small_050', {}, 'mmdet', 'not MobileNetV3'),
    ('vit_tiny_patch16_224', dict(patch_size=8, depth=1), 'mmdet', 'mmdet has no plain ViT'),
    ('convnext_tiny', dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64)), 'mmseg', 'not convnext'),
])
def test_export_refuses_backbones_the_toolkit_lacks(name, kwargs, fmt, match):
    with pytest.raises(ValueError, match=match):
        to_format(create_timm_model(name, (32, 32), **kwargs), fmt)


def test_import_mmcls_cli_takes_the_student_of_a_distiller_checkpoint(tmp_path, capsys):
    """A release-style file (student + teacher + projectors, mmengine layout) -> a timm export folder."""
    _, name, kwargs, _, input_shape = OUTPUT_CASES['mmcls/deit']
    record = OUTPUTS['mmcls/deit']
    student = seeded_state(record['shapes'])
    state = {f'student.{k}': v for k, v in student.items()}
    state.update({'teacher.backbone.ln1.weight': torch.ones(8), 'distill_losses.loss_fmd_s4.proj.weight': torch.ones(2, 2),
                  'linear.weight': torch.ones(384, 384)})
    path = tmp_path / 'release.pth'
    save_checkpoint({'meta': {'epoch': 300}, 'state_dict': state}, path)
    kwarg_args = [a for k, v in kwargs.items() if k != 'num_classes' for a in ('--model-kwarg', f'{k}={list(v) if isinstance(v, tuple) else v}')]
    out = tmp_path / 'deit'
    assert main(['import-mmcls', str(path), '--model', name, '--out', str(out), '--img-size', '32', *kwarg_args]) == 0
    said = capsys.readouterr().out
    assert f'imported {len(student)} student tensors' in said and '(5 classes)' in said
    assert 'distill_losses (1), linear (1), teacher (1)' in said
    import timm
    model = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    got = timm_output(model, 'mmcls', seeded_input(input_shape), record['output_shape'])
    torch.testing.assert_close(got.flatten(), torch.tensor(record['output']), rtol=1e-4, atol=2e-5)


def test_import_mmcls_refuses_a_file_without_a_student(tmp_path, capsys):
    path = tmp_path / 'teacher.pth'
    save_checkpoint({'state_dict': {'teacher.backbone.ln1.weight': torch.ones(2)}}, path)
    assert main(['import-mmcls', str(path), '--model', 'resnet50d', '--out', str(tmp_path / 'out')]) == 2
    assert 'no mmcls student in this file' in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()
    with pytest.raises(OpenMMLabKeyError):
        import_mmcls(path, 'resnet50d')


def test_swin_exports_sit_under_backbone_as_mmdet_swin_reads_them():
    """mmdet's Swin.init_weights keeps only keys under ``backbone.`` (mmseg's strips it); ResNet / ViT take bare keys."""
    _, name, kwargs, _, input_shape = OUTPUT_CASES['mmdet/swin']
    swin = build_timm(name, kwargs, input_shape[-1])
    written = to_format(swin, 'mmdet')
    assert written and all(k.startswith('backbone.') for k in written)
    assert {k[len('backbone.'):] for k in written} == set(to_openmmlab(swin, 'mmdet'))
    resnet = create_timm_model('resnet18', (32, 32), layers=[1, 1, 1, 1])
    assert set(to_format(resnet, 'mmseg')) == {k for k in resnet.state_dict() if not k.startswith('fc.')}


def test_import_mmcls_names_a_missing_file_without_the_unsafe_file_hint(tmp_path, capsys):
    assert main(['import-mmcls', str(tmp_path / 'nope.pth'), '--model', 'resnet50d', '--out', str(tmp_path / 'o')]) == 2
    err = capsys.readouterr().err
    assert 'nope.pth does not exist' in err and 'If you trust' not in err
