"""Writing an output folder safely: one writer at a time, machine faults stop the stage, no stale temporaries.

* ``folder_lock(folder, stage)``: every stage that writes a folder (cache, cache-merge, train, refine,
  thresholds, infer) holds ``<folder>/.weakcell.lock`` for its whole run. The lock is an ``flock`` on that
  file plus a record of the holder (stage, pid, host, start time) written inside it. The kernel releases an
  flock when its process dies, however it dies (kill -9 included), so the lock of a dead run is stale by
  construction: the next run takes it over and says whose it was; nothing guesses whether a pid still
  lives. The file itself is never deleted (a waiter could lock the deleted inode while a newcomer locks a
  new file). A second run waits up to ``checks.lock_wait_s`` seconds, then refuses with one line naming
  the holder. Parts of a split cache (``cache.num_shards``) share the folder and each holds its own part
  lock, so they run side by side while an unsplit run or a merge excludes them all. Under torchrun, rank 0
  holds the lock for the group.
* ``OutputError``: a write that fails for a reason of the machine (permissions, a full disk, a folder that
  vanished) is not a fault of the image or row being written; it stops the stage with one line naming the
  file and the fix. ``writing(path)`` turns an ``OSError`` into it; ``atomic_write`` writes through a
  temporary file and a rename, removing the temporary when anything fails. Every file a stage writes goes
  through it or one of the helpers beside it (text, bytes, JSON, parquet, CSV, a matplotlib figure);
  ``tests/test_outputs.py`` lists the writers of the package so that a new bare write fails it.
* ``clean_temporaries(folder)``: the ``*.tmp`` files of a killed run, removed under the lock.
* ``read_json(path)``: a JSON record a stage wrote (``metrics.json``, ...); a damaged one is one line.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from weakcell.errors import StageError

LOCK_FILE = ".weakcell.lock"
# Seconds between two tries while waiting for a busy folder.
POLL_S = 0.2


class FolderInUse(OSError):
    """Another live process holds the folder's lock; the message names it."""

    def __str__(self) -> str:
        return str(self.strerror)


class OutputError(OSError):
    """A write failed for a reason of the machine; the message names the file and the fix."""

    def __str__(self) -> str:
        return str(self.strerror)


# -- output faults --------------------------------------------------------------------------------------

_FIXES = {
    errno.EACCES: "make {folder} writable by this user, or write elsewhere (paths.root=... or the stage's dir key)",
    errno.EPERM: "make {folder} writable by this user, or write elsewhere (paths.root=... or the stage's dir key)",
    errno.EROFS: "{folder} is on a read-only file system: write elsewhere (paths.root=... or the stage's dir key)",
    errno.ENOSPC: "free space on the disk holding {folder} (df -h {folder}), then rerun: finished work is kept",
    errno.EDQUOT: "free space in your quota on {folder} (df -h {folder}), then rerun: finished work is kept",
    errno.ENOENT: "{folder} disappeared while the stage ran; rerun it (finished work is kept)",
}


def output_error(err: OSError, path: str | os.PathLike[str]) -> OutputError:
    """One line: what could not be written, the system's reason and the fix."""
    if isinstance(err, OutputError):
        return err
    path = Path(path)
    reason = os.strerror(err.errno) if err.errno else str(err)
    fix = _FIXES.get(err.errno or 0, "check that {folder} is writable and has free space, then rerun")
    message = f"cannot write {path}: {reason}; {fix.format(folder=path.parent)}"
    return OutputError(err.errno or errno.EIO, message)


@contextmanager
def writing(path: str | os.PathLike[str]) -> Iterator[None]:
    """Inside, an ``OSError`` becomes an ``OutputError`` about ``path``."""
    try:
        yield
    except OSError as err:
        raise output_error(err, path) from err


