"""``scalekd demo``: the offline quick start on Fashion-MNIST.

The shipped ViT teacher (trained by ``scalekd train configs/demo/teacher_vit.yaml`` on all 60,000
training images) guides tiny CNN, MLP-Mixer and ViT students trained from scratch on a fixed subset
of the training split, the paper's "knowledge density" setting. Each student is trained alone and with
ScaleKD (and with logit KD only, ``baselines=True``) by the project's own :class:`~scalekd.engine.loop.trainer.Trainer`;
every run keeps its folder (config, metrics, checkpoints, ``result.json``), and the demo writes
``results.json``, a table and a plot of test top-1 per epoch. A run that finished is reused by the next
demo on the same output (after a stop, the same command trains the rest), as ``scalekd ablate`` does.
"""
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader

from ..adapters.models import create_timm_model
from ..engine.inputs.config import RunConfig, config_from_dict, config_to_dict, validate_config
from ..engine.inputs.data import build_datasets
from ..engine.runtime.devices import resolve_device
from ..engine.runtime.distributed import DistEnv
from ..engine.errors import UserError
from ..engine.runtime.precision import resolve_precision
from ..engine.run_folder.files import holding
from ..engine.loop.run_logger import write_text_atomic
from ..engine.loop.evaluation import evaluate
from ..engine.loop.trainer import Trainer
from ..engine.inputs.weights import load_weights
from .plots import plot_curves

__all__ = ['DemoSettings', 'STUDENTS', 'DEMO_TEACHERS', 'DEFAULT_TEACHER', 'TEACHER', 'TEACHER_WEIGHTS', 'METHOD_LABELS',
           'demo_teacher', 'run_config', 'run_demo', 'format_table', 'load_teacher', 'teacher_top1', 'test_loader',
           'train_and_test', 'decisive', 'earlier_result']

ASSETS = Path(__file__).parents[1] / 'assets'
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
# the demo's teachers: the folder `scalekd export --dtype float16` wrote (model.safetensors, timm's config.json
# that gives the architecture) and the config `scalekd train` trained it from (on all 60,000 training images,
# or on 2,000 / 6,000 of them for the teacher_scale study's weaker teachers)
DEMO_TEACHERS: Dict[str, Dict[str, Any]] = {
    'vit': dict(asset=ASSETS / 'fashion_mnist_vit_teacher', config='configs/demo/teacher_vit.yaml'),
    'vit_2k': dict(asset=ASSETS / 'fashion_mnist_vit_2k_teacher', config='configs/demo/teacher_vit_2k.yaml'),
    'vit_6k': dict(asset=ASSETS / 'fashion_mnist_vit_6k_teacher', config='configs/demo/teacher_vit_6k.yaml'),
    'cnn': dict(asset=ASSETS / 'fashion_mnist_cnn_teacher', config='configs/demo/teacher_cnn.yaml'),
}
DEFAULT_TEACHER = 'vit'
_SET_BY_THE_DEMO = ('num_classes', 'in_chans', 'img_size', 'global_pool')  # its data's; the model's default pooling


def demo_teacher(key: str) -> Dict[str, Any]:
    """The demo teacher ``key`` of :data:`DEMO_TEACHERS`: its timm ``model`` and ``kwargs``, input ``mean`` and
    ``std`` (read from its folder's ``config.json``) and its ``weights``."""
    if key not in DEMO_TEACHERS:
        raise UserError(f'unknown demo teacher {key!r}; choose from {", ".join(DEMO_TEACHERS)}')
    entry = DEMO_TEACHERS[key]
    path = Path(entry['asset']) / 'config.json'
    if not path.is_file():
        raise UserError(f'demo teacher {key!r} is not in {entry["asset"]}: train {entry["config"]} with scalekd train, '
                        f'then scalekd export --dtype float16 its checkpoint into that folder')
    try:
        hf = json.loads(path.read_text())
        kwargs = {k: v for k, v in hf['model_args'].items() if k not in _SET_BY_THE_DEMO}
        return dict(model=hf['architecture'], kwargs=kwargs, mean=tuple(hf['pretrained_cfg']['mean']),
                    std=tuple(hf['pretrained_cfg']['std']), weights=str(Path(entry['asset']) / 'model.safetensors'))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f'{path} is not a timm config.json of an export (architecture, model_args, pretrained_cfg '
                        f'mean / std): {e!r}') from None


