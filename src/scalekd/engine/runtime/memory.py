"""Peak memory of the training that follows a point (after the models are built), per process.

On CUDA: ``torch.cuda.max_memory_allocated`` since its reset. On CPU: the process's peak resident
set (``VmHWM``), whose high-water mark Linux resets when ``5`` is written to ``/proc/self/clear_refs``;
without that file (not Linux, or a kernel that refuses) the figure is the peak since the process
started, and :func:`reset_peak_memory` says so by returning False.
"""
import resource
from pathlib import Path

import torch

__all__ = ['reset_peak_memory', 'peak_memory_mb']

_CLEAR_REFS = Path('/proc/self/clear_refs')
_STATUS = Path('/proc/self/status')


def reset_peak_memory(device: torch.device) -> bool:
    """Start measuring peak memory from now; False where the CPU high-water mark cannot be reset."""
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        _CLEAR_REFS.write_text('5')
    except OSError:
        return False
    return True


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory (MiB) since :func:`reset_peak_memory`: CUDA allocations, or the CPU resident set."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith('VmHWM:'):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
