"""The data set's manifest: a content hash per image (its four channel files) and per table the stages
read (the label file, the synthetic truth), so that outputs are reused only for the content they were
made from, not for a file name that now holds other pixels.

Hashes are blake2b (128-bit digests) of the files' bytes, ~1 GB/s on one core (``benchmarks/lineage.md``).
Each file is hashed once: ``FileHasher`` remembers its hash under (name, size, mtime_ns) in a memo file
beside the cache (``<cache>/../manifests/``: the data folder may be read-only, e.g. ``/kaggle/input``),
so a rerun stats the files and reads none. A file rewritten with the same bytes (a regenerated image that
did not change) keeps its hash under its new mtime.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from weakcell.constants import CHANNELS
from weakcell.data.ids import inside
from weakcell.data.images import EXTENSIONS
from weakcell.lineage import digest
from weakcell.outputs import atomic_parquet

DIGEST_BYTES = 16
MEMO_COLUMNS = ("name", "size", "mtime_ns", "hash")
# Threads hashing files at once: hashlib releases the GIL on large buffers, and reading overlaps hashing.
HASH_THREADS = 8


def file_hash(path: str | os.PathLike[str]) -> str:
    """blake2b of a file's bytes, hex."""
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, lambda: hashlib.blake2b(digest_size=DIGEST_BYTES)).hexdigest()


def image_files(folder: str | os.PathLike[str], image_id: str) -> list[Path | None]:
    """The channel file of each of the 4 channels (the first extension found, as the reader takes it), or
    None for a missing one."""
    folder = Path(folder)
    found: list[Path | None] = []
    for channel in CHANNELS:
        candidates = (inside(folder, f"{image_id}_{channel}{ext}") for ext in EXTENSIONS)
        found.append(next((path for path in candidates if path.is_file()), None))
    return found


def combine(files: list[Path | None], hashes: dict[Path, str]) -> str:
    """An image's content hash from its channel files' hashes (a missing channel counts as such)."""
    return digest([[path.name, hashes[path]] if path is not None else None for path in files])


@dataclass(frozen=True)
class FileRecord:
    """A file's hash under the size and modification time it had when hashed."""

    name: str
    size: int
    mtime_ns: int
    hash: str


def stat_record(path: Path, root: Path, content_hash: str) -> FileRecord:
    stat = path.stat()
    return FileRecord(str(path.relative_to(root)), stat.st_size, stat.st_mtime_ns, content_hash)


class FileHasher:
    """Content hashes of the files under ``root``, remembered by (name, size, mtime_ns) in ``memo_path``
    (None: not remembered). ``save`` writes what was learnt; several processes may share the memo (each
    merges what is on disk before it writes, and a lost entry is only hashed again)."""

    def __init__(self, root: str | os.PathLike[str], memo_path: str | os.PathLike[str] | None) -> None:
        self.root = Path(root)
        self.memo_path = Path(memo_path) if memo_path is not None else None
        self.memo: dict[str, FileRecord] = self._load()
        self.learnt: dict[str, FileRecord] = {}
        self.hashed_bytes = 0  # bytes read this time (not found in the memo)

    def _load(self) -> dict[str, FileRecord]:
        if self.memo_path is None or not self.memo_path.is_file():
            return {}
        try:
            table = pd.read_parquet(self.memo_path)
        except (OSError, ValueError):  # a damaged memo costs a rehash, nothing else
            return {}
        return {row.name: FileRecord(*row) for row in table[list(MEMO_COLUMNS)].itertuples(index=False)}

    def _remembered(self, path: Path) -> str | None:
        record = self.memo.get(str(path.relative_to(self.root)))
        if record is None:
            return None
        stat = path.stat()
        return record.hash if (record.size, record.mtime_ns) == (stat.st_size, stat.st_mtime_ns) else None

    def hash_files(self, paths: Iterable[Path]) -> dict[Path, str]:
        """The content hash of each file; those the memo does not know are read, on several threads."""
        hashes: dict[Path, str] = {}
        unknown = []
        for path in paths:
            remembered = self._remembered(path)
            if remembered is None:
                unknown.append(path)
            else:
                hashes[path] = remembered
        if unknown:
            with ThreadPoolExecutor(min(HASH_THREADS, len(unknown))) as pool:
                for path, content_hash in zip(unknown, pool.map(file_hash, unknown)):
                    hashes[path] = content_hash
                    self.remember([stat_record(path, self.root, content_hash)])
                    self.hashed_bytes += path.stat().st_size
        return hashes

    def image_hashes(self, images: Iterable[tuple[str, str | os.PathLike[str]]]) -> dict[str, str]:
        """``(image_id, folder)`` pairs -> each image's content hash (``combine`` of its channel files)."""
        files = {image_id: image_files(folder, image_id) for image_id, folder in images}
        hashes = self.hash_files(path for paths in files.values() for path in paths if path is not None)
        return {image_id: combine(paths, hashes) for image_id, paths in files.items()}

    def remember(self, records: Iterable[FileRecord]) -> None:
        """Hashes computed elsewhere (a cache worker hashes the files it has just decoded)."""
        for record in records:
            self.memo[record.name] = record
            self.learnt[record.name] = record

    def save(self) -> None:
        """Write the memo with what was learnt since it was read (nothing when nothing was)."""
        if self.memo_path is None or not self.learnt:
            return
        merged = {**self._load(), **self.learnt}
        table = pd.DataFrame([vars(r) for r in merged.values()], columns=list(MEMO_COLUMNS))
        self.memo_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_parquet(self.memo_path, table, shared=True)
        self.learnt = {}


def hash_image_files(
    folder: str | os.PathLike[str], image_id: str, root: Path
) -> tuple[str, list[FileRecord]]:
    """An image's content hash and its files' records, reading them now (a worker that has just decoded
    them reads them from the page cache)."""
    files = image_files(folder, image_id)
    hashes = {path: file_hash(path) for path in files if path is not None}
    records = [stat_record(path, root, content_hash) for path, content_hash in hashes.items()]
    return combine(files, hashes), records


def memo_path(cache_dir: Path, data_dir: Path) -> Path:
    """Where the hashes of ``data_dir``'s files are remembered: beside the caches of that data (every
    segmentation backend's cache shares it), one file per data folder."""
    return cache_dir.parent / "manifests" / f"{data_dir.name}-{digest(str(data_dir.resolve()))[:8]}.parquet"


def table_hash(path: str | os.PathLike[str]) -> str | None:
    """The content hash of a file the stages read whole (a label file), None when it is absent."""
    return file_hash(path) if Path(path).is_file() else None


def folder_hash(folder: str | os.PathLike[str]) -> str | None:
    """One content hash of every file under ``folder`` (names and bytes; the synthetic truth), None when
    the folder is absent. Small folders only: nothing is remembered."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".tmp"))
    return digest([[str(p.relative_to(folder)), file_hash(p)] for p in files])
