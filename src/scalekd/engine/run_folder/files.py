"""The output folder as files: who may write it, what in it belongs to a run, and what may ever be
deleted. It reads no checkpoint's contents; :mod:`~scalekd.engine.run_folder.history` builds a run's resume
and fresh-start policy on top of it.

- One writer: a lock (``.scalekd.lock``, ``flock``) held from :meth:`RunFolder.acquire` to
  :meth:`RunFolder.release`; a second process is refused naming the holder's pid, host and start
  time. The kernel lets it go when the holder dies, and processes forked from the holder (data-loader
  workers) close their copy at once, so that a dead run's workers never hold it. The lock file is
  opened without following a link and must be a regular file of scalekd's own.
- A record: ``scalekd-run.json`` marks the folder as a run and lists what the run wrote there, each
  before it is written: its files (``files``, of :data:`RUN_FILES`: TensorBoard and W&B only when
  they are on) and its checkpoint series (``checkpoints``: file and step).
- Deleting only a run's own: retention and ``--force`` delete only what the marker lists, and of that
  only the names a run writes (``checkpoint-*.pth`` with its optimizer folder ``checkpoint-*.pth.optim``,
  :data:`RUN_FILES`) inside the folder, never a link; anything else the marker lists is reported and left alone. A folder without a marker is no
  run, whatever its file names: nothing in it is deleted. A marker from before ``files`` were listed
  counts :data:`RUN_FILES` as its run's. The temporary files and folders of scalekd's own killed writes
  are recognised and removed, and so is an optimizer folder of the series whose checkpoint file was
  never written.
- A command that writes many runs under one folder (``scalekd demo``, ``scalekd ablate``) holds that
  folder's lock too (:func:`holding`), so that a second such command there is refused at once.
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
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from .checkpoint import checkpoint_position, checkpoints_by_age, created_mode, is_optimizer_folder, optimizer_folder
from ..errors import UserError

__all__ = ['RunFolder', 'RunFolderError', 'MARKER', 'RUN_FILES', 'holding']

MARKER = 'scalekd-run.json'
LOCK = '.scalekd.lock'
RUN_FILES = ('config.yaml', 'train.log', 'metrics.jsonl', 'tensorboard', 'wandb', 'best.pth')
# what every run writes: a TensorBoard or W&B folder is a run's only where its marker lists it
_EVERY_RUN_WRITES = tuple(n for n in RUN_FILES if n not in ('tensorboard', 'wandb'))
# temporary files of atomic writes (checkpoints, the marker, the metrics rewind) killed half-way
_PARTIAL = re.compile(r'^\.(checkpoint-\d+(-\d+)?\.pth|best\.pth|metrics\.jsonl|' + re.escape(MARKER) + r')(\..+)?\.tmp$')
_PARTIAL_FOLDER = re.compile(r'^\.checkpoint-\d+(-\d+)?\.pth\.optim\..+\.tmp$')  # shards being written
_HOLDER = re.compile(r'(pid \d+ on [^\n]*)?')  # what acquire writes in the lock file


class RunFolderError(UserError):
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


def _remove(path: Path) -> None:
    """Delete a file or folder of a run; a link is never followed."""
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)


def _remove_optimizer_folder(checkpoint: Path) -> None:
    """Delete a checkpoint's optimizer folder, if it has one (never a link)."""
    folder = optimizer_folder(checkpoint)
    if folder.is_dir() and not folder.is_symlink():
        shutil.rmtree(folder)


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
    def is_run(self) -> bool:
        """Whether the folder is a run's: it has the marker."""
        return (self.path / MARKER).is_file()

    def holds_run(self) -> bool:
        """A run, or checkpoints to resume from (a run from before markers, a copied checkpoint)."""
        return self.is_run() or bool(checkpoints_by_age(self.path))

    def own_paths(self) -> List[Path]:
        """What the marker says its run wrote and that is there: its files of :data:`RUN_FILES` (all of
        them for a marker that lists none) and its series' checkpoints with their optimizer folders, links left out."""
        listed = self.read_marker().get('files', RUN_FILES) if self.is_run() else []
        checkpoints = [e['file'] for e in self.series()]
        names = [n for n in listed if n in RUN_FILES] + checkpoints + [optimizer_folder(n).name for n in checkpoints]
        return [p for p in (self.path / n for n in names) if p.exists() and not p.is_symlink()]

    def check_fresh(self, force: bool, writes: Sequence[str]) -> List[Path]:
        """Check the folder can take a new run that writes ``writes`` and checkpoints: another run is
        refused unless ``force``; a file by those names that is not the forced run's is refused.
        Returns what ``force`` replaces (deleted by :meth:`remove`, once the new run is built)."""
        if self.is_run() and not force:
            raise RunFolderError(f'output folder {self.path} already holds a run; pass --resume auto to continue '
                                 f'it or --force to start over')
        own = self.own_paths() if force else []
        named = [self.path / n for n in writes if os.path.lexists(self.path / n)]
        folders = [p for p in self.path.iterdir() if is_optimizer_folder(p.name)]
        clashes = sorted(p.name for p in named + checkpoints_by_age(self.path) + folders if p not in own)
        if not clashes:
            return own
        if self.is_run():
            raise RunFolderError(f'output folder {self.path} holds {", ".join(clashes)}, which its run did not write '
                                 f'(not listed in its {MARKER}); move them away or choose another output')
        hint = 'continue from its checkpoints with --resume auto, or ' if checkpoints_by_age(self.path) else ''
        raise RunFolderError(f'output folder {self.path} holds {", ".join(clashes)}, which no scalekd run wrote there '
                             f'(it has no {MARKER}, and --force deletes only what a run recorded): {hint}move them '
                             f'away or choose another output')

    @staticmethod
    def remove(paths: Sequence[Path]) -> List[str]:
        """Delete a replaced run's files (:meth:`check_fresh`'s list); their names."""
        for path in paths:
            _remove(path)
        return sorted(p.name for p in paths)

    def remove_partial_writes(self) -> List[str]:
        """Delete the temporary files and folders of writes killed half-way, and the optimizer folders of
        the series whose checkpoint file was never written (no writer is live: we hold the lock)."""
        partial = [f for f in self.path.iterdir() if not f.is_symlink() and (
            (_PARTIAL.match(f.name) and f.is_file()) or (_PARTIAL_FOLDER.match(f.name) and f.is_dir()))]
        partial += [folder for e in self.series() if not os.path.lexists(self.path / e['file'])
                    and (folder := optimizer_folder(self.path / e['file'])).is_dir() and not folder.is_symlink()]
        for f in partial:
            _remove(f)
        return sorted(f.name for f in partial)

    def shard_folder(self, name: str) -> Path:
        """A new temporary folder for the optimizer shards of checkpoint ``name`` (mode as ``mkdir`` gives)."""
        temp = Path(tempfile.mkdtemp(prefix=f'.{optimizer_folder(name).name}.', suffix='.tmp', dir=self.path))
        temp.chmod(created_mode(0o777))
        return temp

    def place_shards(self, temp: Path, name: str) -> None:
        """Rename a complete shard folder to checkpoint ``name``'s optimizer folder, replacing the one an
        earlier write of the run left there; anything else in the way is refused, left as it is."""
        folder = optimizer_folder(self.path / name)
        if os.path.lexists(folder):
            if folder.is_symlink() or not folder.is_dir():
                raise RunFolderError(f'{folder} is in the way of the checkpoint\'s optimizer state and is no folder '
                                     f'of this run (a link or a file): move it away')
            shutil.rmtree(folder)
        os.replace(temp, folder)

    # -- the marker and the checkpoint series ------------------------------------------------------------
    def _load_marker(self) -> Tuple[Dict[str, Any], Optional[str]]:
        """The marker's record, and why it is none when the marker exists but is damaged."""
        try:
            data = json.loads((self.path / MARKER).read_text())
        except FileNotFoundError:
            return {}, None
        except (OSError, ValueError) as e:
            return {}, str(e).splitlines()[0] if str(e) else type(e).__name__
        ok = isinstance(data, dict) and isinstance(data.get('checkpoints', []), list) and \
            isinstance(data.get('files', []), list)
        return (data, None) if ok else ({}, 'not the record of a run')

    def marker_damage(self) -> Optional[str]:
        """Why the marker is not a run's record (unreadable, not JSON, other contents); None when it is
        one or there is none."""
        return self._load_marker()[1]

    def read_marker(self) -> Dict[str, Any]:
        """The marker's record; empty when there is none or it is damaged."""
        return self._load_marker()[0]

    def _write_marker(self, data: Dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f'.{MARKER}.', suffix='.tmp', dir=self.path)
        with os.fdopen(fd, 'w') as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / MARKER)

    def rebuild(self, series: Sequence[Dict[str, Any]]) -> None:
        """Replace a damaged marker by one listing ``series`` (``file``, ``step``) and the files every run
        writes (not a TensorBoard or W&B folder, which may be a user's: the damaged marker no longer says)."""
        self._write_marker(dict(created=time.strftime('%Y-%m-%d %H:%M:%S'), files=list(_EVERY_RUN_WRITES),
                                checkpoints=sorted(series, key=lambda e: e['step'])))

    def mark(self, fresh: bool, files: Sequence[str]) -> None:
        """Write the marker listing ``files`` (of :data:`RUN_FILES`) among the run's; a fresh run forgets
        the files and series of the run it replaced."""
        old = {} if fresh else self.read_marker()
        kept = [n for n in old.get('files', RUN_FILES) if n in RUN_FILES and os.path.lexists(self.path / n)] \
            if old else []
        self._write_marker(dict(created=old.get('created', time.strftime('%Y-%m-%d %H:%M:%S')),
                                files=sorted({*kept, *files}),
                                checkpoints=self.series() if old else []))

    def _own_checkpoint(self, entry: Any) -> bool:
        """Whether a marker entry names a checkpoint this run may delete: its name pattern, in the
        folder, neither a link nor a folder."""
        if not (isinstance(entry, dict) and isinstance(entry.get('file'), str) and isinstance(entry.get('step'), int)
                and checkpoint_position(entry['file']) is not None):
            return False
        path = self.path / entry['file']
        return not path.is_symlink() and not path.is_dir()

    def series(self) -> List[Dict[str, Any]]:
        """The checkpoints the run's series wrote, oldest first (``file``, ``step``)."""
        entries = [e for e in self.read_marker().get('checkpoints', []) if self._own_checkpoint(e)]
        return sorted(entries, key=lambda e: e['step'])

    def foreign_entries(self) -> List[str]:
        """What the marker lists that is no file of its run (other names, paths, links): never deleted."""
        data = self.read_marker()
        files = [n for n in data.get('files', []) if n not in RUN_FILES]
        entries = [e.get('file') if isinstance(e, dict) else e for e in data.get('checkpoints', [])
                   if not self._own_checkpoint(e)]
        return [str(n) for n in files + entries]

    def record(self, path: Path, step: int) -> None:
        """List a checkpoint in the series before it is written (a kill then leaves at worst a listed
        name without a file, never a file that retention does not know)."""
        entries = [e for e in self.series() if e['file'] != path.name] + [dict(file=path.name, step=step)]
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
            _remove(self.path / e['file'])
            _remove_optimizer_folder(self.path / e['file'])
        return [e['file'] for e in drop]

    def set_aside(self, paths: Sequence[Path], step: int) -> Path:
        """Move files of a history a run abandoned (it resumed from an older checkpoint) into a new
        ``abandoned-after-step-N/`` (``-2``, ``-3`` ... after it when that name is taken) and drop them
        from the series: kept, never resumed by mistake."""
        aside, n = self.path / f'abandoned-after-step-{step}', 1
        while os.path.lexists(aside):  # an earlier abandoned history or a link: never moved into, never overwritten
            n += 1
            aside = self.path / f'abandoned-after-step-{step}-{n}'
        aside.mkdir()
        names = {p.name for p in paths}
        self._write_marker(dict(self.read_marker(), checkpoints=[e for e in self.series() if e['file'] not in names]))
        for p in paths:
            os.replace(p, aside / p.name)
            folder = optimizer_folder(p)
            if folder.is_dir() and not folder.is_symlink():
                os.replace(folder, aside / folder.name)
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
