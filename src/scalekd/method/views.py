"""Feature views of dual-view feature mimicking (DFM).

A view is applied to both the projected student map and the teacher target before the
distance D. The original view compares all of the features (or, for the paper's
"Dir + Alt" ablation, only their direct component); the alternative view removes the
direct component with phi.
"""
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch

from .dct import keep_dc, remove_dc
from .errors import OptionError

__all__ = ['View', 'VIEW_MODES', 'ORIGINAL_VIEWS', 'build_views']


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


_TRANSFORMS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    'all': _identity,   # the features as they are
    'dc': keep_dc,      # only the direct component ("Dir" of Table 17)
    'phi': remove_dc,   # direct component removed (the alternative view)
}

VIEW_MODES = ('single', 'dual', 'dfm')
ORIGINAL_VIEWS = ('all', 'dc')


@dataclass(frozen=True)
class View:
    """One mimicking path: its name (``ori`` / ``alt``, used in loss names) and transform."""
    name: str
    transform: str

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _TRANSFORMS[self.transform](x)


def build_views(mode: str = 'dfm', original: str = 'all') -> Tuple[View, ...]:
    """The views of a run.

    ``single``: one path in the original view (CAP / FD). ``dual``: two independent paths,
    both in the original view (the "dual-path CAP" ablation). ``dfm``: original view plus the
    alternative (phi) view. ``original`` picks ``all`` features or ``dc`` only for the first path.
    """
    if mode not in VIEW_MODES:
        raise OptionError(f'unknown view mode {mode!r}; choose one of {", ".join(VIEW_MODES)}')
    if original not in ORIGINAL_VIEWS:
        raise OptionError(f'unknown original view {original!r}; choose one of {", ".join(ORIGINAL_VIEWS)}')
    ori = View('ori', original)
    if mode == 'single':
        return (ori,)
    return ori, View('alt', 'phi' if mode == 'dfm' else 'all')
