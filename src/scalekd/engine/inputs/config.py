"""Run configuration: plain YAML validated into typed dataclasses.

A config file may start from others with ``base: path.yaml`` (or a list), relative to the
file; later values win and mappings merge. Command-line overrides are dotted
``key=value`` pairs (``train.epochs=3``, values parsed as YAML). An unknown key or a value of
the wrong type is an error that names the key and the file.
"""
import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import yaml

from ...method.errors import OptionError
from ...method.options import DistillOptions
from .config_rules import check_values
from ..errors import ConfigError

__all__ = ['ConfigError', 'ModelConfig', 'TeacherConfig', 'DataConfig', 'OptimConfig', 'SchedConfig', 'TrainConfig',
           'LogConfig', 'RunConfig', 'load_config', 'validate_config', 'config_to_dict', 'save_config']


@dataclass
class ModelConfig:
    """A timm model: name, ``create_model`` kwargs, and where its weights come from.

    Attributes:
        model: timm model name, as ``timm.create_model`` takes it (a pretrained tag allowed); empty for
            no model (the student-alone baseline has no teacher).
        kwargs: extra ``timm.create_model`` keyword arguments (``patch_size``, ``output_stride``, ...).
        pretrained: load the hub weights of the timm name (needs network).
        checkpoint: weights to start from: a local safetensors or torch file (loaded with
            ``weights_only``), a scalekd checkpoint (its EMA student if any) or an export folder.
        mean: teacher only: the per-channel input mean its weights expect, when not its timm
            pretrained cfg's (null: timm's).
        std: teacher only: the per-channel input std, as for ``mean``.
    """
    model: str = ''
    kwargs: Dict[str, Any] = field(default_factory=dict)
    pretrained: bool = False
    checkpoint: Optional[str] = None
    mean: Optional[Tuple[float, ...]] = None
    std: Optional[Tuple[float, ...]] = None


@dataclass
class TeacherConfig(ModelConfig):
    """One of several teachers (``teachers:``): a model as ``teacher`` gives one, and how it teaches.

    Attributes:
        name: its name in loss terms (``{name}/s4_ori``), logs, ``metrics.jsonl`` and ``inspect``;
            required, one per teacher.
        img_size: the size it sees the images at, resized from ``data.img_size`` (antialiased, with its
            own interpolation; its CAPs map the student's grid onto its own); null: ``data.img_size``.
        weight: multiplies each of its feature terms, and its share of the logit-KD target (the mean of
            the labelled teachers' softened distributions, weighted by ``weight``).
        kd: whether its logits teach (null: ``distill.kd``); a headless teacher, or one of other
            classes, cannot.
        tpp: ``true``, ``false`` (its s3 mimicked directly) or ``auto`` (the method's TPP where its last
            stage replays, else off with a warning).
    """
    name: str = ''
    img_size: Optional[int] = None
    weight: float = 1.0
    kd: Optional[bool] = None
    tpp: Union[bool, str] = 'auto'

    @property
    def tpp_option(self) -> Optional[bool]:
        """``tpp`` as the distiller takes it: ``None`` for ``auto``."""
        return None if self.tpp == 'auto' else self.tpp