def atomic_write(
    path: str | os.PathLike[str],
    write: Callable[[Path], object],
    *,
    durable: bool = False,
    shared: bool = False,
) -> Path:
    """``write(tmp)`` then rename ``tmp`` to ``path``: a reader never sees half a file. The temporary is
    removed when anything fails; an ``OSError`` becomes an ``OutputError`` naming ``path``.

    durable: flush the temporary to the disk before the rename (checkpoints: a power cut leaves the old
    file or the new one, never an empty one). shared: the file is written without holding its folder's
    lock (several processes may write it at once), so each writes its own temporary (``<name>.<pid>.tmp``)
    and the last rename wins whole."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp" if shared else f"{path.name}.tmp")
    try:
        with writing(path):
            write(tmp)
            if durable:
                with open(tmp, "rb+") as handle:
                    os.fsync(handle.fileno())
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str, *, shared: bool = False) -> Path:
    """``atomic_write`` of a text file."""
    return atomic_write(path, lambda tmp: tmp.write_text(text), shared=shared)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """``atomic_write`` of a binary file."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path: str | os.PathLike[str], payload: object, *, indent: int | None = 2) -> Path:
    """``atomic_write`` of ``payload`` as JSON text ending in a newline; numpy scalars are written as
    plain numbers."""
    text = json.dumps(payload, indent=indent, default=_plain) + "\n"
    return atomic_write_text(path, text)


def _plain(value: object) -> object:
    """JSON for numpy scalars (``np.float64(0.5).item()``); anything else is a bug of the caller."""
    item = getattr(value, "item", None)
    if item is None:
        raise TypeError(f"{type(value).__name__} is not JSON serialisable")
    return item()


class _Table(Protocol):
    def to_parquet(self, path: Path, *, index: bool) -> object: ...

    def to_csv(self, path: Path, *, index: bool) -> object: ...


def atomic_parquet(path: str | os.PathLike[str], table: _Table, *, shared: bool = False) -> Path:
    """``atomic_write`` of a pandas table as parquet, without its index."""
    return atomic_write(path, lambda tmp: table.to_parquet(tmp, index=False), shared=shared)


def atomic_csv(path: str | os.PathLike[str], table: _Table) -> Path:
    """``atomic_write`` of a pandas table as CSV, without its index."""
    return atomic_write(path, lambda tmp: table.to_csv(tmp, index=False))


class _Figure(Protocol):
    def savefig(self, fname: Path, **kwargs: Any) -> object: ...


def atomic_savefig(path: str | os.PathLike[str], figure: _Figure, **savefig_kwargs: Any) -> Path:
    """``atomic_write`` of a matplotlib figure; the format comes from ``path``'s suffix (the temporary's
    ``.tmp`` would hide it)."""
    path = Path(path)
    kwargs = {"format": path.suffix.lstrip(".") or "png", **savefig_kwargs}
    return atomic_write(path, lambda tmp: figure.savefig(tmp, **kwargs))


def read_json(path: str | os.PathLike[str], fix: str = "rerun the stage that wrote it with FORCE=1") -> Any:
    """The JSON a stage wrote at ``path``. A damaged file (emptied, cut short, not JSON) is one
    ``StageError`` line naming it and ``fix``: only a fault of the machine or a hand edit makes one."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        reason = "it is empty" if not path.read_bytes().strip() else f"not JSON ({err})"
        raise StageError(f"{path} is damaged: {reason}; {fix}") from err


def clean_temporaries(folder: str | os.PathLike[str], recursive: bool = False) -> int:
    """Delete the ``*.tmp`` files a killed run left in ``folder``; call it holding the folder's lock (then
    every temporary there belongs to a dead run). Returns how many were removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    found = folder.rglob("*.tmp") if recursive else folder.glob("*.tmp")
    removed = 0
    for path in found:
        if path.is_file():
            with writing(path):
                path.unlink(missing_ok=True)
            removed += 1
    return removed


# -- the lock ---------------------------------------------------------------------------------------------

# Locks this process holds: lock file -> (descriptor, depth). A stage that calls another stage's function on
# the same folder (cache -> merge) re-enters its own lock instead of waiting for itself.
_HELD: dict[str, tuple[int, int]] = {}


def _record(stage: str) -> dict[str, object]:
    return {
        "stage": stage,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv[:3]),
    }


