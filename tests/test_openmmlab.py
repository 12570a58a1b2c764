"""timm <-> OpenMMLab key mapping against fixtures written by the real mmdet / mmseg / mmpretrain
(``scripts/make_openmmlab_fixtures.py``): full-size key lists, and outputs of small seeded models."""
import json

import pytest
import torch

from openmmlab_cases import (KEY_CASES, KEYS_FILE, OUTPUT_CASES, OUTPUTS_FILE, build_timm, seeded_input,
                             seeded_state, timm_output)
from scalekd.engine.run_folder.checkpoint import save_checkpoint
from scalekd.cli import main
from scalekd.adapters.models import create_timm_model
from scalekd.engine.errors import UserError
from scalekd.tools.transfer import OpenMMLabKeyError, from_openmmlab, import_mmcls, to_format, to_openmmlab

KEYS = json.loads(KEYS_FILE.read_text())
OUTPUTS = json.loads(OUTPUTS_FILE.read_text())
DENSE_ONLY = {'mmdet/swin_tiny': {f'norm{i}.{p}' for i in range(3) for p in ('weight', 'bias')},
              'mmseg/swin_tiny': {f'norm{i}.{p}' for i in range(3) for p in ('weight', 'bias')}}


def _shapes(state):
    return {k: list(v.shape) for k, v in state.items()}


@pytest.mark.slow  # full-size models
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
    with pytest.raises(UserError, match=match):
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


# --- The export mapping, timm -> OpenMMLab, against weights the real OpenMMLab models ran ----------------
# Each mmcls case's seeded state S (OpenMMLab names) is what the real mmpretrain model computed the stored
# outputs from; test_outputs_equal_the_openmmlab_models shows the timm model importing S reproduces them.
# So S is, independently of the export code, that timm model's weights under OpenMMLab's names: the export
# of that timm model must give S back, tensor for tensor. The dense toolkits name the same modules
# differently only where their classes differ (below, from the OpenMMLab sources); their Swin / ViT
# semantics (patch merging by nn.Unfold, attention by nn.MultiheadAttention) are also checked directly.

MMCLS_OUTPUT_CASES = sorted(c for c in OUTPUT_CASES if OUTPUT_CASES[c][0] == 'mmcls')


def _imported(case):
    """(timm model holding the case's seeded OpenMMLab weights S, S), the model's outputs checked."""
    _, name, kwargs, _, input_shape = OUTPUT_CASES[case]
    record = OUTPUTS[case]
    state = seeded_state(record['shapes'])
    model = build_timm(name, kwargs, input_shape[-1])
    model.load_state_dict(from_openmmlab(model, state))
    got = timm_output(model, 'mmcls', seeded_input(input_shape), record['output_shape'])
    torch.testing.assert_close(got.flatten(), torch.tensor(record['output']), rtol=1e-4, atol=2e-5)
    return model, state


def _assert_same_tensors(got, want):
    assert sorted(got) == sorted(want)
    wrong = [k for k in want if got[k].shape != want[k].shape or not torch.equal(got[k], want[k].to(got[k].dtype))]
    assert not wrong, f'{len(wrong)} exported tensors differ from the reference, e.g. {wrong[:4]}'


@pytest.mark.parametrize('case', MMCLS_OUTPUT_CASES)
def test_mmcls_export_gives_back_the_weights_the_openmmlab_model_ran(case):
    model, state = _imported(case)
    exported = to_openmmlab(model, 'mmcls')
    index = {k for k in exported if k.endswith('relative_position_index')}  # a constant S leaves out
    _assert_same_tensors({k: v for k, v in exported.items() if k not in index}, state)


# mmpretrain backbone key -> the dense toolkit's key for the same tensor, from the OpenMMLab classes:
# mmdet's ResNet stem is one flat Sequential (conv, bn, relu) x 3 where mmpretrain has three ConvModules,
# and mmdet's avg-down ResLayer keeps its AvgPool (index 0) even in layer1, whose stride is 1; mmseg's ViT
# attention is mmcv's nn.MultiheadAttention (in_proj = q, k, v stacked as mmpretrain's qkv) where
# mmpretrain has its own qkv / proj; both toolkits' Swin is mmpretrain's Swin.
_MMDET_RESNET_D = {'stem.0.conv': 'stem.0', 'stem.0.bn': 'stem.1', 'stem.1.conv': 'stem.3', 'stem.1.bn': 'stem.4',
                   'stem.2.conv': 'stem.6', 'stem.2.bn': 'stem.7',
                   'layer1.0.downsample.0': 'layer1.0.downsample.1', 'layer1.0.downsample.1': 'layer1.0.downsample.2'}


def _mmdet_resnet_d(key):
    module, _, param = key.rpartition('.')
    return f'{_MMDET_RESNET_D.get(module, module)}.{param}'


def _mmseg_vit(key):
    return (key.replace('.attn.qkv.weight', '.attn.attn.in_proj_weight').replace('.attn.qkv.bias', '.attn.attn.in_proj_bias')
            .replace('.attn.proj.', '.attn.attn.out_proj.'))


