"""Every mistake a user can make gets one line naming the key, file or cause, and exit code 2.

One table over every command: (case, arguments, what the line must say, files that must not exist
afterwards). The config values of ``test_config_values.CASES`` join the table as ``train`` cases. Each
case also checks that no file that existed before it was changed or removed.
"""
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Sequence

import pytest
import torch
from safetensors.torch import save_file

from engine_fixtures import make_fashion_mnist, tiny_config
from scalekd.cli import main
from test_config_values import CASES as VALUE_CASES

pytestmark = pytest.mark.slow  # about 2 minutes: in CI, not in the fast set


@dataclass
class Files:
    """What a case can point at: a tiny run config, its data, a finished run, and damaged files."""
    tmp: Path
    data: Path
    run: Path  # a finished run: checkpoints and best.pth

    @property
    def cfg(self) -> Path:
        return tiny_config(self.tmp, self.data)

    def config_with(self, **sections) -> Path:
        return tiny_config(self.tmp, self.data, **sections)

    def empty(self, name: str = 'empty.pth') -> Path:
        (self.tmp / name).write_bytes(b'')
        return self.tmp / name

    def garbage(self, name: str = 'garbage.pth') -> Path:
        (self.tmp / name).write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
        return self.tmp / name

    def plain(self, name: str = 'plain.pth') -> Path:
        torch.save({'w': torch.ones(2)}, self.tmp / name)
        return self.tmp / name

    def file(self, name: str, text: str = 'x') -> Path:
        (self.tmp / name).write_text(text)
        return self.tmp / name

    def export(self) -> Path:
        assert main(['export', str(self.run / 'best.pth'), '--out', str(self.tmp / 'export')]) == 0
        return self.tmp / 'export'

    def data_copy(self) -> Path:
        return Path(shutil.copytree(self.data, self.tmp / 'data'))


@dataclass
class Case:
    name: str
    args: Callable[[Files], Sequence[str]]
    says: str  # a fragment of the one line ({tmp} is the case's folder)
    absent: Sequence[str] = ('run',)  # paths under tmp that must not exist afterwards


def _one_class(f: Files) -> Sequence[str]:
    data = f.data_copy()
    for split in ('train', 'val'):
        for extra in ('green', 'blue'):
            shutil.rmtree(data / split / extra)
    return ['train', str(tiny_config(f.tmp, data, data=dict(root=str(data), img_size=32, num_classes=2,
                                                                      workers=0, crop_pct=1.0)))]


def _empty_class(f: Files) -> Sequence[str]:
    data = f.data_copy()
    for image in (data / 'train' / 'blue').iterdir():
        image.unlink()
    return ['train', str(tiny_config(f.tmp, data, data=dict(root=str(data), img_size=32, num_classes=3,
                                                                      workers=0, crop_pct=1.0)))]


def _headless_hub_teacher(f: Files) -> Sequence[str]:
    """A pretrained teacher without a classifier (weights as the hub gives DINOv2): logit KD is refused."""
    import timm
    from safetensors.torch import save_file
    kwargs = dict(patch_size=8, embed_dim=64, depth=4, num_heads=2)
    save_file(timm.create_model('vit_tiny_patch16_224', img_size=32, num_classes=0, **kwargs).state_dict(),
              str(f.tmp / 'headless.safetensors'))
    overlay = dict(file=str(f.tmp / 'headless.safetensors'), num_classes=0)
    teacher = dict(model='vit_tiny_patch16_224', pretrained=True, kwargs=dict(kwargs, pretrained_cfg_overlay=overlay))
    return ['train', str(tiny_config(f.tmp, f.data, teacher=teacher))]


def _unreadable_image(f: Files) -> Path:
    data = f.data_copy()
    (data / 'val' / 'red' / '0.png').write_bytes(b'\x89PNG\r\n\x1a\n not an image')
    return data


def _broken_export_config(f: Files) -> Sequence[str]:
    folder = f.export()
    (folder / 'config.json').write_text('{"architecture": ')
    return ['eval', str(folder), '--data', str(f.data / 'val')]


def _truncated_export(f: Files) -> Sequence[str]:
    folder = f.export()
    weights = folder / 'model.safetensors'
    weights.write_bytes(weights.read_bytes()[:500])
    return ['eval', str(folder), '--data', str(f.data / 'val')]


def _pickle_as_safetensors(f: Files) -> Sequence[str]:
    folder = f.export()
    torch.save({'w': torch.ones(1)}, folder / 'model.safetensors')
    return ['eval', str(folder), '--data', str(f.data / 'val')]


