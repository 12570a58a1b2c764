#!/usr/bin/env python
"""Build the detector / segmentor of each ``configs/downstream`` config with the real mmdet / mmseg,
load a ``scalekd export --format mmdet|mmseg`` of a random timm student through its ``init_cfg``,
and check that every exported tensor arrived in the backbone unchanged.

Needs the OpenMMLab packages of ``scripts/make_openmmlab_fixtures.py`` on PYTHONPATH.
"""
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_openmmlab_fixtures import _no_compiled_ops  # noqa: E402

from scalekd.adapters.models import create_timm_model  # noqa: E402
from scalekd.tools.transfer import to_format  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / 'configs' / 'downstream'
CASES = {  # config -> (toolkit, timm student, export folder named in the config)
    'mask-rcnn_r50d-scalekd_fpn_1x_coco.py': ('mmdet', 'resnet50d', 'work_dirs/r50d-scalekd'),
    'mask-rcnn_swin-t-scalekd_fpn_1x_coco.py': ('mmdet', 'swin_tiny_patch4_window7_224', 'work_dirs/swin-t-scalekd'),
    'upernet_vit-b16-scalekd_ade20k-512x512.py': ('mmseg', 'vit_base_patch16_224', 'work_dirs/vit-b-scalekd'),
}


def check(config: str, toolkit: str, student: str, folder: str, tmp: Path) -> None:
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    model = create_timm_model(student, (224, 224))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    written = to_format(model, toolkit)  # what `scalekd export --format` writes
    state = {k[len('backbone.'):] if k.startswith('backbone.') else k: v for k, v in written.items()}
    weights = tmp / folder / 'model.pth'
    weights.parent.mkdir(parents=True, exist_ok=True)
    torch.save(written, weights)
    cfg = Config.fromfile(str(CONFIGS / config))
    assert cfg.model.backbone.init_cfg.checkpoint == f'{folder}/model.pth', cfg.model.backbone.init_cfg
    cfg.model.backbone.init_cfg.checkpoint = str(weights)
    init_default_scope(toolkit)
    registry = __import__(f'{toolkit}.registry', fromlist=['MODELS']).MODELS
    net = registry.build(cfg.model)
    net.init_weights()
    loaded = net.backbone.state_dict()
    resized = [k for k in state if k in loaded and loaded[k].shape != state[k].shape]
    same = [k for k in state if k in loaded and loaded[k].shape == state[k].shape and torch.equal(loaded[k], state[k])]
    lost = sorted(set(state) - set(loaded))
    print(f'{config}: {type(net).__name__} / {type(net.backbone).__name__}: {len(same)} of {len(state)} exported '
          f'tensors loaded unchanged; resized {resized}; not taken {lost}')
    assert not lost and len(same) + len(resized) == len(state) and set(resized) <= {'pos_embed'}


def main() -> int:
    _no_compiled_ops()
    with tempfile.TemporaryDirectory() as tmp:
        for config, (toolkit, student, folder) in CASES.items():
            check(config, toolkit, student, folder, Path(tmp))
    return 0


if __name__ == '__main__':
    sys.exit(main())
