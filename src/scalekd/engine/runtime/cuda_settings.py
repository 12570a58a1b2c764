"""The GPU switches of a run: TF32 (``train.tf32``), cuDNN autotuning (``train.cudnn_benchmark``),
SyncBatchNorm under DDP (``train.sync_bn``) and the loaders' ``data.pin_memory`` /
``data.persistent_workers``. The trainer applies the first three when it builds a run; the
loaders take theirs from :func:`loader_options`."""
from typing import Any, Callable, Dict, List

import torch
import torch.nn as nn
from timm.layers import convert_sync_batchnorm
from torch.nn.modules.batchnorm import _BatchNorm

from ..inputs.config import DataConfig, RunConfig, TrainConfig
from .distributed import DistEnv

__all__ = ['configure_backends', 'sync_batchnorm', 'apply_gpu_settings', 'loader_options']


def configure_backends(tcfg: TrainConfig) -> None:
    """TF32 for fp32 matmuls and cuDNN convolutions (``train.tf32``) and cuDNN autotuning
    (``train.cudnn_benchmark``, never under ``train.deterministic``): process-wide flags that only
    CUDA kernels read."""
    # the legacy flags: torch keeps its newer fp32_precision settings in step with them (mixing the two raises)
    torch.backends.cuda.matmul.allow_tf32 = tcfg.tf32
    torch.backends.cudnn.allow_tf32 = tcfg.tf32
    torch.backends.cudnn.benchmark = tcfg.cudnn_benchmark and not tcfg.deterministic


def _batch_norms(module: nn.Module) -> List[nn.Module]:
    return [m for m in module.modules() if isinstance(m, _BatchNorm) and not isinstance(m, nn.SyncBatchNorm)]


def sync_batchnorm(module: nn.Module) -> int:
    """Replace ``module``'s BatchNorm layers (timm's BatchNormAct too) by their synchronised versions,
    in place, keeping their weights and statistics; how many were replaced. ``module`` itself must not
    be a BatchNorm layer."""
    if isinstance(module, _BatchNorm):
        raise ValueError('sync_batchnorm converts the layers inside a model, not a BatchNorm layer itself')
    count = len(_batch_norms(module))
    convert_sync_batchnorm(module)
    return count


def apply_gpu_settings(cfg: RunConfig, env: DistEnv, task: nn.Module, note: Callable[[str], None]) -> None:
    """Apply the run's TF32, cuDNN and SyncBatchNorm switches (before DDP wraps ``task``'s trainable
    module); what the log should say goes to ``note``."""
    configure_backends(cfg.train)
    if not (cfg.train.sync_bn and env.distributed and _batch_norms(task.student)):
        return
    if env.device.type != 'cuda':  # torch's SyncBatchNorm refuses CPU tensors
        note('train.sync_bn: SyncBatchNorm runs on CUDA only; on CPU each process normalises with its own '
             'batch statistics')
        return
    count = sync_batchnorm(task.student)
    note(f'train.sync_bn: {count} BatchNorm layer(s) of the student normalise over the batch of all '
         f'{env.world_size} processes (SyncBatchNorm)')


def loader_options(cfg: DataConfig, device: torch.device) -> Dict[str, Any]:
    """The DataLoader arguments of ``data.pin_memory`` (null: on CUDA) and ``data.persistent_workers``
    (only with workers)."""
    pin = cfg.pin_memory if cfg.pin_memory is not None else device.type == 'cuda'
    return dict(pin_memory=pin, persistent_workers=cfg.persistent_workers and cfg.workers > 0)
