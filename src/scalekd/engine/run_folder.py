"""The output folder of a run: one writer at a time, a record of what scalekd wrote there, and
deleting nothing else.

- A lock (``.scalekd.lock``, ``flock``) is held for the whole run: a second run on the folder is
  refused with the holder's pid, host and start time. The kernel releases it when a run dies, and
  processes forked from the holder (data-loader workers) close their copy at once, so that a dead
  run's workers never hold it. The lock file is opened without following a link and must be a
  regular file of scalekd's own.
- ``scalekd-run.json`` marks the folder as a run and lists the checkpoints the run's series wrote
  (file and step); retention deletes only those, never a file it did not write.
- A command that writes many runs under one folder (``scalekd demo``, ``scalekd ablate``) holds that
  folder's lock too (:func:`holding`), so a second such command there is refused at once instead of
  meeting the first in a run folder half-way through.
- ``--force`` deletes only the artefacts a run writes (:data:`ARTEFACTS`, the checkpoints and the
  temporary files of killed writes), never other files; a folder with files named like them that
  is not a run is refused.
"""
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import stat
import tempfile
import time
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

from .checkpoint import checkpoints_by_age

__all__ = ['RunFolder', 'RunFolderError', 'MARKER', 'ARTEFACTS', 'holding']

MARKER = 'scalekd-run.json'
LOCK = '.scalekd.lock'
ARTEFACTS = ('config.yaml', 'train.log', 'metrics.jsonl', 'tensorboard', 'wandb', 'best.pth', MARKER)
# temporary files of atomic writes (checkpoints, the marker, the metrics rewind) killed half-way
_PARTIAL = re.compile(r'^\.(checkpoint-\d+(-\d+)?\.pth|best\.pth|metrics\.jsonl|' + re.escape(MARKER) + r')(\..+)?\.tmp$')
_HOLDER = re.compile(r'(pid \d+ on [^\n]*)?')  # what acquire writes in the lock file


class RunFolderError(ValueError):
    """An output folder that cannot take this run (in use, not a run folder, a protected path)."""


def check_output_path(output: str) -> Path:
    """``output`` as a path, refusing the empty string, the current folder, ``/`` and the home folder
    (``--force`` there would clear the artefacts of whatever else lives there)."""
    if not str(output).strip():
        raise RunFolderError('output is empty: set output to a folder of its own, e.g. runs/my-run')
    path = Path(output).expanduser()
    resolved = path.resolve()
    protected = {Path('/'), Path.cwd().resolve(), Path.home().resolve()}
    if resolved in protected or resolved == Path(resolved.anchor):
        raise RunFolderError(f'output {output!r} is {resolved}: a run needs a folder of its own, e.g. {path / "run"}')
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            raise RunFolderError(f'output {output!r} cannot be a folder: {parent} is a file')
    return path


def _open_lock(path: Path) -> int:
    """The lock file's descriptor, created if missing; a link is not followed (``ELOOP``)."""
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)


def _holder(fd: int) -> str:
    """What a lock file says of its holder."""
    return os.pread(fd, 4096, 0).decode(errors='replace').strip()


_HELD: 'weakref.WeakSet[RunFolder]' = weakref.WeakSet()  # the folders whose lock this process holds


def _close_inherited_locks() -> None:
    """In a forked child: close the copies of the parent's lock descriptors (the lock stays the parent's)."""
    for folder in list(_HELD):
        os.close(folder._lock_fd)
        folder._lock_fd = None
    _HELD.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


