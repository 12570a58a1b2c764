"""CPU memory allocator tuning for training steps with large, short-lived tensors.

glibc's malloc hands big blocks back to the kernel on every free (``mmap`` above a threshold,
heap trimming), so every training step page-faults and zeroes its activations again. Raising the
mmap threshold to its maximum and keeping freed memory removes that (at the cost of a larger
resident set). No-op where glibc is absent. What it saved, and the command that measured it: the
documentation's training cost page (docs/cost.md).
"""
import ctypes
import ctypes.util

__all__ = ['keep_freed_memory', 'give_back_free_heap']

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory() -> bool:
    """Tell glibc malloc to keep freed blocks for reuse; True when applied."""
    name = ctypes.util.find_library('c')
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, 32 * 2 ** 20)   # glibc's largest mmap threshold
    ok &= mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1)   # do not give the heap top back after each step
    ok &= mallopt(_M_TOP_PAD, 256 * 2 ** 20)
    return bool(ok)


def give_back_free_heap() -> None:
    """glibc's ``malloc_trim``: the free pages that :func:`keep_freed_memory` keeps go back to the kernel,
    so that what is allocated next counts in the resident set instead of reusing them. No-op without glibc."""
    name = ctypes.util.find_library('c')
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass
