#!/usr/bin/env python
"""Write the OpenMMLab fixtures of ``tests/test_openmmlab.py`` from the real packages.

Needs mmdet 3.3, mmsegmentation 1.2, mmpretrain 1.2 (the successor of the release's mmcls 1.x,
same backbone key names), mmengine and mmcv-lite 2.1 (no compiled ops: the backbones used here
call none, so a stand-in ``mmcv._ext`` lets the packages import). Installed apart from the
project, e.g.::

    pip install --no-deps --target /tmp/mm mmengine mmcv-lite==2.1.0 mmdet==3.3.0 mmsegmentation==1.2.2 \\
        mmpretrain==1.2.0 addict yapf termcolor opencv-python-headless rich pygments markdown-it-py mdurl \\
        platformdirs terminaltables shapely pycocotools scipy prettytable wcwidth ftfy regex model-index \\
        ordered-set einops mat4py six importlib_metadata lazy_importer
    PYTHONPATH=/tmp/mm .venv/bin/python scripts/make_openmmlab_fixtures.py

Writes ``tests/fixtures/openmmlab_keys.json`` (each full-size backbone / classifier: key -> shape)
and ``tests/fixtures/openmmlab_outputs.json`` (small models with seeded weights and their outputs
computed by the OpenMMLab model). It checks on the way that every converted state dict loads and
gives timm's outputs, so a wrong mapping fails here first.
"""
import importlib
import json
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'tests'))
from openmmlab_cases import (KEY_CASES, KEYS_FILE, OUTPUT_CASES, OUTPUTS_FILE, build_timm, seeded_input,  # noqa: E402
                             seeded_state, timm_output)

from scalekd.tools.transfer.openmmlab import from_openmmlab, to_openmmlab  # noqa: E402


STORED = 2048  # leading output values kept per case


def _no_compiled_ops() -> None:
    def missing(name):
        if name.startswith('__'):
            raise AttributeError(name)
        return lambda *a, **k: None
    ext = types.ModuleType('mmcv._ext')
    ext.__getattr__ = missing
    sys.modules['mmcv._ext'] = ext


class Classifier(torch.nn.Module):
    """backbone + head, as mmpretrain's ImageClassifier names and runs them."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x):
        feats = self.backbone(x)  # the GlobalAveragePooling neck where the backbone does not pool
        return self.head(tuple(f.mean(dim=tuple(range(2, f.dim()))) if f.dim() > 2 else f for f in feats))


def build(spec, name_full: bool = False):
    """An OpenMMLab module from ('package.Class', kwargs[, (head class, in_channels)])."""
    path, kwargs = spec[0], spec[1]
    package, cls = path.split('.')
    module = getattr(importlib.import_module(f'{package}.models.backbones'), cls)(**kwargs)
    if len(spec) == 3:
        head_cls, channels = spec[2]
        head = getattr(importlib.import_module('mmpretrain.models.heads'), head_cls)(num_classes=1000 if name_full else 5, in_channels=channels)
        module = Classifier(module, head)
    module.eval()  # mmdet's ResNet.train() returns None
    return module


def shapes(module) -> dict:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def key_lists() -> dict:
    out = {}
    for name, (toolkit, timm_name, kwargs, spec) in KEY_CASES.items():
        out[name] = shapes(build(spec, name_full=True))
        print(f'{name}: {len(out[name])} keys')
    return out


def last_features(module, x):
    out = module(x)
    return out[-1] if isinstance(out, (tuple, list)) else out


def outputs() -> dict:
    out = {}
    for name, (toolkit, timm_name, kwargs, spec, input_shape) in OUTPUT_CASES.items():
        mm = build(spec)
        timm_model = build_timm(timm_name, kwargs, input_shape[-1])
        x = seeded_input(input_shape)
        if toolkit == 'mmcls':  # import: seeded OpenMMLab weights -> timm
            mm_shapes = shapes(mm)
            state = seeded_state(mm_shapes)
            missing, unexpected = mm.load_state_dict(state, strict=False)
            assert not unexpected and all(k.endswith('relative_position_index') for k in missing), (missing, unexpected)
            timm_model.load_state_dict(from_openmmlab(timm_model, state))
            record = dict(shapes=mm_shapes)
        else:  # export: seeded timm weights -> OpenMMLab
            timm_shapes = shapes(timm_model)
            timm_model.load_state_dict(seeded_state(timm_shapes))
            missing, unexpected = mm.load_state_dict(to_openmmlab(timm_model, toolkit), strict=False)
            assert not unexpected and all(k.startswith('norm') for k in missing), (missing, unexpected)
            record = dict(shapes=timm_shapes)
        with torch.no_grad():
            y = last_features(mm, x)
        got = timm_output(timm_model, toolkit, x, y.shape)
        err = (got - y).abs().max().item()
        print(f'{name}: output {tuple(y.shape)} (std {y.std():.3g}), timm differs by {err:.2e}')
        assert err < 1e-4, name
        out[name] = dict(record, output_shape=list(y.shape), output=[round(v, 7) for v in y.flatten()[:STORED].tolist()])
    return out


def main() -> int:
    _no_compiled_ops()
    torch.manual_seed(0)
    KEYS_FILE.parent.mkdir(parents=True, exist_ok=True)
    KEYS_FILE.write_text(json.dumps(key_lists(), indent=0, sort_keys=True) + '\n')
    OUTPUTS_FILE.write_text(json.dumps(outputs(), separators=(',', ':'), sort_keys=True) + '\n')
    print(f'wrote {KEYS_FILE} and {OUTPUTS_FILE}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
