"""The run's optimizer: timm's, built from the config, optionally sharded over ranks (``train.zero``).

With ``train.zero`` on several processes, PyTorch's ``ZeroRedundancyOptimizer`` wraps the same timm
optimizer class and parameter groups: each rank keeps the optimizer state (AdamW's two moments,
SGD's momentum) of about 1/world_size of the parameters, updates those, and broadcasts them. The
update is the unsharded optimizer's. ZeRO-1 is chosen over FSDP2's ``fully_shard`` because the
weights and gradients stay whole on every rank: DDP, gradient clipping over every parameter, EMA,
the loss-term taps and the checkpoint format are unchanged; what is sharded is the largest share
of the projectors' training state that no forward or backward needs.

A sharded optimizer's checkpoint is written by every rank, each its shard (:func:`local_optimizer_state`,
see :mod:`scalekd.engine.run_folder.optimizer_shards`); a plain optimizer's is its state dict. Both key
a parameter's state by its index in the plain optimizer's state dict, so a run resumes with or without
``train.zero`` on any number of processes: each rank loads the states it keeps (:func:`owned_indices`).
"""
from typing import Any, Dict, List, Optional, Set

import torch
import torch.nn as nn
from timm.optim import Lookahead, create_optimizer_v2, param_groups_weight_decay

from ..inputs.config import OptimConfig
from .distributed import DistEnv
from ..errors import ConfigError

__all__ = ['build_optimizer', 'projector_param_groups', 'gather_optimizer_state', 'load_optimizer_state',
           'optimizer_step', 'is_sharded', 'local_optimizer_state', 'owned_indices', 'plain_param_groups']


def projector_param_groups(module: nn.Module, weight_decay: float, projector_lr_scale: float) -> List[Dict[str, Any]]:
    """timm's weight-decay groups of a :class:`~scalekd.task.distiller.DistillationModule`, each split into
    the student's parameters and the projectors' (every other one), the latter with ``lr_scale``."""
    student = {id(p) for p in module.student.parameters()}
    groups = []
    for group in param_groups_weight_decay(module, weight_decay, no_weight_decay_list=module.no_weight_decay()):
        for own, scale in ((True, 1.0), (False, projector_lr_scale)):
            params = [p for p in group['params'] if (id(p) in student) == own]
            if params:
                groups.append(dict(group, params=params, lr_scale=scale))
    return groups


def build_optimizer(module: nn.Module, cfg: OptimConfig, env: DistEnv, zero: bool = False,
                    projector_lr_scale: float = 1.0) -> torch.optim.Optimizer:
    """timm's optimizer of ``module``'s trainable parameters (its weight-decay groups; with a
    ``projector_lr_scale`` other than 1, the student's and the projectors' apart, see
    :func:`projector_param_groups`); with ``zero`` on several processes, the same optimizer sharded over them."""
    groups = None if projector_lr_scale == 1 else (  # (1: timm's own groups, as checkpoints index them)
        lambda m: projector_param_groups(m, cfg.weight_decay, projector_lr_scale))
    optimizer = create_optimizer_v2(module, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                    momentum=cfg.momentum, param_group_fn=groups)
    if not (zero and env.distributed):
        return optimizer
    from torch.distributed.optim import ZeroRedundancyOptimizer
    if isinstance(optimizer, Lookahead):  # (the config refuses it first)
        raise ConfigError(f'train.zero shards a plain optimizer, not optim.opt {cfg.opt!r} (Lookahead)')
    groups = [dict(g) for g in optimizer.param_groups]  # every hyper-parameter set: the class's defaults are not needed
    return ZeroRedundancyOptimizer(groups, optimizer_class=type(optimizer))


def is_sharded(optimizer: torch.optim.Optimizer) -> bool:
    """Whether each rank holds only its shard of ``optimizer``'s state."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    return isinstance(optimizer, ZeroRedundancyOptimizer)


def _indexed_params(optimizer: torch.optim.Optimizer) -> List[torch.Tensor]:
    """Every parameter in the order of the plain optimizer's state dict (group by group): its index there."""
    return [p for group in optimizer.param_groups for p in group['params']]


def plain_param_groups(optimizer: torch.optim.Optimizer) -> List[Dict[str, Any]]:
    """The ``param_groups`` of the plain optimizer's state dict (hyper-parameters, parameter indices)."""
    groups, start = [], 0
    for group in optimizer.param_groups:
        groups.append(dict({k: v for k, v in group.items() if k != 'params'},
                           params=list(range(start, start + len(group['params'])))))
        start += len(group['params'])
    return groups


def local_optimizer_state(optimizer: torch.optim.Optimizer) -> Dict[int, Dict[str, Any]]:
    """The optimizer state this rank keeps (its shard; a plain optimizer's whole state), by parameter index."""
    local = optimizer.optim.state if is_sharded(optimizer) else optimizer.state
    return {i: dict(local[p]) for i, p in enumerate(_indexed_params(optimizer)) if local.get(p)}


def owned_indices(optimizer: torch.optim.Optimizer) -> Optional[Set[int]]:
    """The indices of the parameters whose optimizer state this rank keeps; ``None``: all of them."""
    if not is_sharded(optimizer):
        return None
    mine = {id(p) for group in optimizer.optim.param_groups for p in group['params']}
    return {i for i, p in enumerate(_indexed_params(optimizer)) if id(p) in mine}


def gather_optimizer_state(optimizer: torch.optim.Optimizer, env: DistEnv) -> Optional[Dict[str, Any]]:
    """The whole optimizer state on the main process (``None`` on the others); a collective for a
    sharded optimizer: every rank calls it."""
    if not is_sharded(optimizer):
        return optimizer.state_dict() if env.is_main else None
    optimizer.consolidate_state_dict(to=0)
    if env.device.type == 'cuda':
        torch.cuda.synchronize(env.device)  # the shards' copies to the host are non-blocking
    if not env.is_main:
        return None
    state = optimizer.state_dict()
    optimizer._all_state_dicts.clear()  # else the main process keeps every shard until the next checkpoint
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: Dict[str, Any]) -> None:
    """Load a whole optimizer state (a checkpoint's); a sharded optimizer keeps this rank's shard only."""
    optimizer.load_state_dict(state)
    if is_sharded(optimizer):
        optimizer.state.clear()  # ZeRO's wrapper also keeps the shard it handed to the local optimizer


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: Optional[torch.amp.GradScaler],
                   clip_parameters, clip: Optional[float]) -> None:
    """One update from the accumulated gradients: with a GradScaler, unscale before clipping, and
    the scaler skips the step when a gradient is not finite."""
    if scaler is not None:
        if clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(clip_parameters, clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        if clip:
            torch.nn.utils.clip_grad_norm_(clip_parameters, clip)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