@dataclass
class DataConfig:
    """Dataset and the augmentation recipe (Table 10).

    Attributes:
        dataset: ``folder`` (class folders under ``root``) or ``fashion_mnist`` (the IDX files under
            ``root``, ``$SCALEKD_DATA`` or Debian's ``/usr/share/datasets/fashion-mnist``).
        root: the data folder; for ``folder`` it holds ``train_split`` and ``val_split``, each with
            one sub-folder of images per class.
        train_split: the sub-folder of ``root`` trained on.
        val_split: the sub-folder of ``root`` evaluated after each epoch.
        train_subset: train on N images drawn once by the run's seed (see ``subset_draw``); null: all.
        val_subset: evaluate on N images of ``val_split``, drawn the same way; null: all.
        subset_draw: ``random`` (any N images) or ``balanced`` (N / classes of each class).
        img_size: training and evaluation resolution in pixels (square).
        in_chans: input channels of both models: 1 reads every image as greyscale, 3 as RGB.
        num_classes: classes of the student (and of a teacher created without hub weights).
        scale: random-resized-crop area range, as fractions of the image.
        ratio: random-resized-crop aspect-ratio range.
        hflip: probability of a horizontal flip.
        color_jitter: colour-jitter strength (0: off).
        auto_augment: timm auto-augment policy, e.g. ``rand-m9-mstd0.5`` (null: off).
        re_prob: random-erasing probability.
        re_mode: random-erasing fill: ``const``, ``rand`` or ``pixel``.
        label_smoothing: label smoothing of the task loss.
        bce_loss: binary cross entropy as the task loss instead of cross entropy.
        mixup: mixup alpha (0: off).
        cutmix: cutmix alpha (0: off).
        interpolation: resize interpolation (``bicubic``, ``bilinear``, ...).
        crop_pct: evaluation centre crop: resize to ``img_size / crop_pct``, then crop ``img_size``.
        mean: per-channel input mean (null: the student's pretrained cfg, else ImageNet's; the RGB
            values averaged for one channel).
        std: per-channel input std, as for ``mean``.
        workers: data-loader worker processes per training process.
        pin_memory: page-locked host memory for the batches, so that their copy to the GPU overlaps
            the step (null: on a CUDA device).
        persistent_workers: keep the loader workers alive from one epoch to the next (their start is
            paid once; they hold their memory in between).
        val_batch_size: evaluation batch per process (null: the training batch per process).
        check_images: decode every image before training and name an unreadable one (null: when
            there are at most 50,000 images).
        skip_unreadable: skip (and count) unreadable images instead of stopping.
    """
    dataset: str = 'folder'
    root: str = ''
    train_split: str = 'train'
    val_split: str = 'val'
    train_subset: Optional[int] = None
    val_subset: Optional[int] = None
    subset_draw: str = 'random'
    img_size: int = 224
    in_chans: int = 3
    num_classes: int = 1000
    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    color_jitter: float = 0.0
    auto_augment: Optional[str] = None
    re_prob: float = 0.0
    re_mode: str = 'pixel'
    label_smoothing: float = 0.0
    bce_loss: bool = False
    mixup: float = 0.0
    cutmix: float = 0.0
    interpolation: str = 'bicubic'
    crop_pct: float = 0.875
    mean: Optional[Tuple[float, ...]] = None
    std: Optional[Tuple[float, ...]] = None
    workers: int = 4
    pin_memory: Optional[bool] = None
    persistent_workers: bool = False
    val_batch_size: Optional[int] = None
    check_images: Optional[bool] = None
    skip_unreadable: bool = False


@dataclass
class OptimConfig:
    """timm ``create_optimizer_v2`` arguments; no weight decay on norms, biases, embeddings.

    Attributes:
        opt: optimizer name timm knows (``sgd``, ``adamw``, ``lamb``, ``lookahead_adamw``, ...).
        lr: peak learning rate.
        weight_decay: weight decay (not applied to norms, biases and embeddings).
        momentum: momentum of SGD-like optimizers.
        clip_grad: clip the gradient norm to this value (null: no clipping; on unscaled gradients
            under fp16).
    """
    opt: str = 'sgd'
    lr: float = 0.1
    weight_decay: float = 1e-4
    momentum: float = 0.9
    clip_grad: Optional[float] = None


@dataclass
class SchedConfig:
    """timm ``create_scheduler_v2`` arguments, stepped per update.

    Attributes:
        sched: learning-rate schedule timm knows (``cosine``, ``step``, ``multistep``, ...).
        epochs: training epochs.
        decay_milestones: epochs at which ``multistep`` multiplies the rate by ``decay_rate``.
        decay_epochs: epochs between decays of ``step``.
        decay_rate: the factor of each ``step`` / ``multistep`` decay.
        warmup_epochs: epochs of linear warm-up from ``warmup_lr``.
        warmup_lr: learning rate at the start of the warm-up.
        min_lr: the lowest rate the schedule reaches.
    """
    sched: str = 'cosine'
    epochs: int = 100
    decay_milestones: List[int] = field(default_factory=lambda: [30, 60, 90])
    decay_epochs: float = 30
    decay_rate: float = 0.1
    warmup_epochs: int = 0
    warmup_lr: float = 1e-6
    min_lr: float = 0.0


