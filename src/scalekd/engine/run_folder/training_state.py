"""What a training checkpoint holds of a run, and loading it back into a run's objects: the
progress, the student, the task's own state, optimizer, grad scaler and EMA, every rank's RNG
streams, and which settings a resumed run may change."""
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from timm.utils import ModelEmaV3, random_seed

from ...task.distiller import Distiller, TaskStateMismatchError
from .checkpoint import FORMAT_VERSION, CheckpointError, rng_state, set_rng_state
from ..inputs.config import RunConfig, config_from_dict, config_to_dict
from ..runtime.distributed import DistEnv
from ..errors import RunError
from ..runtime.optimizer import load_optimizer_state, owned_indices
from .optimizer_shards import optimizer_state_of

__all__ = ['Progress', 'Resumed', 'TrainingState', 'best_state', 'changed_settings', 'gather_rng_states',
           'restore_rng_states']


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint (with the epoch's loss sums). A position in an epoch
    counts updates (accumulation windows, skipped ones too): the same global image position on any
    number of processes and accumulation steps."""
    epoch: int = 0     # epochs completed
    updates: int = 0   # updates of the current epoch done (mid-epoch checkpoints)
    step: int = 0      # updates done in all
    best_top1: float = -1.0
    best_top5: float = 0.0
    best_epoch: int = -1
    best_step: int = -1
    nan_skips: int = 0
    history: List[Dict[str, Any]] = field(default_factory=list)

    def forget_best(self) -> None:
        """Track the best epoch afresh from here."""
        self.best_top1, self.best_top5, self.best_epoch, self.best_step = -1.0, 0.0, -1, -1


# settings a resumed run may change without changing what it computes
_RESUME_FREE = ('output', 'log.', 'data.root', 'data.workers', 'data.val_batch_size', 'data.check_images',
                'train.keep_checkpoints', 'train.checkpoint_every_steps', 'train.max_nan_skips',
                'train.dist_timeout_s', 'train.deterministic', 'train.compile', 'train.accum_steps', 'train.zero')


def _flat(data: Dict[str, Any], prefix: str = '') -> Dict[str, Any]:
    out = {}
    for k, v in data.items():
        out.update(_flat(v, f'{prefix}{k}.') if isinstance(v, dict) and k != 'kwargs' else {f'{prefix}{k}': v})
    return out


def changed_settings(old: RunConfig, new: RunConfig) -> List[str]:
    """``key: old -> new`` for each setting of a resumed run that differs from its checkpoint's."""
    a, b = _flat(config_to_dict(old)), _flat(config_to_dict(new))
    return [f'{k}: {a.get(k)!r} -> {b.get(k)!r}' for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not k.startswith(_RESUME_FREE)]


def _model_of(model: str, kwargs: Dict[str, Any]) -> str:
    args = f'({", ".join(f"{k}={v!r}" for k, v in sorted(kwargs.items()))})' if kwargs else ''
    return f'{model}{args}'


def _student_of(cfg: RunConfig) -> str:
    """The student a config builds, as a resume compares it: model (with its kwargs), classes, input channels."""
    kwargs = dict(cfg.student.kwargs)
    classes, channels = kwargs.pop('num_classes', cfg.data.num_classes), kwargs.pop('in_chans', cfg.data.in_chans)
    return f'{_model_of(cfg.student.model, kwargs)} for {classes} classes on {channels} input channel(s)'


def _task_of(cfg: RunConfig) -> str:
    """What shapes a run's projector state beside its student: the teachers (with their kwargs and sizes), the
    method, the size."""
    teachers = cfg.teacher_configs()
    if cfg.teachers is None:
        models = f'teacher {_model_of(cfg.teacher.model, cfg.teacher.kwargs)}'
    else:
        models = 'teachers ' + ', '.join(f'{t.name}={_model_of(t.model, t.kwargs)}'
                                         + (f' at {t.img_size} px' if t.img_size else '') for t in teachers)
    return f'{models}, method {cfg.distill.method} at {cfg.data.img_size} px'


def gather_rng_states(env: DistEnv) -> List[Dict[str, Any]]:
    """Every rank's RNG streams, in rank order (a collective: every rank calls it)."""
    if not env.distributed:
        return [rng_state(env.device)]
    rngs = [None] * env.world_size
    dist.all_gather_object(rngs, rng_state(env.device))
    return rngs


def restore_rng_states(rngs: List[Dict[str, Any]], env: DistEnv, seed: int) -> None:
    """This rank's saved streams; on another number of processes, fresh ones from ``seed`` (data
    order and augmentations carry over through the sampler, not the other streams)."""
    if len(rngs) == env.world_size:
        set_rng_state(rngs[env.rank], env.device)
    else:
        random_seed(seed, env.rank)


def best_state(state: Dict[str, Any]) -> Dict[str, Any]:
    """What eval and export need of a training state (``best.pth``)."""
    return {k: state[k] for k in ('format_version', 'progress', 'student', 'ema', 'config')}


@dataclass
class Resumed:
    """What a checkpoint gives back besides the weights: where the run stands, the epoch's loss sums
    and the updates they count (see :class:`~scalekd.engine.loop.epoch_losses.EpochLosses`), the
    checkpoint's config and RNG streams."""
    progress: Progress
    loss_sums: Dict[str, float]
    loss_updates: int
    config: RunConfig
    rngs: List[Dict[str, Any]]


class TrainingState:
    """The objects of a run that a checkpoint holds, and their state dict."""

    def __init__(self, cfg: RunConfig, task: Distiller, optimizer: torch.optim.Optimizer,
                 scaler: Optional[torch.amp.GradScaler], ema: Optional[ModelEmaV3]):
        self.cfg, self.task, self.optimizer, self.scaler, self.ema = cfg, task, optimizer, scaler, ema

    def checkpoint_bytes(self) -> int:
        """About how many bytes a checkpoint of this run takes: the trainable weights, one or two optimizer
        slots per weight (momentum; Adam's two moments), and the EMA student."""
        def size(tensors) -> int:
            return sum(t.numel() * t.element_size() for t in tensors)
        weights = size(p for p in self.task.trainable_module.parameters() if p.requires_grad)
        group = self.optimizer.param_groups[0]  # (a sharded optimizer's groups hold the hyper-parameters too)
        slots = 2 if 'betas' in group else 1 if group.get('momentum') else 0
        ema = size(self.ema.module.state_dict().values()) if self.ema is not None else 0
        return size(self.task.trainable_module.state_dict().values()) + slots * weights + ema

    def state_dict(self, progress: Progress, loss_sums: Dict[str, float], loss_updates: int,
                   rngs: List[Dict[str, Any]], optimizer_state: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """A checkpoint: ``progress`` with the epoch's loss sums and the updates they count, ``rngs`` of
        every rank, and the optimizer's (``optimizer_state``: the whole state, or a sharded state's
        parameter groups and folder; default: the optimizer's own state dict)."""
        return dict(
            format_version=FORMAT_VERSION,
            progress=dict(dataclasses.asdict(progress), loss_sums=loss_sums, loss_updates=loss_updates),
            world_size=len(rngs),
            student=self.task.student.state_dict(), task_state=self.task.get_task_state(),
            optimizer=optimizer_state if optimizer_state is not None else self.optimizer.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler is not None else None,
            ema=self.ema.module.state_dict() if self.ema is not None else None,
            rng=rngs, config=config_to_dict(self.cfg))

    def load(self, state: Dict[str, Any], path: Path) -> Resumed:
        """Load a checkpoint into this run's objects, keeping the config's optimizer settings (they
        apply from the resumed step on); another global batch is refused."""
        if 'optimizer' not in state:
            raise CheckpointError(f'{path} holds a student for eval / export, not a training state; resume from a '
                                  f'checkpoint-*.pth')
        cfg, old = self.cfg, config_from_dict(state['config'], where=str(path))
        if old.train.batch_size != cfg.train.batch_size:
            raise RunError(f'{path} was trained with train.batch_size {old.train.batch_size}, this run asks for '
                           f'{cfg.train.batch_size}: a run\'s data order, steps and schedule are those of its '
                           f'global batch; resume with train.batch_size {old.train.batch_size} (on any number of '
                           f'processes and accumulation steps that divide it) or start a new run')
        if (old.distill.projector_lr_scale == 1) != (cfg.distill.projector_lr_scale == 1):
            raise RunError(f'{path} was trained with distill.projector_lr_scale {old.distill.projector_lr_scale}, '
                           f'this run asks for {cfg.distill.projector_lr_scale}: one of them is 1, which keeps the '
                           f'student and the projectors in the same optimizer groups; resume with a scale other '
                           f'than 1 only from a run that had one, or start a new run')
        if _student_of(old) != _student_of(cfg):
            raise RunError(f'{path} holds a student {_student_of(old)}; this config asks for {_student_of(cfg)}: '
                           f'resume with the checkpoint\'s student (student.model and kwargs, data.num_classes, '
                           f'data.in_chans) or start a new run')
        hyper = [{k: v for k, v in g.items() if k != 'params'} for g in self.optimizer.param_groups]
        optimizer_state = optimizer_state_of(state, path, owned_indices(self.optimizer))  # this rank's part
        try:
            self.task.student.load_state_dict(state['student'])
            self.task.load_task_state(state['task_state'])
            load_optimizer_state(self.optimizer, optimizer_state)
        except (RuntimeError, ValueError, KeyError, IndexError, TaskStateMismatchError) as e:
            if _task_of(old) != _task_of(cfg):
                raise RunError(f'{path} holds the projectors of {_task_of(old)}; this config asks for '
                               f'{_task_of(cfg)}: resume with the checkpoint\'s teacher, method and data.img_size, '
                               f'or start a new run') from None
            detail = ' '.join(line.strip() for line in str(e).splitlines())
            raise CheckpointError(f'{path} does not fit this run ({cfg.student.model}, method '
                                  f'{cfg.distill.method}): {detail[:400]}') from None
        for group, values in zip(self.optimizer.param_groups, hyper):  # the config's lr, decay, momentum ...
            group.update(values)
        if self.scaler is not None and state.get('scaler'):
            self.scaler.load_state_dict(state['scaler'])
        if self.ema is not None and state.get('ema'):
            self.ema.module.load_state_dict(state['ema'])
        progress = dict(state['progress'])
        loss_sums, loss_updates = progress.pop('loss_sums', {}), progress.pop('loss_updates', 0)
        return Resumed(Progress(**progress), loss_sums, loss_updates, old, state['rng'])
