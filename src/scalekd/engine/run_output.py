"""The output folder of a run as its main process opens, fills and closes it: the lock, the
checkpoint to resume from (``--resume auto`` or a path), the fresh-start check, setting aside the
history after an older resumed checkpoint, checkpoint writes with retention, and keeping ``best.pth``
and the recorded best epoch in agreement. Only the main process holds one."""
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

from .checkpoint import (CheckpointError, checkpoint_position, checkpoints_by_age, latest_checkpoint,
                         read_training_checkpoint, save_checkpoint)
from .errors import RunError
from .run_folder import RunFolder
from .training_state import Progress, best_state

__all__ = ['RunOutput', 'check_resume_request']


def check_resume_request(resume: Optional[str], force: bool) -> None:
    """Refuse ``--resume`` with ``--force`` (every rank, before anything is opened)."""
    if resume and force:
        raise RunError('--resume and --force contradict each other: --resume continues the run in the output '
                       'folder, --force deletes it')


class RunOutput:
    """The output folder of one run on the main process, from :meth:`open` to :meth:`release`.

    Args:
        output: the run's ``output`` setting.
        keep: ``train.keep_checkpoints``, how many checkpoints of the run's series stay (0: all).
        note: takes each line worth logging (said once the log is open).
    """

    def __init__(self, output: str, keep: int, note: Callable[[str], None]):
        self.folder = RunFolder(output)
        self.keep = keep
        self.path = self.folder.path
        self.best = self.path / 'best.pth'
        self.resumed_from: Optional[Path] = None
        self._note = note
        self._resume_state: Optional[Dict[str, Any]] = None

    def check_space(self, checkpoint_bytes: int) -> None:
        """Refuse a run whose folder has no room for two checkpoints (the new one is written beside the
        last before it replaces it)."""
        free = shutil.disk_usage(self.path).free
        if free < 2 * checkpoint_bytes:
            raise RunError(f'{self.path} has {free / 2 ** 20:.0f} MB free; a checkpoint of this run takes about '
                           f'{checkpoint_bytes / 2 ** 20:.0f} MB and two must fit: free some space or set output to '
                           f'another disk')

    def open(self, resume: Optional[str], force: bool) -> Optional[Path]:
        """Lock the folder, then find the checkpoint to resume from (read once, see
        :meth:`take_resume_state`), or make the folder ready for a fresh run. Returns the checkpoint
        (``None`` for a fresh start); on failure the lock is let go."""
        self.folder.acquire()
        try:
            if resume == 'auto':
                self.resumed_from, self._resume_state, passed = latest_checkpoint(self.path)
                for p in passed:
                    self._note(f'passed over {p}')
            elif resume:
                self.resumed_from, self._resume_state = self._resume_path(Path(resume))
            if not resume or not self.folder.holds_run():  # a new run here: nothing of another may be lost
                removed = self.folder.check_fresh(force)
                if removed:
                    self._note(f'--force removed the previous run\'s {", ".join(removed)}')
            partial = self.folder.remove_partial_writes()
            if partial:
                self._note(f'removed unfinished writes {", ".join(partial)}')
            return self.resumed_from
        except BaseException:
            self.folder.release(failed=True)
            raise

    def _resume_path(self, path: Path) -> Tuple[Path, Dict[str, Any]]:
        """``--resume PATH``: a checkpoint of this folder (the history after it is set aside) or, into a
        folder holding no run, of another."""
        if path.is_dir():
            raise RunError(f'--resume {path} is a folder: give one of its checkpoint-*.pth, or set output to it '
                           f'and pass --resume auto')
        inside = path.resolve().parent == self.path.resolve()
        if self.folder.holds_run() and not inside:
            raise RunError(f'output folder {self.path} holds another run; resume {path} into its own '
                           f'folder (set output) or use --resume auto')
        state = read_training_checkpoint(path)
        if inside:
            self._set_aside_later(state)
        return path, state

    def take_resume_state(self) -> Dict[str, Any]:
        """The resumed checkpoint's state, read by :meth:`open`; handed over once."""
        state, self._resume_state = self._resume_state, None
        return state

    def _set_aside_later(self, state: Dict[str, Any]) -> None:
        """Resuming from an older checkpoint of this folder abandons the history after it: its later
        checkpoints and a best.pth from after it move aside, so that no later resume mixes them in."""
        progress, train = state['progress'], state['config']['train']
        resumed = (progress['epoch'], progress['batch'] // train.get('accum_steps', 1))
        later = [p for p in checkpoints_by_age(self.path) if checkpoint_position(p.name) > resumed]
        step = progress['step']
        if self.best.is_file() and self.best_step_on_disk() > step:
            later.append(self.best)
        if later:
            aside = self.folder.set_aside(later, step)
            self._note(f'resumed from an older checkpoint: {", ".join(p.name for p in later)} of the '
                       f'abandoned history moved to {aside}')

    def best_step_on_disk(self) -> int:
        """The step of the best epoch ``best.pth`` holds (-1 when it does not load, with a note)."""
        try:
            return read_training_checkpoint(self.best)['progress'].get('best_step', -1)
        except CheckpointError as e:
            self._note(f'best.pth is unreadable ({e})')
            return -1

    def reconcile_best(self, progress: Progress, state: Dict[str, Any]) -> None:
        """Make ``best.pth`` hold the resumed ``progress``'s best epoch: rewrite it when the resumed
        ``state`` is that epoch (a kill between the two writes); when it cannot be restored, track the
        best afresh from here, so that best.pth and the recorded best always agree."""
        p = progress
        if p.best_step < 0 or (self.best.is_file() and self.best_step_on_disk() == p.best_step):
            return
        if p.best_step == p.step and p.batch == 0:
            save_checkpoint(best_state(state), self.best)
            self._note(f'best.pth rewritten from the resumed checkpoint (epoch {p.best_epoch})')
            return
        self._note(f'the best epoch so far ({p.best_epoch}, top-1 {p.best_top1:.2f}) is not in best.pth and '
                   f'the resumed checkpoint cannot restore it: the best epoch is tracked afresh from here')
        p.forget_best()

    def start(self, fresh: bool) -> None:
        """Mark the folder as this run's (a fresh run forgets the series of the run it replaced)."""
        self.folder.mark(fresh)

    def write(self, state: Dict[str, Any], name: str, step: int, is_best: bool) -> Path:
        """Checkpoint ``state`` of ``step`` as ``name`` (listed in the series first), then best.pth, then
        drop the series' oldest checkpoints beyond the newest ``keep``, never the one the run resumed from."""
        path = self.path / name
        self.folder.record(path, step)
        save_checkpoint(state, path)
        if is_best:
            save_checkpoint(best_state(state), self.best)
        self.folder.prune(self.keep, [self.resumed_from] if self.resumed_from is not None else [])
        return path

    def release(self, failed: bool = False) -> None:
        """Let the lock go (after a failed start, also what :meth:`open` created)."""
        self.folder.release(failed)