@dataclass
class TrainConfig:
    """Batch, precision and speed switches.

    Attributes:
        batch_size: the global batch: over all processes and accumulation steps.
        accum_steps: micro-batches accumulated per optimizer update.
        precision: ``fp32``, ``bf16``, ``fp16``, or ``auto`` (bf16 where the hardware runs it fast,
            fp16 with a grad scaler on older GPUs, else fp32).
        teacher_precision: the teacher forward's own precision (same choices); null: the run's.
        channels_last: images and models in channels-last memory format.
        compile: ``torch.compile`` the teacher's feature extraction and last stage and each piece of
            the trainable module.
        zero: shard the optimizer state over the processes (ZeRO-1); checkpoints are sharded too: each
            process writes its shard into ``checkpoint-*.pth.optim/`` beside the checkpoint file.
        ema: keep an exponential moving average of the student (evaluated and exported too).
        ema_decay: decay of the EMA.
        eval_every: evaluate every N epochs (and after the last).
        eval_terms: each evaluation also averages the loss terms over the validation images
            (``val_<term>`` and ``val_total_loss`` in the metrics): the feature terms on held-out
            images, at the cost of a teacher forward per validation image.
        keep_checkpoints: newest checkpoints of the run kept (0: all; ``best.pth`` is kept apart).
        checkpoint_every_steps: also checkpoint within epochs, every N optimizer steps (0: at epoch
            ends only).
        max_nan_skips: batches with a non-finite loss that may be skipped before the run stops.
        deterministic: deterministic algorithms (with the seed: bit-identical CPU runs).
        dist_timeout_s: seconds a collective may wait on another process before the run fails: a process
            that is stopped (SIGSTOP, a suspended job) or hung stalls every other one this long (the
            default 1800 is 30 minutes); one that dies ends the others at once.
        tf32: TF32 for fp32 matmuls and cuDNN convolutions on Ampere and newer GPUs (faster, with a
            10-bit mantissa); false: full fp32. No effect on CPU.
        cudnn_benchmark: cuDNN times its convolution algorithms on the first batches and keeps the
            fastest for the run's fixed image size (off under ``deterministic``).
        sync_bn: under DDP on GPUs, the student's BatchNorm layers normalise over the batch of every
            process (SyncBatchNorm, as the release trained); no effect on one process or on CPU.
    """
    batch_size: int = 256
    accum_steps: int = 1
    precision: str = 'fp32'
    teacher_precision: Optional[str] = None
    channels_last: bool = False
    compile: bool = False
    zero: bool = False
    ema: bool = False
    ema_decay: float = 0.9999
    eval_every: int = 1
    eval_terms: bool = False
    keep_checkpoints: int = 2
    checkpoint_every_steps: int = 0
    max_nan_skips: int = 0
    deterministic: bool = False
    dist_timeout_s: int = 1800
    tf32: bool = True
    cudnn_benchmark: bool = True
    sync_bn: bool = True


@dataclass
class LogConfig:
    """Where and how progress is reported.

    Attributes:
        tensorboard: write TensorBoard events under ``tensorboard/`` of the output folder.
        wandb: log to Weights & Biases (needs the ``wandb`` package).
        wandb_project: the W&B project.
        progress: per-step progress on standard error; null: a bar on a terminal, otherwise (Slurm,
            ``nohup``, a file) a line every 30 s and at each epoch's last step; true / false force a bar or nothing.
        console: log lines on stdout too (``train.log`` always has them).
        interval: optimizer steps between train lines in ``metrics.jsonl`` (step 1 always).
    """
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = 'scalekd'
    progress: Optional[bool] = None
    console: bool = True
    interval: int = 50


@dataclass
class RunConfig:
    """One training run: models, distillation, data, optimisation and logging.

    Attributes:
        output: the run's folder (config, logs, metrics, checkpoints).
        seed: seed of the weights, the data order and every augmentation.
        teacher: the frozen teacher.
        teachers: several frozen teachers, each with a name, its own image size, weight, kd and tpp
            (instead of ``teacher``, not with it); the student learns from all of them at once.
        student: the student, trained from scratch unless ``student.checkpoint`` is set.
        distill: the distillation method and its options.
        data: the dataset and its augmentation.
        optim: the optimizer.
        sched: the learning-rate schedule.
        train: batch, precision, checkpoints and speed switches.
        log: where progress is reported.
    """
    output: str = 'runs/default'
    seed: int = 0
    teacher: ModelConfig = field(default_factory=ModelConfig)
    teachers: Optional[List[TeacherConfig]] = None
    student: ModelConfig = field(default_factory=ModelConfig)
    distill: DistillOptions = field(default_factory=DistillOptions)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def distill_options(self) -> DistillOptions:
        """The ``distill`` section, resolved against its method's defaults."""
        return self.distill.resolve()

    def teacher_configs(self) -> List[TeacherConfig]:
        """The run's teachers: ``teachers``, or the ``teacher`` block as one named ``teacher`` (none
        when it has no model)."""
        if self.teachers is not None:
            return list(self.teachers)
        if not self.teacher.model:
            return []
        return [TeacherConfig(**{f.name: getattr(self.teacher, f.name) for f in fields(ModelConfig)}, name='teacher')]


