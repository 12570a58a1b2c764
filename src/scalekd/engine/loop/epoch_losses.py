"""The loss terms of the current epoch, summed on the device, as the mean a run logs and a
checkpoint carries."""
from typing import Dict, List, Optional, Tuple

import torch

from ..runtime.distributed import DistEnv, all_reduce_sum

__all__ = ['EpochLosses']


class EpochLosses:
    """The loss terms of the current epoch: the sum over its updates of each update's mean terms (over
    the window's micro-batches on every rank), kept on the device (no host sync per step).

    A micro-batch adds its terms times ``1 / micro_batches_per_update`` (accumulation steps x processes)
    on its rank; a window counts only once its update is done (a skipped window leaves no trace).
    Every rank counts the same updates, so the epoch's mean is the mean over its updates whatever
    number of processes and accumulation steps each part of it ran on (a resumed epoch included).

    Args:
        device: where the sums are kept.
        micro_batches_per_update: accumulation steps x processes.
    """

    def __init__(self, device: torch.device, micro_batches_per_update: int = 1):
        self.device = device
        self.share = 1.0 / micro_batches_per_update
        self.names: List[str] = []
        self.sums: Optional[torch.Tensor] = None
        self.updates = 0
        self._window: List[torch.Tensor] = []

    def load(self, sums: Dict[str, float], updates: int) -> None:
        """Start from the sums and the count of updates a checkpoint carries (the sums on one process;
        the others pass zeros, every rank the count)."""
        self.reset()
        if sums:
            self.names = sorted(sums)
            self.sums = torch.tensor([sums[n] for n in self.names], dtype=torch.float64, device=self.device)
        self.updates = updates

    def add(self, terms: Dict[str, torch.Tensor]) -> None:
        """The terms of one micro-batch of the open accumulation window."""
        if not self.names:
            self.names = sorted(terms)
        self._window.append(torch.stack([terms[n].detach().double() for n in self.names]))

    def commit(self) -> None:
        """Count the window's terms (its update is done)."""
        if self._window:
            window = torch.stack(self._window).sum(0) * self.share
            self.sums = window if self.sums is None else self.sums + window
            self.updates += 1
        self._window = []

    def discard(self) -> None:
        """Drop the window's terms (its update is skipped, or the run stops before it)."""
        self._window = []

    def global_sums(self, env: DistEnv) -> Tuple[Dict[str, float], int]:
        """Every rank's sums added (a collective), and the number of updates behind them."""
        sums = self.sums.tolist() if self.sums is not None else [0.0] * len(self.names)
        values = all_reduce_sum({n: v for n, v in zip(self.names, sums)}, env)
        return {n: values[n] for n in self.names}, self.updates

    def means(self, env: DistEnv) -> Dict[str, float]:
        """The epoch's mean terms over its updates (a collective)."""
        sums, updates = self.global_sums(env)
        return {k: v / max(updates, 1) for k, v in sums.items()}

    def reset(self) -> None:
        """Start a new epoch."""
        self.names, self.sums, self.updates, self._window = [], None, 0, []
