"""Deterministic kernels for ``train.deterministic``."""
import os

import torch

__all__ = ['enable_determinism']


def enable_determinism(device: torch.device) -> None:
    """Deterministic algorithms; on CUDA also cuBLAS's fixed workspace (set before its first use) and
    no cuDNN autotuning."""
    if device.type == 'cuda':
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True)
