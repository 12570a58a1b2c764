"""The one device rule of every command: ``--device auto|cpu|cuda|cuda:N``."""
import re

import torch
import torch.nn as nn

from ..errors import UserError

__all__ = ['DEVICE_HELP', 'DeviceError', 'resolve_device', 'model_device']

DEVICE_HELP = 'auto (CUDA when available, else CPU), cpu, cuda or cuda:N (default auto)'


class DeviceError(UserError):
    """A ``--device`` that is unknown or not on this machine."""


def resolve_device(spec: str = 'auto') -> torch.device:
    """The device ``spec`` names; a :class:`DeviceError` saying why when it is unknown or not on this machine."""
    if spec == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if spec == 'cpu':
        return torch.device('cpu')
    match = re.fullmatch(r'cuda(?::(\d+))?', spec)
    if match is None:
        raise DeviceError(f'--device {spec!r}: expected auto, cpu, cuda or cuda:N')
    if not torch.cuda.is_available():
        raise DeviceError(f'--device {spec}: no CUDA device is available (torch.cuda.is_available() is False)')
    count = torch.cuda.device_count()
    if match[1] is not None and int(match[1]) >= count:
        raise DeviceError(f'--device {spec}: this machine has {count} CUDA device(s) (cuda:0 to cuda:{count - 1})')
    return torch.device(spec)


def model_device(module: nn.Module) -> torch.device:
    """Where ``module``'s parameters are (CPU when it has none)."""
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device('cpu')