def _read_record(fd: int, patience_s: float = 0.0) -> dict[str, object]:
    """The holder's record; ``patience_s``: a lock just taken has its record written a moment later."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            text = os.pread(fd, 4096, 0).decode()
            record = json.loads(text) if text.strip() else {}
        except (OSError, ValueError):  # half written
            record = {}
        if (record and isinstance(record, dict)) or time.monotonic() >= deadline:
            return record if isinstance(record, dict) else {}
        time.sleep(POLL_S / 4)


def _describe(record: dict[str, object]) -> str:
    if not record:
        return "another process (it has not written its record yet)"
    return f"`weakcell {record.get('stage')}` (pid {record.get('pid')} on {record.get('host')}, since {record.get('since')})"


def _try_lock(fd: int, shared: bool, path: Path) -> bool:
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as err:  # a file system without locks (some network and FUSE mounts)
        raise OSError(
            err.errno,
            f"cannot lock {path}: {os.strerror(err.errno or 0)}; put the outputs on a local disk (paths.root=...)",
        ) from err
    return True


def _holders(lock_path: Path) -> str:
    """Who holds ``lock_path``: its record or, for a folder that split parts share, theirs. Records are only
    read (probing a part's lock could make that part fail to take it); a finished part empties its record."""
    paths = [lock_path]
    if lock_path.name == LOCK_FILE:
        paths += sorted(lock_path.parent.glob(".weakcell.part*.lock"))
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            record = _read_record(fd, patience_s=2.0 if path == lock_path else 0.0)
        finally:
            os.close(fd)
        if record:
            return _describe(record)
    return _describe({})


def _acquire(lock_path: Path, stage: str, wait_s: float, shared: bool) -> None:
    key = str(lock_path.resolve())
    if key in _HELD:
        fd, depth = _HELD[key]
        _HELD[key] = (fd, depth + 1)
        return
    with writing(lock_path):
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s
    try:
        while not _try_lock(fd, shared, lock_path):
            if time.monotonic() >= deadline:
                holder = _holders(lock_path)
                how = f"waited {wait_s:g} s; " if wait_s else ""
                raise FolderInUse(
                    errno.EBUSY,
                    f"{lock_path.parent} is in use by {holder}; {how}let it finish, or wait for it with "
                    "checks.lock_wait_s=<seconds> (a run that died releases its lock by itself)",
                )
            time.sleep(POLL_S)
        if not shared:
            previous = _read_record(fd)
            if previous:  # its holder released nothing: it died (a finished run empties the record)
                print(
                    f"{stage}: took over the lock of {lock_path.parent} from {_describe(previous)}, which is no longer running"
                )
            with writing(lock_path):
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(_record(stage)).encode(), 0)
    except BaseException:
        os.close(fd)  # closing releases the flock
        raise
    _HELD[key] = (fd, 1)


def _release(lock_path: Path, shared: bool) -> None:
    key = str(lock_path.resolve())
    fd, depth = _HELD[key]
    if depth > 1:
        _HELD[key] = (fd, depth - 1)
        return
    del _HELD[key]
    try:
        if not shared:
            os.ftruncate(fd, 0)  # an empty record: released in good order
    finally:
        os.close(fd)


@contextmanager
def folder_lock(
    folder: str | os.PathLike[str], stage: str, wait_s: float = 0.0, part: str | None = None
) -> Iterator[None]:
    """Hold ``folder``'s lock while the block runs (``folder`` is created if needed).

    part: this run is one part of a split stage (e.g. ``part001-of-004`` of a cache): it shares the folder
    with the other parts and holds the part's own lock exclusively. Raises ``FolderInUse`` naming the
    holder when the lock stays taken for ``wait_s`` seconds."""
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 holds it for the group
        yield
        return
    folder = Path(folder)
    with writing(folder):
        folder.mkdir(parents=True, exist_ok=True)
    folder_path = folder / LOCK_FILE
    part_path = folder / f".weakcell.{part}.lock" if part else None
    _acquire(folder_path, stage, wait_s, shared=part_path is not None)
    try:
        if part_path is not None:
            _acquire(part_path, stage, wait_s, shared=False)
        try:
            yield
        finally:
            if part_path is not None:
                _release(part_path, shared=False)
    finally:
        _release(folder_path, shared=part_path is not None)
