"""Write configs/demo/{cnn,mlp,vit}-{alone,kd,scalekd}.yaml: the demo's student runs as plain configs.

Each holds the values of the config ``scalekd demo`` trains that differ from the defaults
(tests/test_demo_configs.py checks they agree, apart from the console logging the demo turns off),
with the shipped teacher's weights given relative to the repository root. Run from the repository root.
"""
from pathlib import Path

import yaml

from scalekd.engine.inputs.config import RunConfig, config_to_dict
from scalekd.tools.demo import METHOD_LABELS, STUDENTS, DemoSettings, run_config

TEACHER = 'src/scalekd/assets/fashion_mnist_vit_teacher/model.safetensors'
WHAT = {'none': 'alone (no teacher)', 'kd': 'with logit KD from the shipped ViT teacher',
        'scalekd': 'with ScaleKD from the shipped ViT teacher'}


def _differences(values: dict, defaults: dict) -> dict:
    """The entries of ``values`` that differ from ``defaults``, section by section."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(defaults.get(key), dict) and not key.endswith('kwargs'):
            value = _differences(value, defaults[key])
            if value:
                out[key] = value
        elif value != defaults.get(key):
            out[key] = value
    return out


def demo_configs():
    """(file name, header comment, config dict) of every demo student run."""
    settings = DemoSettings(teacher_weights=TEACHER)
    for student in STUDENTS:
        for method, label in METHOD_LABELS.items():
            header = (f'# The demo\'s {student.upper()} student ({STUDENTS[student]["model"]}) trained {WHAT[method]}\n'
                      f'# on {settings.subset} Fashion-MNIST images (scalekd demo\'s recipe). Made by '
                      f'scripts/make_demo_configs.py.\n')
            cfg = config_to_dict(run_config(settings, student, method))
            cfg['log'] = dict(cfg['log'], console=True)
            minimal = _differences(cfg, config_to_dict(RunConfig()))
            minimal.setdefault('distill', dict(method=method))  # said even where it is the default
            yield f'{student}-{label}.yaml', header, minimal


if __name__ == '__main__':
    for name, header, cfg in demo_configs():
        path = Path('configs/demo') / name
        path.write_text(header + yaml.safe_dump(cfg, sort_keys=False))
        print(path)
