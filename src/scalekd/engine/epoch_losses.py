"""The loss terms of the current epoch, summed on the device, as the mean a run logs and a
checkpoint carries."""
from typing import Dict, List, Optional, Tuple

import torch

from .distributed import DistEnv, all_reduce_sum

__all__ = ['EpochLosses']


class EpochLosses:
    """The loss terms of the current epoch on this rank, summed on the device (no host sync per step).

    Terms of an accumulation window count only once its update is done (a skipped window leaves
    no trace); :meth:`global_sums` adds every rank's sums, which is what a checkpoint stores.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.names: List[str] = []
        self.sums: Optional[torch.Tensor] = None
        self.batches = 0
        self._window: List[torch.Tensor] = []

    def load(self, totals: Dict[str, float], batches: int) -> None:
        """Start from sums carried over (by the main process of a resumed run; none at an epoch's end)."""
        if not totals:
            return self.reset()
        self.names = sorted(totals)
        self.sums = torch.tensor([totals[n] for n in self.names], dtype=torch.float64, device=self.device)
        self.batches = batches

    def add(self, terms: Dict[str, torch.Tensor]) -> None:
        """The terms of one micro-batch of the open accumulation window."""
        if not self.names:
            self.names = sorted(terms)
        self._window.append(torch.stack([terms[n].detach().double() for n in self.names]))

    def commit(self) -> None:
        """Count the window's terms (its update is done)."""
        if self._window:
            window = torch.stack(self._window).sum(0)
            self.sums = window if self.sums is None else self.sums + window
            self.batches += len(self._window)
        self._window = []

    def discard(self) -> None:
        """Drop the window's terms (its update is skipped, or the run stops before it)."""
        self._window = []

    def global_sums(self, env: DistEnv) -> Tuple[Dict[str, float], int]:
        """Every rank's sums added (a collective), and the number of batches behind them."""
        sums = self.sums.tolist() if self.sums is not None else [0.0] * len(self.names)
        values = all_reduce_sum({**{f't/{n}': v for n, v in zip(self.names, sums)}, 'batches': self.batches}, env)
        return {n: values[f't/{n}'] for n in self.names}, int(values['batches'])

    def reset(self) -> None:
        """Start a new epoch."""
        self.sums, self.batches, self._window = None, 0, []