TEACHER_WEIGHTS = DEMO_TEACHERS[DEFAULT_TEACHER]['asset'] / 'model.safetensors'
TEACHER: Dict[str, Any] = {k: v for k, v in demo_teacher(DEFAULT_TEACHER).items() if k != 'weights'}  # the shipped one
STUDENTS: Dict[str, Dict[str, Any]] = {
    'cnn': dict(model='resnet10t', kwargs=dict(channels=[32, 64, 128, 256], stem_width=16, output_stride=16)),
    'mlp': dict(model='mixer_t7', kwargs={}),
    'vit': dict(model='vit_tiny_patch16_224', kwargs=dict(patch_size=7, embed_dim=96, depth=4, num_heads=3)),
}
METHOD_LABELS = {'none': 'alone', 'kd': 'kd', 'scalekd': 'scalekd'}


@dataclass
class DemoSettings:
    """What the demo trains; ``quick()`` gives the ``--quick`` variant."""
    output: str = 'runs/demo'
    students: Sequence[str] = ('cnn', 'mlp', 'vit')
    subset: int = 800             # training images each student sees (of 60,000)
    epochs: int = 15
    batch_size: int = 32
    lr: float = 2e-3
    test_sample: int = 2000       # test images behind the per-epoch curve (the table uses all of them)
    seed: int = 0
    baselines: bool = False       # also train each student with logit KD only
    data: Optional[str] = None    # folder with the IDX files (else $SCALEKD_DATA, Debian's, download)
    teacher: str = DEFAULT_TEACHER  # the demo teacher (a key of DEMO_TEACHERS)
    teacher_weights: Optional[str] = None  # other weights of that teacher's architecture than its shipped ones
    progress: bool = True         # per-step progress (a bar on a terminal, a line now and then otherwise)
    distill: Dict[str, Any] = field(default_factory=dict)  # extra distill options (w_ori, cap_conv, ...)
    eval_terms: bool = False      # the loss terms on the test sample too (train.eval_terms; ablate: every epoch)
    device: torch.device = field(default_factory=resolve_device)  # CUDA when available, else CPU

    def quick(self) -> 'DemoSettings':
        """The CNN and MLP students on fewer images for fewer epochs: about a third of the default's time."""
        self.students, self.subset, self.epochs, self.test_sample = ('cnn', 'mlp'), 500, 8, 500
        return self

    @property
    def methods(self) -> List[str]:
        return ['none', 'kd', 'scalekd'] if self.baselines else ['none', 'scalekd']

    @property
    def teacher_keys(self) -> List[str]:
        """The demo teachers the students learn from: ``teacher`` split at ``+`` (``vit+cnn``: both at once)."""
        return self.teacher.split('+')

    @property
    def teacher_model(self) -> Dict[str, Any]:
        """The teacher's timm ``model``, ``kwargs``, input ``mean`` / ``std`` and ``checkpoint`` (its weights)."""
        return _teacher_block(self.teacher, self.teacher_weights)


def _teacher_block(key: str, weights: Optional[str] = None) -> Dict[str, Any]:
    """The config block of the demo teacher ``key`` (with other ``weights`` of its architecture if given)."""
    teacher = demo_teacher(key)
    shipped = teacher.pop('weights')
    return dict(teacher, checkpoint=weights or shipped)