DENSE_EXPORTS = {  # dense case -> (mmcls case giving the model and S, toolkit, mmpretrain -> toolkit key)
    'mmdet/resnet50d': ('mmcls/resnet50d', 'mmdet', _mmdet_resnet_d),
    'mmdet/swin': ('mmcls/swin', 'mmdet', lambda k: k),
    'mmseg/swin': ('mmcls/swin', 'mmseg', lambda k: k),
    'mmseg/vit': ('mmcls/deit', 'mmseg', _mmseg_vit),
}


def _dense_reference(source, rename):
    model, state = _imported(source)
    return model, {rename(k[len('backbone.'):]): v for k, v in state.items() if k.startswith('backbone.')}


@pytest.mark.parametrize('case', sorted(DENSE_EXPORTS))
def test_dense_export_writes_the_weights_the_openmmlab_backbone_needs(case):
    """``to_format`` (what ``scalekd export --format mmdet / mmseg`` writes) against the reference weights."""
    source, toolkit, rename = DENSE_EXPORTS[case]
    model, want = _dense_reference(source, rename)
    full = KEYS[case.replace('swin', 'swin_tiny').replace('mmseg/vit', 'mmseg/vit_base')]
    assert set(want) <= set(full)  # the reference names are the real package's (small depths: a subset)
    written = to_format(model, toolkit)
    if 'swin' in case:
        assert all(k.startswith('backbone.') for k in written)
        written = {k[len('backbone.'):]: v for k, v in written.items()}
    _assert_same_tensors({k: v for k, v in written.items() if not k.endswith('relative_position_index')}, want)


def test_export_command_writes_the_mmdet_swin_backbone(tmp_path):
    """``scalekd export --format mmdet`` of a Swin student's checkpoint: model.pth holds the reference weights."""
    from scalekd.engine.run_folder.checkpoint import load_checkpoint
    from scalekd.engine.inputs.config import RunConfig, config_to_dict
    _, name, kwargs, _, _ = OUTPUT_CASES['mmcls/swin']
    model, want = _dense_reference('mmcls/swin', lambda k: k)
    cfg = RunConfig()
    cfg.student.model = name
    cfg.student.kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items() if k != 'num_classes'}
    cfg.data.img_size, cfg.data.num_classes = 224, kwargs['num_classes']
    save_checkpoint(dict(config=config_to_dict(cfg), student=model.state_dict()), tmp_path / 'ckpt.pth')
    assert main(['export', str(tmp_path / 'ckpt.pth'), '--out', str(tmp_path / 'mm'), '--format', 'mmdet']) == 0
    written = load_checkpoint(tmp_path / 'mm' / 'model.pth')
    assert all(k.startswith('backbone.') for k in written)
    _assert_same_tensors({k[len('backbone.'):]: v for k, v in written.items()
                          if not k.endswith('relative_position_index')}, want)


def test_swin_patch_merging_export_computes_what_openmmlab_patch_merging_computes():
    """OpenMMLab's PatchMerging (mmcv / mmdet / mmpretrain): nn.Unfold(2, stride 2) over the NCHW map,
    then norm and reduction over the (C, kh, kw)-ordered 4C channels; run with the exported weights, it
    must equal timm's PatchMerging of the same map."""
    torch.manual_seed(3)
    _, name, kwargs, _, input_shape = OUTPUT_CASES['mmdet/swin']
    model = build_timm(name, kwargs, input_shape[-1])
    for p in model.parameters():  # non-trivial norm weights, so that a channel permutation shows
        p.data.normal_(0, 0.5)
    state = to_format(model, 'mmdet')
    for i in (1, 2, 3):
        merge = model.layers[i].downsample
        c = merge.reduction.in_features // 4
        x = torch.randn(2, 6, 10, c)  # timm: NHWC
        w = {p: state[f'backbone.stages.{i - 1}.downsample.{p}'] for p in
             ('norm.weight', 'norm.bias', 'reduction.weight')}
        cols = torch.nn.functional.unfold(x.permute(0, 3, 1, 2), kernel_size=2, stride=2).transpose(1, 2)
        cols = torch.nn.functional.layer_norm(cols, (4 * c,), w['norm.weight'], w['norm.bias'], eps=merge.norm.eps)
        mm = (cols @ w['reduction.weight'].T).reshape(2, 3, 5, -1)
        with torch.no_grad():
            torch.testing.assert_close(mm, merge(x), rtol=1e-5, atol=1e-5)


def test_mmseg_vit_attention_export_runs_in_torch_multihead_attention():
    """mmseg's ViT attention is mmcv's MultiheadAttention, i.e. torch's nn.MultiheadAttention: loaded with
    the exported in_proj / out_proj it must compute what timm's attention computes."""
    torch.manual_seed(4)
    _, name, kwargs, _, input_shape = OUTPUT_CASES['mmseg/vit']
    model = build_timm(name, kwargs, input_shape[-1])
    state = to_format(model, 'mmseg')
    dim, heads = kwargs['embed_dim'], kwargs['num_heads']
    x = torch.randn(2, 17, dim)
    for i, block in enumerate(model.blocks):
        mha = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
        mha.load_state_dict({k: state[f'layers.{i}.attn.attn.{k}'] for k in mha.state_dict()})
        with torch.no_grad():
            torch.testing.assert_close(mha(x, x, x, need_weights=False)[0], block.attn(x), rtol=1e-5, atol=1e-5)
