"""Feature mimicking at one tap: one projector per view, and the distance D in each view."""
from contextlib import contextmanager, nullcontext
from typing import Callable, ContextManager, Dict, Iterator, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _NormBase
from torch.utils.checkpoint import checkpoint

from .losses import feature_distance
from .views import View

__all__ = ['FeatureMimicking']


@contextmanager
def _keeping_running_stats(module: nn.Module) -> Iterator[None]:
    """Restore the running statistics of ``module``'s norm layers on exit, whatever ran inside."""
    saved = [(buf, buf.clone()) for m in module.modules() if isinstance(m, _NormBase)
             for buf in (m.running_mean, m.running_var, m.num_batches_tracked) if buf is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


class FeatureMimicking(nn.Module):
    """Independent projectors (own parameters, own queries) for each view of one student tap.

    With one view this is plain feature mimicking (FD, CAP only); with the ``ori`` and
    ``alt`` views it is dual-view feature mimicking (DFM).
    """

    def __init__(self, views: Sequence[View], make_projector: Callable[[], nn.Module],
                 activation_checkpointing: bool = False):
        super().__init__()
        self.views = tuple(views)
        self.projectors = nn.ModuleDict({v.name: make_projector() for v in self.views})
        self.activation_checkpointing = activation_checkpointing

    def run(self, fn: Callable, *args):
        """``fn(*args)``, recomputed in backward instead of stored when activation checkpointing is on
        (the recompute does not update running statistics a second time)."""
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False, context_fn=self._checkpoint_contexts)
        return fn(*args)

    def _checkpoint_contexts(self) -> Tuple[ContextManager, ContextManager]:
        """Forward as usual; the backward's recompute leaves the projectors' norm statistics as the forward set them."""
        return nullcontext(), _keeping_running_stats(self)

    def project(self, x: torch.Tensor, queries: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        """Project the student map once per view; ``queries`` maps a view name to its CAP queries."""
        if queries is None:
            return {v.name: self.run(self.projectors[v.name], x) for v in self.views}
        return {v.name: self.run(self.projectors[v.name], x, queries[v.name]) for v in self.views}

    def losses(self, projected: Dict[str, torch.Tensor], target: torch.Tensor, prefix: str) -> Dict[str, torch.Tensor]:
        """D(view(projected), view(target)) for each view, named ``{prefix}_{view}``."""
        return {f'{prefix}_{v.name}': feature_distance(v(projected[v.name]), v(target)) for v in self.views}