def run_config(settings: DemoSettings, student: str, method: str, options: Optional[Dict[str, Any]] = None,
               output: Optional[str] = None) -> RunConfig:
    """The full run config of one demo run (saved in its folder: ``scalekd train`` reruns it). ``options``
    (distillation options) replace the settings' ones; ``output`` the run's folder."""
    s = settings
    options = options if options is not None else s.distill if method == 'scalekd' else {}
    data = dict(dataset='fashion_mnist', root=s.data or '', train_split='train', val_split='test',
                train_subset=s.subset, val_subset=s.test_sample, img_size=28, in_chans=1, num_classes=10,
                mean=list(FASHION_MNIST_MEAN), std=list(FASHION_MNIST_STD), scale=[0.75, 1.0], ratio=[0.9, 1.1],
                hflip=0.5, interpolation='bilinear', crop_pct=1.0, workers=0, val_batch_size=500, check_images=False)
    several = method != 'none' and len(s.teacher_keys) > 1
    teacher = {} if method == 'none' or several else s.teacher_model
    teachers = [dict(_teacher_block(key), name=key) for key in s.teacher_keys] if several else []
    for block in [teacher] + teachers if teacher else teachers:
        block.update(mean=list(block['mean']), std=list(block['std']))
    models = dict(teachers=teachers) if several else dict(teacher=teacher)
    return validate_config(config_from_dict(dict(
        output=output or str(Path(s.output) / f'{student}-{METHOD_LABELS[method]}'), seed=s.seed,
        **models, student=STUDENTS[student],
        distill=dict(options, method=method), data=data,
        optim=dict(opt='adamw', lr=s.lr, weight_decay=0.05, clip_grad=5.0),
        sched=dict(sched='cosine', epochs=s.epochs, warmup_epochs=min(1, s.epochs - 1), min_lr=1e-5),
        train=dict(batch_size=s.batch_size, precision='auto', keep_checkpoints=1, eval_terms=s.eval_terms),
        log=dict(tensorboard=False, progress=None if s.progress else False, console=False)), where='demo settings'),
        'demo settings')


def load_teacher(weights: Optional[str] = None, teacher: str = DEFAULT_TEACHER) -> torch.nn.Module:
    """The demo teacher ``teacher`` (a key of :data:`DEMO_TEACHERS`) with the given weights (default: its
    shipped ones), in eval mode."""
    spec = demo_teacher(teacher)
    model = create_timm_model(spec['model'], (28, 28), role='teacher', num_classes=10, in_chans=1, **spec['kwargs'])
    load_weights(model, weights or spec['weights'], what='demo teacher')
    return model.eval()


def teacher_top1(settings: 'DemoSettings', test: DataLoader, env: DistEnv) -> float:
    """The settings' teacher's top-1 on ``test``, in fp32."""
    model = load_teacher(settings.teacher_model['checkpoint'], settings.teacher)
    return evaluate(model.to(env.device), test, env, 'fp32')['top1']


def test_loader(cfg: RunConfig) -> DataLoader:
    """All 10,000 test images (the per-epoch curve uses a fixed sample of them)."""
    full = dataclasses.replace(cfg.data, train_subset=None, val_subset=None)
    return DataLoader(build_datasets(full, FASHION_MNIST_MEAN, FASHION_MNIST_STD).val, batch_size=500)


def decisive(cfg: RunConfig) -> Dict[str, Any]:
    """What decides a run's result: its config without the logging."""
    return {k: v for k, v in config_to_dict(cfg).items() if k != 'log'}


def earlier_result(cfg: RunConfig) -> Optional[Dict[str, Any]]:
    """The ``result.json`` a finished run left in ``cfg.output``, its ``config`` read as a run config (keys
    added since at their defaults); ``None`` when no run finished there."""
    done = Path(cfg.output) / 'result.json'
    if not done.is_file():
        return None
    result = json.loads(done.read_text())
    return dict(result, config=decisive(config_from_dict(result['config'], where=str(done))))


def train_and_test(cfg: RunConfig, test: DataLoader, env: DistEnv) -> Dict[str, Any]:
    """One demo run: the per-epoch curve on the test sample, the final student on the whole test split;
    the result is also written whole (or not at all) to ``result.json`` in the run's folder."""
    start = time.perf_counter()
    trainer = Trainer(cfg, env, force=True)
    trainer.fit()
    top1 = evaluate(trainer.task.student, test, env, 'fp32')['top1']
    result = dict(top1=top1, curve=[h['val_top1'] for h in trainer.progress.history if 'val_top1' in h],
                  seconds=time.perf_counter() - start, config=decisive(cfg))
    write_text_atomic(Path(cfg.output) / 'result.json', json.dumps(result))
    return result


