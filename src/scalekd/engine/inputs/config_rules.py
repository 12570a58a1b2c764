"""The allowed values of a run config, as data: every rule names its key and what it accepts.

Checked by :func:`check_values` after the types (``config.py``) and before anything is built or
written, so a wrong value is one line naming the key, the file and the allowed range.
"""
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Tuple

from timm.optim import get_optimizer_info, list_optimizers

from ..runtime.precision import PRECISIONS

__all__ = ['Rule', 'RULES', 'check_values', 'DATASETS', 'SCHEDULERS', 'MAX_IMG_SIZE']

DATASETS = ('folder', 'fashion_mnist')
SCHEDULERS = ('cosine', 'tanh', 'step', 'multistep', 'plateau', 'poly', 'rsqrt', 'constant')  # timm's
INTERPOLATIONS = ('bilinear', 'bicubic', 'nearest', 'lanczos', 'box', 'hamming', 'random')
RE_MODES = ('const', 'rand', 'pixel')
MAX_IMG_SIZE = 4096  # one 3 x 4096 x 4096 float32 image is 200 MB before any activation: larger is a typo


@dataclass(frozen=True)
class Rule:
    """``ok(value)`` must hold for the dotted ``key``; ``allowed`` says what it accepts."""
    key: str
    ok: Callable[[Any], bool]
    allowed: str


def _min(low: float) -> Tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= low), f'>= {low:g}'


def _above(low: float) -> Tuple[Callable[[Any], bool], str]:
    return (lambda v: v > low), f'> {low:g}'


def _unit(low_open: bool = False, high_open: bool = False) -> Tuple[Callable[[Any], bool], str]:
    ok = lambda v: (0 < v if low_open else 0 <= v) and (v < 1 if high_open else v <= 1)  # noqa: E731
    return ok, f'in {"(" if low_open else "["}0, 1{")" if high_open else "]"}'


def _one_of(names: Sequence[str]) -> Tuple[Callable[[Any], bool], str]:
    return (lambda v: v in names), f'one of {", ".join(names)}'


def _optional(rule: Tuple[Callable[[Any], bool], str]) -> Tuple[Callable[[Any], bool], str]:
    return (lambda v: v is None or rule[0](v)), f'null or {rule[1]}'


def _ordered(low: float, high: Optional[float]) -> Tuple[Callable[[Any], bool], str]:
    top = '' if high is None else f' <= {high:g}'
    return (lambda v: low < v[0] <= v[1] and (high is None or v[1] <= high)), f'[min, max] with {low:g} < min <= max{top}'


def _weight() -> Tuple[Callable[[Any], bool], str]:
    return _optional(((lambda v: v >= 0), '>= 0 (a negative loss weight pushes the student away from its target)'))


def _base_optimizer(name: str) -> str:
    """The optimizer ``name`` names, without a ``lookahead_`` prefix, in lower case."""
    return name.lower().split('_', 1)[1] if name.lower().startswith('lookahead_') else name.lower()


def _optimizer(name: str) -> bool:
    """A name timm's ``create_optimizer_v2`` knows (optionally ``lookahead_``-prefixed)."""
    return _base_optimizer(name) in list_optimizers()


RULES = tuple(Rule(key, *check) for key, check in (
    ('seed', ((lambda v: 0 <= v < 2 ** 32), f'in [0, {2 ** 32 - 1}] (the seeds NumPy takes)')),
    ('data.dataset', _one_of(DATASETS)),
    ('data.img_size', ((lambda v: 1 <= v <= MAX_IMG_SIZE),
                       f'in [1, {MAX_IMG_SIZE}] (one {MAX_IMG_SIZE} x {MAX_IMG_SIZE} image takes 200 MB as float32 before '
                       f'any activation)')),
    ('data.in_chans', _min(1)),
    ('data.num_classes', _min(2)),
    ('data.train_subset', _optional(_min(1))),
    ('data.val_subset', _optional(_min(1))),
    ('data.subset_draw', _one_of(('random', 'balanced'))),
    ('data.scale', _ordered(0, 1)),
    ('data.ratio', _ordered(0, None)),
    ('data.hflip', _unit()),
    ('data.color_jitter', _min(0)),
    ('data.re_prob', _unit()),
    ('data.re_mode', _one_of(RE_MODES)),
    ('data.label_smoothing', _unit(high_open=True)),
    ('data.mixup', _min(0)),
    ('data.cutmix', _min(0)),
    ('data.interpolation', _one_of(INTERPOLATIONS)),
    ('data.crop_pct', _unit(low_open=True)),
    ('data.workers', _min(0)),
    ('data.val_batch_size', _optional(_min(1))),
    ('optim.opt', ((lambda v: _optimizer(v)), 'an optimizer timm knows (timm.optim.list_optimizers())')),
    ('optim.lr', _above(0)),
    ('optim.weight_decay', _min(0)),
    ('optim.momentum', _unit(high_open=True)),
    ('optim.clip_grad', _optional(_above(0))),
    ('sched.sched', _one_of(SCHEDULERS)),
    ('sched.epochs', _min(1)),
    ('sched.decay_epochs', _above(0)),
    ('sched.decay_rate', _above(0)),
    ('sched.warmup_epochs', _min(0)),
    ('sched.warmup_lr', _min(0)),
    ('sched.min_lr', _min(0)),
    ('train.batch_size', _min(1)),
    ('train.accum_steps', _min(1)),
    ('train.precision', _one_of(PRECISIONS)),
    ('train.teacher_precision', _optional(_one_of(PRECISIONS))),
    ('train.ema_decay', _unit(low_open=True, high_open=True)),
    ('train.eval_every', _min(1)),
    ('train.keep_checkpoints', ((lambda v: v >= 0), '>= 0 (0 keeps every checkpoint)')),
    ('train.checkpoint_every_steps', _min(0)),
    ('train.max_nan_skips', _min(0)),
    ('train.dist_timeout_s', _min(1)),
    ('log.interval', _min(1)),
    ('distill.w_ori', _weight()),
    ('distill.w_alt', _weight()),
    ('distill.alpha', _weight()),
    ('distill.beta', _optional(_unit())),
    ('distill.kd_weight', _unit()),
    ('distill.kd_temperature', _above(0)),
    ('distill.softmax_scale', _above(0)),
    ('distill.s3_heads', _min(1)),
    ('distill.s4_heads', _min(1)),
))