def _teacher_of_another_model(f: Files) -> Sequence[str]:
    save_file({'w': torch.ones(2)}, str(f.tmp / 'other.safetensors'))
    return ['train', str(f.config_with(teacher=dict(
        model='vit_tiny_patch16_224', checkpoint=str(f.tmp / 'other.safetensors'),
        kwargs=dict(patch_size=8, embed_dim=64, depth=4, num_heads=2))))]


def _mmcls_without_student(f: Files) -> Sequence[str]:
    torch.save({'state_dict': {'neck.w': torch.ones(1)}}, f.tmp / 'neck.pth')
    return ['import-mmcls', str(f.tmp / 'neck.pth'), '--model', 'resnet18', '--out', str(f.tmp / 'out')]


def _kd_checkpoint(f: Files) -> Sequence[str]:
    state = torch.load(f.run / 'checkpoint-0002.pth', weights_only=True)
    state['config']['distill']['method'] = 'kd'
    torch.save(state, f.tmp / 'kd.pth')
    return ['feature-distance', '--students', str(f.tmp / 'kd.pth'), '--data', str(f.data / 'val'),
            '--out', str(f.tmp / 'fd.png')]


def _train(*overrides: str) -> Callable[[Files], Sequence[str]]:
    return lambda f: ['train', str(f.cfg), *[a for o in overrides for a in ('-o', o)]]


CASES: List[Case] = [Case(f'train {o}', _train(o), says.format(cfg='{tmp}/config.yaml'))
                     for o, says in VALUE_CASES]
