"""Backbone export under torchvision key names: round trips into the real torchvision models."""
import pytest
import torch
from torchvision.models.resnet import BasicBlock, ResNet
from torchvision.models.vision_transformer import VisionTransformer

from scalekd.engine.run_folder.checkpoint import load_checkpoint, save_checkpoint
from scalekd.cli import main
from scalekd.engine.inputs.config import RunConfig, config_to_dict
from scalekd.adapters.models import create_timm_model
from scalekd.tools.transfer import ExportFormatError, to_format


def _same_outputs(timm_model, tv_model, state, x):
    missing, unexpected = tv_model.load_state_dict(state, strict=False)
    assert missing == [] and unexpected == []
    timm_model.eval(), tv_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(tv_model(x), timm_model(x), rtol=1e-5, atol=1e-5)


def test_resnet_loads_into_torchvision_with_the_same_logits():
    model = create_timm_model('resnet18', (32, 32), num_classes=7, layers=[1, 1, 1, 1])
    _same_outputs(model, ResNet(BasicBlock, [1, 1, 1, 1], num_classes=7), to_format(model, 'torchvision'),
                  torch.randn(2, 3, 32, 32))


def test_vit_loads_into_torchvision_with_the_same_logits():
    model = create_timm_model('vit_tiny_patch16_224', (28, 28), num_classes=5, patch_size=7, embed_dim=32, depth=2,
                              num_heads=2)
    tv = VisionTransformer(28, 7, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=128, num_classes=5)
    _same_outputs(model, tv, to_format(model, 'torchvision'), torch.randn(2, 3, 28, 28))


@pytest.mark.parametrize('name, kwargs, why', [
    ('resnet10t', {}, 'deep stem'),
    ('mixer_t7', dict(in_chans=3), 'covers ResNet and ViT'),
    ('vit_tiny_patch16_224', dict(patch_size=7, global_pool='avg', class_token=False,
                                  fc_norm=True), 'one class token'),
])
def test_students_torchvision_lacks_are_refused(name, kwargs, why):
    with pytest.raises(ExportFormatError, match=why):
        to_format(create_timm_model(name, (28, 28), **kwargs), 'torchvision')
    with pytest.raises(ExportFormatError, match='unknown export format'):
        to_format(create_timm_model('resnet18', (28, 28)), 'keras')


def _student_checkpoint(path):
    """A training checkpoint (config + student) of a small ResNet-18; returns the student."""
    cfg = RunConfig()
    cfg.student.model, cfg.student.kwargs = 'resnet18', dict(layers=[1, 1, 1, 1])
    cfg.data.img_size, cfg.data.num_classes = 32, 4
    student = create_timm_model('resnet18', (32, 32), num_classes=4, layers=[1, 1, 1, 1])
    save_checkpoint(dict(config=config_to_dict(cfg), student=student.state_dict()), path)
    return student


def test_export_command_writes_torchvision_weights(tmp_path):
    student = _student_checkpoint(tmp_path / 'ckpt.pth')
    assert main(['export', str(tmp_path / 'ckpt.pth'), '--out', str(tmp_path / 'tv'), '--format', 'torchvision']) == 0
    _same_outputs(student, ResNet(BasicBlock, [1, 1, 1, 1], num_classes=4), load_checkpoint(tmp_path / 'tv' / 'model.pth'),
                  torch.randn(2, 3, 32, 32))


def test_export_dtype_stores_half_weights_that_load_into_a_float_model(tmp_path):
    from safetensors.torch import load_file
    from scalekd.tools.model_files import load_model
    student = _student_checkpoint(tmp_path / 'ckpt.pth')
    assert main(['export', str(tmp_path / 'ckpt.pth'), '--out', str(tmp_path / 'half'), '--dtype', 'float16']) == 0
    stored = load_file(str(tmp_path / 'half' / 'model.safetensors'))
    assert stored['conv1.weight'].dtype == torch.float16 and stored['bn1.num_batches_tracked'].dtype == torch.int64
    loaded = load_model(tmp_path / 'half').model
    assert loaded.conv1.weight.dtype == torch.float32
    torch.testing.assert_close(loaded.conv1.weight, student.conv1.weight.half().float())


def test_export_command_writes_mmdet_backbone_weights(tmp_path):
    """The backbone alone under mmdet's ResNet names (the same as timm's for the plain stem), no classifier."""
    student = _student_checkpoint(tmp_path / 'ckpt.pth')
    assert main(['export', str(tmp_path / 'ckpt.pth'), '--out', str(tmp_path / 'mm'), '--format', 'mmdet']) == 0
    state = load_checkpoint(tmp_path / 'mm' / 'model.pth')
    assert set(state) == {k for k in student.state_dict() if not k.startswith('fc.')}
    torch.testing.assert_close(state['layer4.0.conv2.weight'], student.layer4[0].conv2.weight.detach())


def test_a_failed_export_leaves_no_folder_behind(tmp_path, monkeypatch):
    import scalekd.tools.export as export
    def broken(*args, **kwargs):
        raise ValueError('config cannot be written')
    monkeypatch.setattr(export, 'save_config_for_hf', broken)
    student = create_timm_model('resnet18', (32, 32), num_classes=4, layers=[1, 1, 1, 1])
    with pytest.raises(ValueError, match='config cannot be written'):
        export.export_student(student, tmp_path / 'out', {})
    assert not (tmp_path / 'out').exists()