def _merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        twice = sorted({str(k) for k in keys if keys.count(k) > 1})
        if twice:
            raise yaml.constructor.ConstructorError(None, None, f'key {", ".join(twice)} is given twice',
                                                    node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path, seen: Tuple[Path, ...] = ()) -> Dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f'config file {path} does not exist')
    if path.resolve() in seen:
        raise ConfigError(f'config {path} includes itself through base:')
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f'config {path} is not valid YAML: {" ".join(str(e).split())}') from None
    if not isinstance(data, dict):
        raise ConfigError(f'config {path} must be a mapping at the top level')
    bases = data.pop('base', None) or []
    merged: Dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = _merge(merged, _read_yaml(path.parent / base, seen + (path.resolve(),)))
    return _merge(merged, data)


def _type_name(tp) -> str:
    return getattr(tp, '__name__', None) or str(tp).replace('typing.', '')


_FLOAT = re.compile(r'[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?')


def _coerce(value: Any, tp, key: str, where: str) -> Any:
    """Check ``value`` against the type hint ``tp``; ints are accepted for floats, lists for tuples."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key, where)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f'{key} in {where} must be a mapping, got {value!r}')
        return _build(tp, value, key, where)
    if origin in (list, tuple, List, Tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f'{key} in {where} must be a list, got {value!r}')
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f'{key} in {where} must have {len(args)} items, got {value!r}')
            return tuple(_coerce(v, a, key, where) for v, a in zip(value, args))
        item = args[0] if args else Any
        items = [_coerce(v, item, f'{key}[{i}]' if dataclasses.is_dataclass(item) else key, where)
                 for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f'{key} in {where} must be a mapping, got {value!r}')
        return dict(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 1e-3 (no dot, no exponent sign) as a string
    if tp is int and isinstance(value, bool):
        raise ConfigError(f'{key} in {where} must be int, got {value!r}')
    if isinstance(value, tp):
        return value
    raise ConfigError(f'{key} in {where} must be {_type_name(tp)}, got {type(value).__name__} {value!r}')


def _build(cls, data: Dict[str, Any], prefix: str, where: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f'{prefix}.{key}' if prefix else key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f'; did you mean {close[0]!r}?' if close else f'; valid keys: {", ".join(names)}'
            raise ConfigError(f'unknown config key {full!r} in {where}{hint}')
        kwargs[key] = _coerce(value, hints[key], full, where)
    return cls(**kwargs)


def parse_key_value(item: str, flag: str) -> Tuple[str, Any]:
    """``'a.b=[1, 2]'`` given to ``flag`` -> ``('a.b', [1, 2])``: the value is read as YAML."""
    key, sep, raw = item.partition('=')
    if not sep or not key.strip():
        raise ConfigError(f'{flag} expects KEY=VALUE, got {item!r}')
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f'{flag} {item!r}: the value is not valid YAML ({str(e).splitlines()[0]})') from None


def _apply_override(data: Dict[str, Any], override: str) -> None:
    key, value = parse_key_value(override, '-o')
    node = data
    parts = key.split('.')
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f'override {override!r}: {part!r} is not a section')
    node[parts[-1]] = value


def load_config(path: Union[str, Path], overrides: Optional[List[str]] = None) -> RunConfig:
    """Read, merge, override and validate a run config; the distill section is checked too."""
    path = Path(path)
    data = _read_yaml(path)
    for override in overrides or []:
        _apply_override(data, override)
    where = f'{path} (with overrides)' if overrides else str(path)
    return validate_config(_build(RunConfig, data, '', where), where)


def validate_config(cfg: RunConfig, where: str) -> RunConfig:
    """``cfg`` once every value is in its range (:mod:`scalekd.engine.inputs.config_rules`) and the distill section
    resolves; else a :class:`ConfigError` naming the key, ``where`` and what is allowed."""
    check_values(cfg, where, ConfigError)
    try:
        cfg.distill_options()
    except OptionError as e:
        raise ConfigError(f'distill section of {where}: {e}') from None
    return cfg


def config_to_dict(cfg: RunConfig) -> Dict[str, Any]:
    """The config as plain YAML-able data (tuples as lists)."""
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(cfg))


def save_config(cfg: RunConfig, path: Union[str, Path]) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def config_from_dict(data: Dict[str, Any], where: str = 'checkpoint') -> RunConfig:
    """Validate a resolved config stored in a checkpoint."""
    return _build(RunConfig, data, '', where)