CASES += [
    # -- train: the config file and its keys
    Case('train missing config', lambda f: ['train', str(f.tmp / 'nope.yaml')], '{tmp}/nope.yaml does not exist'),
    Case('train config not YAML', lambda f: ['train', str(f.file('bad.yaml', 'a: [1,\n'))], 'bad.yaml is not valid YAML'),
    Case('train key twice', lambda f: ['train', str(f.file('twice.yaml', 'seed: 1\nseed: 2\n'))],
         'key seed is given twice'),
    Case('train unknown key', _train('train.batchsize=3'), "unknown config key 'train.batchsize'"),
    Case('train override without =', _train('nonsense'), "-o expects KEY=VALUE, got 'nonsense'"),
    Case('train override not YAML', _train('optim.lr=[1,'), 'the value is not valid YAML'),
    Case('train string for a number', _train('train.batch_size=abc'), "train.batch_size in {tmp}/config.yaml "
                                                                      "(with overrides) must be int, got str 'abc'"),
    Case('train unknown student', _train('student.model=resnet5O'),
         "unknown student model 'resnet5O': timm has no architecture 'resnet5O'; did you mean resnet50"),
    Case('train misspelled student kwarg', _train('student.kwargs.layerz=[1,1,1,1]'),
         "student model 'resnet18' does not take 'layerz' (its kwargs)"),
    Case('train image size the teacher patches do not tile', _train('data.img_size=36'),
         "image size 36 is not a multiple of the teacher 'vit_tiny_patch16_224' patch size 8"),
    Case('train unknown distill option', _train('distill.betta=0.5'), "unknown config key 'distill.betta'"),
    Case('train fp16 teacher on the CPU', _train('train.teacher_precision=fp16'),
         'train.teacher_precision fp16: fp16 autocast needs a CUDA device; use bf16 on CPU'),
    Case('train resume and force', lambda f: ['train', str(f.cfg), '--resume', 'auto', '--force'],
         '--resume and --force contradict each other'),
    # -- train: the output path
    Case('train output is a file', lambda f: ['train', str(f.cfg), '-o', f'output={f.file("taken")}'],
         'cannot be a folder: {tmp}/taken is a file', absent=()),
    Case('train output under a file', lambda f: ['train', str(f.cfg), '-o', f'output={f.file("taken")}/run'],
         'cannot be a folder: {tmp}/taken is a file', absent=('taken/run',)),
    Case('train output is the current folder', _train('output=.'), "output '.'", absent=()),
    # -- train: resume from a wrong file
    Case('train resume from an empty file', lambda f: ['train', str(f.cfg), '--resume', str(f.empty())],
         'empty.pth is empty (0 bytes)'),
    Case('train resume from a plain state dict', lambda f: ['train', str(f.cfg), '--resume', str(f.plain())],
         'plain.pth is not a scalekd training checkpoint'),
    Case('train resume from garbage', lambda f: ['train', str(f.cfg), '--resume', str(f.garbage())],
         'garbage.pth cannot be loaded safely'),
    Case('train resume from a missing file', lambda f: ['train', str(f.cfg), '--resume', str(f.tmp / 'gone.pth')],
         'gone.pth does not exist'),
    # -- train: data
    Case('train missing data root', _train('data.root=/nowhere/data'), 'data folder /nowhere/data/train does not exist'),
    Case('train headless hub teacher with logit KD', _headless_hub_teacher,
         'logit KD cannot be used: the teacher vit_tiny_patch16_224 (VisionTransformer) has no classifier'),
    Case('train one class for two', _one_class, 'has 1 classes but data.num_classes is 2'),
    Case('train empty class folder', _empty_class, 'blue holds no images'),
    Case('train unreadable image', lambda f: ['train', str(tiny_config(f.tmp, _unreadable_image(f), data=dict(
        root=str(f.tmp / 'data'), img_size=32, num_classes=3, workers=0, crop_pct=1.0)))], 'unreadable image'),
    Case('train subset larger than the data', _train('data.train_subset=1000'),
         'a subset of 1000 images cannot be drawn from 24'),
    # -- train: teacher weights
    Case('train teacher weights missing', _train('teacher.checkpoint=/nowhere/t.pth'), '/nowhere/t.pth does not exist'),
    Case('train teacher weights empty', lambda f: ['train', str(f.cfg), '-o', f'teacher.checkpoint={f.empty()}'],
         'empty.pth is empty (0 bytes)'),
    Case('train teacher weights of another model', _teacher_of_another_model, 'does not fit the teacher'),
    Case('train --dry-run teacher weights of another model', lambda f: [*_teacher_of_another_model(f), '--dry-run'],
         'does not fit the teacher'),
    # -- eval
    Case('eval missing checkpoint', lambda f: ['eval', str(f.tmp / 'gone.pth'), '--data', str(f.data / 'val')],
         'gone.pth does not exist', absent=()),
    Case('eval empty checkpoint', lambda f: ['eval', str(f.empty()), '--data', str(f.data / 'val')],
         'empty.pth is empty (0 bytes)', absent=()),
    Case('eval garbage checkpoint', lambda f: ['eval', str(f.garbage()), '--data', str(f.data / 'val')],
         'garbage.pth cannot be loaded safely', absent=()),
    Case('eval plain state dict', lambda f: ['eval', str(f.plain()), '--data', str(f.data / 'val')],
         'plain.pth holds plain weights', absent=()),
    Case('eval missing data', lambda f: ['eval', str(f.run / 'best.pth'), '--data', str(f.tmp / 'nodata')],
         'data folder {tmp}/nodata does not exist', absent=()),
    Case('eval other classes', lambda f: ['eval', str(f.run / 'best.pth'), '--data',
                                          str(make_fashion_mnist(f.tmp / 'fm'))],
         'has 10 classes but the student predicts 3', absent=()),
    Case('eval broken export config', _broken_export_config, 'config.json is not valid JSON', absent=()),
    Case('eval truncated export weights', _truncated_export, 'model.safetensors is not a readable safetensors file',
         absent=()),
    Case('eval pickle as safetensors', _pickle_as_safetensors, 'model.safetensors is not a readable safetensors file',
         absent=()),
    Case('eval unreadable image', lambda f: ['eval', str(f.run / 'best.pth'), '--data',
                                             str(_unreadable_image(f) / 'val')], 'unreadable image', absent=()),
    # -- export
    Case('export empty checkpoint', lambda f: ['export', str(f.empty()), '--out', str(f.tmp / 'out')],
         'empty.pth is empty (0 bytes)', absent=('out',)),
    Case('export garbage checkpoint', lambda f: ['export', str(f.garbage()), '--out', str(f.tmp / 'out')],
         'garbage.pth cannot be loaded safely', absent=('out',)),
    Case('export an export', lambda f: ['export', str(f.export()), '--out', str(f.tmp / 'out')],
         'is an export already', absent=('out',)),
    Case('export onto a file', lambda f: ['export', str(f.run / 'best.pth'), '--out', str(f.file('taken'))],
         'cannot be a folder: {tmp}/taken is a file', absent=()),
    Case('export under a file', lambda f: ['export', str(f.run / 'best.pth'), '--out', str(f.file('taken')) + '/x'],
         'cannot be a folder: {tmp}/taken is a file', absent=('taken/x',)),
    Case('export into the current folder', lambda f: ['export', str(f.run / 'best.pth'), '--out', '.'],
         "output '.' is {tmp}", absent=('model.safetensors',)),
    # -- import-mmcls
    Case('import-mmcls missing file', lambda f: ['import-mmcls', str(f.tmp / 'gone.pth'), '--model', 'resnet18',
                                                 '--out', str(f.tmp / 'out')], 'gone.pth does not exist',
         absent=('out',)),
    Case('import-mmcls garbage', lambda f: ['import-mmcls', str(f.garbage()), '--model', 'resnet18',
                                            '--out', str(f.tmp / 'out')], 'garbage.pth cannot be loaded safely',
         absent=('out',)),
    Case('import-mmcls empty', lambda f: ['import-mmcls', str(f.empty()), '--model', 'resnet18',
                                          '--out', str(f.tmp / 'out')], 'empty.pth is empty (0 bytes)',
         absent=('out',)),
    Case('import-mmcls no student', _mmcls_without_student, 'no mmcls student in this file', absent=('out',)),
    # -- demo
    Case('demo unknown student', lambda f: ['demo', '--students', 'cnn,rnn', '--output', str(f.tmp / 'demo')],
         'unknown demo student(s) rnn', absent=('demo',)),
    Case('demo teacher weights missing', lambda f: ['demo', '--teacher-weights', str(f.tmp / 'gone.safetensors'),
                                                    '--output', str(f.tmp / 'demo'), '--data',
                                                    str(make_fashion_mnist(f.tmp / 'fm'))],
         'gone.safetensors does not exist', absent=('demo',)),
    # -- inspect
    Case('inspect unknown teacher', lambda f: ['inspect', '--teacher', 'swin_lage_patch4_window7_224',
                                               '--student', 'resnet18'],
         "timm has no architecture 'swin_lage_patch4_window7_224'; did you mean swin_large_patch4_window7_224", absent=()),
    Case('inspect unknown option', lambda f: ['inspect', '--teacher', 'vit_tiny_patch16_224', '--student',
                                              'resnet18', '--option', 'betta=1'],
         'unknown distillation option(s) betta; valid options: activation_checkpointing', absent=()),
    Case('inspect option without =', lambda f: ['inspect', '--teacher', 'vit_tiny_patch16_224', '--student',
                                                'resnet18', '--option', 'beta'], "--option expects KEY=VALUE",
         absent=()),
    # -- analysis
    Case('spectrum unknown model', lambda f: ['spectrum', '--model', 'resnet5O', '--data', str(f.data / 'val'),
                                              '--out', str(f.tmp / 's.png')], "unknown timm model 'resnet5O'",
         absent=('s.png',)),
    Case('spectrum plain weights without a name', lambda f: ['spectrum', '--checkpoint', str(f.plain()), '--data',
                                                             str(f.data / 'val'), '--out', str(f.tmp / 's.png')],
         'plain.pth holds plain weights', absent=('s.png',)),
    Case('linear-probe hub weights offline', lambda f: ['linear-probe', '--model', 'resnet18', '--train',
                                                        str(f.data / 'train'), '--val', str(f.data / 'val')],
         "cannot load the hub weights of the model 'resnet18'", absent=()),
    Case('linear-probe missing data', lambda f: ['linear-probe', '--checkpoint', str(f.run / 'best.pth'), '--train',
                                                 str(f.tmp / 'nodata'), '--val', str(f.data / 'val')],
         'data folder {tmp}/nodata does not exist', absent=()),
    Case('feature-distance of best.pth', lambda f: ['feature-distance', '--students', str(f.run / 'best.pth'),
                                                    '--data', str(f.data / 'val'), '--out', str(f.tmp / 'fd.png')],
         'holds the student alone', absent=('fd.png',)),
    Case('feature-distance of a KD run', _kd_checkpoint, 'has no projector', absent=('fd.png',)),
]


def _snapshot(folder: Path):
    return {p: p.read_bytes() for p in folder.rglob('*') if p.is_file()}


@pytest.mark.parametrize('case', CASES, ids=[c.name for c in CASES])
def test_a_mistake_is_one_line_and_exit_code_2(case, tmp_path, data_root, straight, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    files = Files(tmp_path, data_root, straight)
    args = [str(a) for a in case.args(files)]
    capsys.readouterr()  # what building the inputs printed
    before = {**_snapshot(tmp_path), **_snapshot(straight), **_snapshot(data_root)}
    assert main(args) == 2, args
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'Traceback' not in err and 'weights_only=False' not in err, err
    assert case.says.format(tmp=tmp_path) in err, err
    for path in case.absent:
        assert not (tmp_path / path).exists(), path
    after = {**_snapshot(tmp_path), **_snapshot(straight), **_snapshot(data_root)}
    assert {p: b for p, b in after.items() if p in before} == before  # nothing that existed was changed or lost


def test_the_table_covers_every_command():
    commands = {c.name.split()[0] for c in CASES}
    assert commands >= {'train', 'eval', 'export', 'import-mmcls', 'demo', 'inspect', 'spectrum', 'linear-probe',
                        'feature-distance'}
    assert len(CASES) >= 60