def _run(cfg: RunConfig, test: DataLoader, env: DistEnv) -> Tuple[Dict[str, Any], bool]:
    """The result of a run of ``cfg``, and whether it is an earlier run's: read back when a run of the
    same config finished in its folder, else trained now."""
    earlier = earlier_result(cfg)
    if earlier is not None and earlier['config'] == decisive(cfg):
        return earlier, True
    return train_and_test(cfg, test, env), False


def run_demo(settings: DemoSettings, say: Callable[[str], None] = print) -> Dict[str, Any]:
    """Train every student alone and with ScaleKD (and KD); write ``results.json`` and ``accuracy.png``."""
    unknown = [s for s in settings.students if s not in STUDENTS]
    if unknown:
        raise UserError(f'unknown demo student(s) {", ".join(unknown)}; choose from {", ".join(STUDENTS)}')
    with holding(settings.output):  # a second command on this output is refused, not met in a run folder
        return _train_demo(settings, say)


def _train_demo(settings: DemoSettings, say: Callable[[str], None]) -> Dict[str, Any]:
    start = time.perf_counter()
    out = Path(settings.output)
    env = DistEnv(device=settings.device)
    test = test_loader(run_config(settings, settings.students[0], 'none'))
    teacher = settings.teacher_model
    weights = teacher.pop('checkpoint')
    top1 = teacher_top1(settings, test, env)
    say(f'teacher {teacher["model"]} ({Path(weights).name}): test top-1 {top1:.2f}')
    say(f'students train in {resolve_precision("auto", env.device)} on {env.device} (precision auto)')
    results: Dict[str, Any] = dict(
        teacher_top1=top1, teacher=dict(teacher, weights=weights),
        settings=dict(subset=settings.subset, epochs=settings.epochs, seed=settings.seed, lr=settings.lr,
                      batch_size=settings.batch_size, test_sample=settings.test_sample, methods=settings.methods,
                      distill=settings.distill, device=str(env.device)),
        students={})
    for name in settings.students:
        row: Dict[str, Any] = dict(model=STUDENTS[name]['model'], curves={}, seconds={})
        for method in settings.methods:
            label = METHOD_LABELS[method]
            run, reused = _run(run_config(settings, name, method), test, env)
            row[f'{label}_top1'], row['curves'][label], row['seconds'][label] = run['top1'], run['curve'], run['seconds']
            took = 'finished earlier, reused' if reused else f'{run["seconds"]:.0f} s'
            say(f'{name} {label}: test top-1 {run["top1"]:.2f} ({took})')
        row['gain'] = row['scalekd_top1'] - row['alone_top1']
        results['students'][name] = row
    results['seconds'] = time.perf_counter() - start
    plot_curves(results, out / 'accuracy.png')
    tmp = out / 'results.json.tmp'
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(out / 'results.json')
    return results


def format_table(results: Dict[str, Any]) -> str:
    """The demo's table, from ``results.json`` content: teacher, each student alone, with ScaleKD, the gain."""
    s = results['settings']
    kd = 'kd' in [METHOD_LABELS[m] for m in s['methods']]
    head = f'{"":<8}{"model":<22}{"alone":>8}' + (f'{"KD":>8}' if kd else '') + f'{"ScaleKD":>9}{"gain":>8}'
    lines = [f'Fashion-MNIST test top-1 (%); students trained from scratch on {s["subset"]:,} of 60,000 '
             f'training images for {s["epochs"]} epochs, seed {s["seed"]}',
             head, f'{"teacher":<8}{results["teacher"]["model"]:<22}{results["teacher_top1"]:>8.2f}'
             '   (trained on all 60,000)']
    for name, row in results['students'].items():
        line = f'{name:<8}{row["model"]:<22}{row["alone_top1"]:>8.2f}'
        if kd:
            line += f'{row["kd_top1"]:>8.2f}'
        lines.append(line + f'{row["scalekd_top1"]:>9.2f}{row["gain"]:>+8.2f}')
    lines.append(f'{results["seconds"]:.0f} s in all')
    return '\n'.join(lines)
