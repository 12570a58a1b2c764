"""Mixed precision: which dtype a run uses, and its autocast context."""
from contextlib import nullcontext
from typing import ContextManager, Optional

import torch

from ..errors import ConfigError

__all__ = ['resolve_precision', 'resolve_teacher_dtype', 'autocast', 'autocast_dtype', 'cpu_has_fast_bf16']

PRECISIONS = ('fp32', 'bf16', 'fp16', 'auto')


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has bf16 matrix units (AMX or AVX512-BF16); plain AVX2 emulates bf16 slowly."""
    checks = ('_is_amx_tile_supported', '_is_avx512_bf16_supported')
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(precision: str, device: torch.device, key: str = 'train.precision') -> str:
    """``auto`` -> ``bf16`` where the hardware runs it fast, else ``fp32``; others are checked (errors
    name ``key``)."""
    if precision not in PRECISIONS:
        raise ConfigError(f'{key}: unknown precision {precision!r}; choose one of {", ".join(PRECISIONS)}')
    if precision == 'auto':
        if device.type == 'cuda':
            return 'bf16' if torch.cuda.is_bf16_supported() else 'fp16'
        return 'bf16' if cpu_has_fast_bf16() else 'fp32'
    if precision == 'fp16' and device.type != 'cuda':
        raise ConfigError(f'{key} fp16: fp16 autocast needs a CUDA device; use bf16 on CPU')
    return precision


def autocast_dtype(precision: str) -> torch.dtype:
    """The dtype a resolved precision computes in (``torch.float32`` for fp32)."""
    return {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(precision, torch.float32)


def resolve_teacher_dtype(precision: Optional[str], device: torch.device,
                          key: str = 'train.teacher_precision') -> Optional[torch.dtype]:
    """The teacher forward's own autocast dtype of a teacher precision; ``None`` (the run's) when unset."""
    return None if precision is None else autocast_dtype(resolve_precision(precision, device, key))


def autocast(precision: str, device: torch.device) -> ContextManager:
    """The autocast context of a resolved precision (a no-op for fp32)."""
    dtype = autocast_dtype(precision)
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
