"""A run's use of its output folder, on the main process: what to resume from and what to do with the
folder's history, read from the checkpoints themselves. :mod:`~scalekd.engine.run_folder.files` holds the
rules on files (the lock, the marker, what may be deleted); this module decides with them:

- the checkpoint to resume from: ``--resume auto`` takes the newest that loads and sets the newer ones
  it passed over aside, ``--resume PATH`` of this folder sets the history after it aside (with a
  best.pth from that history), so that no later resume mixes two histories; ``--resume auto`` with no
  checkpoint says the run starts afresh;
- a fresh start checks the folder can take the run; what ``--force`` replaces is deleted only once
  the new run is built (:meth:`RunOutput.start`), so that a run that cannot start loses nothing;
- a damaged marker is rebuilt from the checkpoints that load, with a note;
- checkpoint writes with retention, and ``best.pth`` kept in agreement with the recorded best epoch; a
  sharded optimizer state's folder is placed before its checkpoint file is written.
"""
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .checkpoint import (CheckpointError, checkpoint_position, checkpoints_by_age, latest_checkpoint,
                         read_training_checkpoint, save_checkpoint)
from ..errors import RunError
from .files import MARKER, RunFolder
from .optimizer_shards import read_resumable_checkpoint
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
        writes: the names of the files the run writes besides its checkpoints and ``best.pth`` (config,
            log, metrics, TensorBoard / W&B folders when on), recorded in the marker as the run's.
    """

    def __init__(self, output: str, keep: int, note: Callable[[str], None], writes: Sequence[str]):
        self.folder = RunFolder(output)
        self.keep = keep
        self.path = self.folder.path
        self.best = self.path / 'best.pth'
        self.writes = (*writes, self.best.name)
        self.resumed_from: Optional[Path] = None
        self._note = note
        self._resume_state: Optional[Dict[str, Any]] = None
        self._replaced: List[Path] = []  # the files of the run --force replaces, deleted by start()

    def check_space(self, checkpoint_bytes: int) -> None:
        """Refuse a run whose folder has no room for two checkpoints (the new one is written beside the
        last before it replaces it); the files ``--force`` replaces count as free."""
        free = shutil.disk_usage(self.path).free + sum(_size(p) for p in self._replaced)
        if free < 2 * checkpoint_bytes:
            raise RunError(f'{self.path} has {free / 2 ** 20:.0f} MB free; a checkpoint of this run takes about '
                           f'{checkpoint_bytes / 2 ** 20:.0f} MB and two must fit: free some space or set output to '
                           f'another disk')

    def open(self, resume: Optional[str], force: bool) -> Optional[Path]:
        """Lock the folder, then find the checkpoint to resume from (read once, see
        :meth:`take_resume_state`), or check the folder can take a fresh run (what ``force`` replaces is
        deleted by :meth:`start`). Returns the checkpoint (``None`` for a fresh start); on failure the
        lock is let go."""
        self.folder.acquire()
        try:
            links = [n for n in self.writes if (self.path / n).is_symlink()]
            if links:  # a log opened for appending, or a config written in place, would change the link's target
                raise RunError(f'output folder {self.path}: {", ".join(links)} is a link, and a run writes its '
                               f'own files there, never through a link: move it away or choose another output')
            self._repair_marker()
            if resume == 'auto':
                self.resumed_from, self._resume_state, passed = latest_checkpoint(self.path, read_resumable_checkpoint)
                for p in passed:
                    self._note(f'passed over {p}')
                if passed:
                    self._set_aside_later(self._resume_state)
                if self.resumed_from is None:
                    self._note(f'--resume auto: no checkpoint in {self.path}, the run starts afresh')
            elif resume:
                self.resumed_from, self._resume_state = self._resume_path(Path(resume))
            if not resume or not self.folder.holds_run():  # a new run here: nothing of another may be lost
                self._replaced = self.folder.check_fresh(force, self.writes)
            foreign = self.folder.foreign_entries()
            if foreign:
                self._note(f'{MARKER} lists {", ".join(foreign)}, which are no files of its run: left alone')
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
        state = read_resumable_checkpoint(path)
        if inside:
            self._set_aside_later(state)
        return path, state

    def _repair_marker(self) -> None:
        """Rebuild a damaged marker's series from the checkpoints that load, with a note."""
        damage = self.folder.marker_damage()
        if damage is None:
            return
        series = []
        for path in checkpoints_by_age(self.path):
            try:
                series.append(dict(file=path.name, step=read_training_checkpoint(path)['progress'].get('step', 0)))
            except CheckpointError:
                continue
        self.folder.rebuild(series)
        self._note(f'{MARKER} was damaged ({damage}): rebuilt from the {len(series)} checkpoint(s) that load'
                   + (f' ({", ".join(e["file"] for e in series)})' if series else ''))

    def take_resume_state(self) -> Dict[str, Any]:
        """The resumed checkpoint's state, read by :meth:`open`; handed over once."""
        state, self._resume_state = self._resume_state, None
        return state

    def _set_aside_later(self, state: Dict[str, Any]) -> None:
        """Resuming from an older checkpoint of this folder (named, or the newest that loads) abandons
        the history after it: its later checkpoints and a best.pth from after it move aside, so that no
        later resume mixes them in."""
        progress = state['progress']
        resumed = (progress['epoch'], progress['updates'])
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
        if p.best_step == p.step and p.updates == 0:
            save_checkpoint(best_state(state), self.best)
            self._note(f'best.pth rewritten from the resumed checkpoint (epoch {p.best_epoch})')
            return
        self._note(f'the best epoch so far ({p.best_epoch}, top-1 {p.best_top1:.2f}) is not in best.pth and '
                   f'the resumed checkpoint cannot restore it: the best epoch is tracked afresh from here')
        p.forget_best()

    def start(self, fresh: bool) -> None:
        """Make the folder this run's, once the run is built: delete the files of the run ``--force``
        replaces, then mark the folder listing the files this run writes (a fresh run forgets the
        series of the run it replaced)."""
        if self._replaced:
            self._note(f'--force removed the previous run\'s {", ".join(self.folder.remove(self._replaced))}')
            self._replaced = []
        self.folder.mark(fresh, self.writes)

    def shard_folder(self, name: str, step: int) -> Path:
        """Before the ranks write checkpoint ``name``'s optimizer shards: list it in the series, delete a file
        of that name an earlier write left (so that no file is ever beside another write's shards), and
        make the temporary folder they write into."""
        path = self.path / name
        self.folder.record(path, step)
        if path.is_file() and not path.is_symlink():
            path.unlink()
        return self.folder.shard_folder(name)

    def commit_shards(self, temp: Path, name: str) -> None:
        """Make the complete shards in ``temp`` checkpoint ``name``'s optimizer folder (before its file is written)."""
        self.folder.place_shards(temp, name)

    @staticmethod
    def drop_shards(temp: Path) -> None:
        """Delete the temporary folder of shards that were not written."""
        shutil.rmtree(temp, ignore_errors=True)

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


def _size(path: Path) -> int:
    """The bytes of a file, or of the files in a folder."""
    files = [path] if path.is_file() else [f for f in path.rglob('*') if f.is_file() and not f.is_symlink()]
    return sum(f.stat().st_size for f in files)