def _finite(value: Any) -> bool:
    """Whether no float in ``value`` (a number or a sequence of them) is infinite or NaN."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return all(not isinstance(v, float) or math.isfinite(v) for v in values)


def _get(cfg: Any, key: str) -> Any:
    for part in key.split('.'):
        cfg = getattr(cfg, part)
    return cfg


def check_values(cfg: Any, where: str, error: Callable[[str], Exception]) -> None:
    """Raise ``error(message)`` for the first value of ``cfg`` outside its rule, an input normalisation
    that is not one value per channel, a warmup that does not end before the run, a Nesterov optimizer
    without momentum, or a sharded optimizer (``train.zero``) asked of one that wraps another."""
    for rule in RULES:
        value = _get(cfg, rule.key)
        if not _finite(value):  # inf passes every lower bound, and the first step's loss is not finite
            raise error(f'{rule.key} in {where} must be a finite number, got {value!r}')
        if not rule.ok(value):
            raise error(f'{rule.key} in {where} must be {rule.allowed}, got {value!r}')
    _check_normalization(cfg, where, error)
    _check_teachers(cfg, where, error)
    if cfg.sched.warmup_epochs >= cfg.sched.epochs:
        raise error(f'sched.warmup_epochs in {where} must be less than sched.epochs ({cfg.sched.epochs}), '
                    f'got {cfg.sched.warmup_epochs}')
    if cfg.optim.momentum == 0 and (get_optimizer_info(_base_optimizer(cfg.optim.opt)).defaults or {}).get('nesterov'):
        raise error(f'optim.momentum in {where} is 0, and optim.opt {cfg.optim.opt!r} is timm\'s Nesterov variant, '
                    f'which needs a momentum > 0: set one, or use optim.opt momentum for SGD without Nesterov')
    if cfg.train.zero and cfg.optim.opt.lower().startswith('lookahead_'):
        raise error(f'train.zero in {where} shards a plain optimizer, and optim.opt {cfg.optim.opt!r} wraps one in '
                    f'Lookahead: set train.zero false or choose an optimizer without lookahead_')


def _check_teachers(cfg: Any, where: str, error: Callable[[str], Exception]) -> None:
    """``teachers``: not with ``teacher``, not empty, each named once, weights finite and >= 0, sizes >= 1,
    ``tpp`` true, false or auto."""
    if cfg.teachers is None:
        return
    if cfg.teacher.model:
        raise error(f'teacher and teachers are both given in {where}: give one teacher in teacher, or several in '
                    f'teachers (a list), not both')
    if not cfg.teachers:
        raise error(f'teachers in {where} is an empty list: give at least one teacher, or remove the key')
    seen = {}
    for i, t in enumerate(cfg.teachers):
        key = f'teachers[{i}]'
        if not t.model:
            raise error(f'{key}.model in {where} is not set')
        if not t.name:
            raise error(f'{key}.name in {where} is not set: each teacher needs a name (its loss terms are '
                        f'<name>/s4_ori, ...)')
        if t.name in seen:
            raise error(f'{key}.name in {where} is {t.name!r}, the name of teachers[{seen[t.name]}] too: each '
                        f'teacher needs its own name')
        seen[t.name] = i
        if not _finite(t.weight) or t.weight < 0:
            raise error(f'{key}.weight in {where} must be a finite number >= 0, got {t.weight!r}')
        if t.img_size is not None and t.img_size < 1:
            raise error(f'{key}.img_size in {where} must be >= 1, got {t.img_size!r}')
        if t.tpp not in (True, False, 'auto'):
            raise error(f'{key}.tpp in {where} must be true, false or auto, got {t.tpp!r}')


def _check_normalization(cfg: Any, where: str, error: Callable[[str], Exception]) -> None:
    """``data``, ``teacher`` and each ``teachers`` entry's ``mean`` / ``std``: given together, one value per
    input channel, stds > 0."""
    channels = cfg.data.in_chans
    sections = {'data': cfg.data, 'teacher': cfg.teacher,
                **{f'teachers[{i}]': t for i, t in enumerate(cfg.teachers or [])}}
    for section, values_of in sections.items():
        mean, std = values_of.mean, values_of.std
        if (mean is None) != (std is None):
            given, missing = ('mean', 'std') if std is None else ('std', 'mean')
            raise error(f'{section}.{given} in {where} is given without {section}.{missing}: give both or neither')
        for key, values in (('mean', mean), ('std', std)):
            if values is not None and not _finite(values):
                raise error(f'{section}.{key} in {where} must be finite on every channel, got {list(values)}')
            if values is not None and len(values) != channels:
                raise error(f'{section}.{key} in {where} must have one value per input channel (data.in_chans: '
                            f'{channels}), got {list(values)}')
        if std is not None and not all(v > 0 for v in std):
            raise error(f'{section}.std in {where} must be > 0 on every channel, got {list(std)}')
