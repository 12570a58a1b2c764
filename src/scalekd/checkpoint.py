"""Training checkpoints: atomic writes, safe loads, and finding the newest complete one."""
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch

__all__ = ['save_checkpoint', 'load_checkpoint', 'latest_checkpoint', 'checkpoints_by_age', 'rng_state',
           'set_rng_state', 'CheckpointError']

# checkpoint-EEEE.pth after E epochs; checkpoint-EEEE-BBBBBB.pth after E epochs and B batches of the next
_CHECKPOINT_FILE = re.compile(r'^checkpoint-(\d+)(?:-(\d+))?\.pth$')


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or unsafe."""


def rng_state() -> Dict[str, Any]:
    """Every RNG the run draws from, as weights-only-loadable values."""
    np_state = np.random.get_state()
    state = dict(torch=torch.get_rng_state(), python=random.getstate(),
                 numpy=dict(key=torch.from_numpy(np_state[1].astype(np.int64)), pos=int(np_state[2]),
                            has_gauss=int(np_state[3]), cached_gaussian=float(np_state[4])))
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state['torch'])
    random.setstate(state['python'])
    n = state['numpy']
    np.random.set_state(('MT19937', n['key'].numpy().astype(np.uint32), n['pos'], n['has_gauss'], n['cached_gaussian']))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def save_checkpoint(state: Dict[str, Any], path: Union[str, Path]) -> None:
    """Write to a temporary file in the same folder, flush it to disk, then rename over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Union[str, Path]) -> Dict[str, Any]:
    """Load a training checkpoint with ``weights_only`` (no pickled code runs)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'checkpoint {path} does not exist')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise CheckpointError(f'checkpoint {path} cannot be loaded safely: {str(e).splitlines()[0]}') from None


def checkpoints_by_age(folder: Union[str, Path]) -> List[Path]:
    """The run's checkpoints in ``folder``, oldest first by (epochs, batches) done."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [((int(m.group(1)), int(m.group(2) or 0)), p) for p in folder.iterdir()
             if (m := _CHECKPOINT_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: Union[str, Path]) -> Optional[Path]:
    """The newest checkpoint in ``folder`` that loads completely, or ``None``."""
    for path in reversed(checkpoints_by_age(folder)):
        try:
            load_checkpoint(path)
            return path
        except CheckpointError:
            continue
    return None