class RunFolder:
    """The output folder of one run, held by this process from :meth:`acquire` to :meth:`release`."""

    def __init__(self, output: str):
        self.path = check_output_path(output)
        self._lock_fd: Optional[int] = None
        self._created: List[Path] = []
        self._new_lock = False

    # -- the lock ---------------------------------------------------------------------------------
    def acquire(self) -> None:
        """Create the folder if needed and take the lock, or refuse naming the run that holds it."""
        missing = [p for p in [self.path, *self.path.parents] if not p.exists()]
        lock = self.path / LOCK
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._created = list(reversed(missing))
            self._new_lock = not os.path.lexists(lock)
            fd = _open_lock(lock)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                raise RunFolderError(f'{lock} is not a scalekd lock file (a link or not a file): remove it or '
                                     f'choose another output') from None
            raise RunFolderError(f'output folder {self.path} cannot be written: {e.strerror or e}') from None
        try:
            self._lock(fd, lock)
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f'pid {os.getpid()} on {socket.gethostname()}, started '
                      f'{time.strftime("%Y-%m-%d %H:%M:%S")}'.encode(), 0)
        self._lock_fd = fd
        _HELD.add(self)

    def _lock(self, fd: int, lock: Path) -> None:
        """Take the lock on ``fd``; refuse a live holder, naming it, and a lock path that is no lock file
        of scalekd's (not a regular file, another name of a file elsewhere, other contents), left as it is."""
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            raise RunFolderError(f'{lock} is not a scalekd lock file (not a regular file, or linked elsewhere): '
                                 f'move it away or choose another output')
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RunFolderError(f'output folder {self.path} is in use by another scalekd run '
                                 f'({_holder(fd) or "another process"}); wait for it to finish or choose another '
                                 f'output') from None
        if not _HOLDER.fullmatch(_holder(fd)):
            raise RunFolderError(f'{lock} is not a scalekd lock file (its contents are not a run\'s): move it away '
                                 f'or choose another output')

    def release(self, failed: bool = False) -> None:
        """Let the lock go; after a failed start, remove what :meth:`acquire` created (the folders,
        the lock file) when nothing else was written (nothing half-written is left behind)."""
        if self._lock_fd is None:
            return
        os.close(self._lock_fd)
        self._lock_fd = None
        _HELD.discard(self)
        if not failed or not self._new_lock or (self.path / MARKER).exists():
            return
        (self.path / LOCK).unlink(missing_ok=True)
        for folder in reversed(self._created):
            if any(folder.iterdir()):
                break
            folder.rmdir()

    # -- what is in the folder ------------------------------------------------------------------------
    def holds_run(self) -> bool:
        """A scalekd run: the marker, or checkpoints (a run from before markers, a copied checkpoint)."""
        return (self.path / MARKER).is_file() or bool(checkpoints_by_age(self.path))

    def _artefacts(self) -> List[Path]:
        p = self.path
        named = [p / n for n in ARTEFACTS if (p / n).exists()]
        return named + checkpoints_by_age(p) + [f for f in p.iterdir() if _PARTIAL.match(f.name)]

    def check_fresh(self, force: bool) -> List[str]:
        """Make the folder ready for a new run: refuse another run unless ``force`` (then delete its
        artefacts, returned), refuse files named like artefacts that no run wrote."""
        if self.holds_run():
            if not force:
                raise RunFolderError(f'output folder {self.path} already holds a run; pass --resume auto to continue '
                                     f'it or --force to start over')
            removed = self._artefacts()
            for path in removed:  # a link is removed, never followed
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            return sorted(p.name for p in removed)
        clashes = sorted(p.name for p in self._artefacts())
        if clashes:
            raise RunFolderError(f'output folder {self.path} holds {", ".join(clashes)}, which no scalekd run wrote '
                                 f'there; move them away or choose another output (--force deletes only the files '
                                 f'of a run)')
        return []

    def remove_partial_writes(self) -> List[str]:
        """Delete the temporary files of writes killed half-way (no writer is live: we hold the lock)."""
        partial = [f for f in self.path.iterdir() if _PARTIAL.match(f.name)]
        for f in partial:
            f.unlink()
        return sorted(f.name for f in partial)

    # -- the marker and the checkpoint series ------------------------------------------------------------
    def read_marker(self) -> Dict[str, Any]:
        try:
            data = json.loads((self.path / MARKER).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _write_marker(self, data: Dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f'.{MARKER}.', suffix='.tmp', dir=self.path)
        with os.fdopen(fd, 'w') as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / MARKER)

    def mark(self, fresh: bool) -> None:
        """Write the marker (a fresh run forgets the series of the run it replaced)."""
        data = {} if fresh else self.read_marker()
        data.setdefault('created', time.strftime('%Y-%m-%d %H:%M:%S'))
        data.setdefault('checkpoints', [])
        self._write_marker(data)

    def series(self) -> List[Dict[str, Any]]:
        """The checkpoints the run's series wrote, oldest first (``file``, ``step``)."""
        entries = [e for e in self.read_marker().get('checkpoints', []) if isinstance(e, dict)]
        return sorted(entries, key=lambda e: e.get('step', 0))

    def record(self, path: Path, step: int) -> None:
        """List a checkpoint in the series before it is written (a kill then leaves at worst a listed
        name without a file, never a file that retention does not know)."""
        entries = [e for e in self.series() if e.get('file') != path.name] + [dict(file=path.name, step=step)]
        self._write_marker(dict(self.read_marker(), checkpoints=sorted(entries, key=lambda e: e['step'])))

    def prune(self, keep: int, protect: Sequence[Path] = ()) -> List[str]:
        """Delete the series' oldest checkpoints beyond the newest ``keep`` (0: keep all), never one
        in ``protect``; the marker is updated before any deletion. Returns the deleted names."""
        entries = self.series()
        names = {p.name for p in protect}
        drop = [e for e in (entries[:-keep] if keep > 0 else []) if e['file'] not in names]
        if drop:
            self._write_marker(dict(self.read_marker(), checkpoints=[e for e in entries if e not in drop]))
        for e in drop:
            (self.path / e['file']).unlink(missing_ok=True)
        return [e['file'] for e in drop]

    def set_aside(self, paths: Sequence[Path], step: int) -> Path:
        """Move files of a history a run abandoned (it resumed from an older checkpoint) into
        ``abandoned-after-step-N/`` and drop them from the series: kept, never resumed by mistake."""
        aside = self.path / f'abandoned-after-step-{step}'
        aside.mkdir(exist_ok=True)
        names = {p.name for p in paths}
        self._write_marker(dict(self.read_marker(), checkpoints=[e for e in self.series() if e['file'] not in names]))
        for p in paths:
            os.replace(p, aside / p.name)
        return aside


@contextmanager
def holding(output: str) -> Iterator[RunFolder]:
    """Hold ``output``'s lock for the block (the root of a command's runs), or refuse naming its holder;
    a block that fails leaves no folder or lock file it created."""
    folder = RunFolder(output)
    folder.acquire()
    try:
        yield folder
    except BaseException:
        folder.release(failed=True)
        raise
    folder.release()
