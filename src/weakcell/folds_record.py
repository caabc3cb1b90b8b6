"""The folds file a run reads and its record (``make folds`` writes both; ``weakcell.folds`` makes the folds).

Each setting has its own file (``Config.folds_file``: ``folds/<dataset>.csv`` at the default settings,
``folds/<dataset>-<n>x<seed>[-by-<column>][-dups][-ext[-folded|-mixed]].csv`` otherwise), and beside it
``<file stem>.lineage.json`` records the settings, the label file and, for grouped folds, the near-duplicates
file and external sets it was made from (``weakcell.lineage``). An existing file is reused only for the
settings it records; a file of other settings (``folds.file`` pointing at it) stops the stage with one
line, and a file git tracks (the committed folds) is never overwritten, ``FORCE=1`` included. A run
records the content hash of the folds file it read (``load_folds``), not the fold settings.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from weakcell.config import Config
from weakcell.config.lineage import reads
from weakcell.data.manifest import file_hash, table_hash
from weakcell.errors import StageError
from weakcell.lineage import Lineage, digest
from weakcell.outputs import atomic_write_json

SOURCES_FILE = "sources.csv"  # an external set's antibodies (``make external``), which group its images


def read_folds(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read ``ID,fold``, checking that every ID appears once."""
    folds = pd.read_csv(path, dtype={"ID": str, "fold": int})
    if list(folds.columns) != ["ID", "fold"]:
        raise StageError(f"{path}: expected columns ID,fold, found {list(folds.columns)}")
    duplicated = folds["ID"][folds["ID"].duplicated()].tolist()
    if duplicated:
        raise StageError(f"{path}: IDs in more than one row, e.g. {duplicated[:3]}; rebuild with FORCE=1")
    return folds


def record_path(folds_file: Path) -> Path:
    """``folds/x.csv`` -> ``folds/x.lineage.json``: the settings and label file the folds were made from."""
    return folds_file.with_name(f"{folds_file.stem}.lineage.json")


@dataclass(frozen=True)
class FoldsRecord:
    """What ``<stem>.lineage.json`` says of a folds file: its lineage and the content hash it had when
    written (a file edited since is no longer what the record describes)."""

    lineage: Lineage
    content: str

    @classmethod
    def read(cls, folds_file: Path) -> FoldsRecord | None:
        path = record_path(folds_file)
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
            settings = dict(record["settings"])
            if settings:  # a setting added since the record was written: the folds had its default
                settings = {**reads("folds", Config()), **settings}
            lineage = Lineage("folds", settings, dict(record["upstream"]))
            return cls(lineage, str(record["content"]))
        except (ValueError, KeyError, TypeError) as err:
            raise StageError(
                f"{path} is damaged ({type(err).__name__}); delete it and rerun make folds"
            ) from err

    def write(self, folds_file: Path) -> None:
        atomic_write_json(record_path(folds_file), {**self.lineage.record(), "content": self.content})

    def describe(self) -> str:
        """``3 folds, seed 42`` (plus the group column, near-duplicates, external sets) as recorded."""
        settings = self.lineage.settings
        if not settings:
            return "folds of your own"
        text = f"{settings.get('folds.n_splits')} folds, seed {settings.get('folds.seed')}"
        if settings.get("folds.group_column"):
            text += f", grouped by {settings['folds.group_column']}"
        if settings.get("folds.duplicates"):
            text += f", near-duplicates of {Path(settings['folds.duplicates']).name}"
        if settings.get("folds.external"):
            external = settings["folds.external"]
            own = [key for key in settings if key.startswith("folds.external_modes.")]
            mode = "in mixed modes" if own else settings.get("folds.external_mode")
            text += f", {len(external)} external set(s) {mode}"
        return text


def folds_upstream(cfg: Config, label_file: Path, label_name: str) -> dict[str, str | None]:
    """Fingerprints of what a folds file is made from besides its settings: the label file, the
    near-duplicates file and each external set's label file and ``sources.csv`` (None when not set)."""
    settings = cfg.folds
    external = None
    if settings.external:
        tables = [
            cfg.path(folder) / name for folder in settings.external for name in (label_name, SOURCES_FILE)
        ]
        external = digest([[str(path), table_hash(path)] for path in tables])
    return {
        "labels": file_hash(label_file),
        "duplicates": table_hash(cfg.path(settings.duplicates)) if settings.duplicates else None,
        "external": external,
    }


def is_tracked(path: Path) -> bool:
    """Whether git tracks ``path`` (a committed folds file); False outside a repository or without git."""
    try:
        found = subprocess.run(
            ["git", "ls-files", "--error-unmatch", path.name],
            cwd=path.parent,
            capture_output=True,
            check=False,
        )
    except OSError:
        return False
    return found.returncode == 0


def judge_existing(
    cfg: Config,
    target: Path,
    wanted: Lineage,
    ids: set[str],
    made_by: Callable[[pd.DataFrame], bool],
) -> FoldsRecord | None:
    """Whether the existing ``target`` serves ``cfg``'s settings for the images ``ids`` (the label file's,
    plus external sets'): its record (reuse), None (build it), or a one-line ``StageError`` (it is another
    settings' file, or a tracked file that would be overwritten). ``made_by(folds)``: whether these
    settings make exactly ``folds`` (a file without a record is adopted only then)."""
    tracked = is_tracked(target)
    keep = "git tracks it, so it is never overwritten" if tracked else "rebuild it with FORCE=1"
    if cfg.force:
        if tracked:
            raise StageError(
                f"{target} is tracked by git and is never overwritten; set folds.file to a file of your own "
                "to rebuild folds (or git rm it first to regenerate the committed file)"
            )
        return None
    record, content = FoldsRecord.read(target), file_hash(target)
    folds = read_folds(target)
    if record is None or record.content != content:  # written by hand, or before records existed
        if set(folds["ID"]) == ids and made_by(folds):
            return FoldsRecord(wanted, content)  # adopted: these settings make exactly this file
        if cfg.folds.file and set(folds["ID"]) == ids:
            return FoldsRecord(Lineage("folds", {}, {}), content)  # the user's own folds, used as they are
        use = "" if cfg.folds.file else f"use it as it is with folds.file={target}, or "
        raise StageError(
            f"{target} is not what these settings make (folds.n_splits={cfg.folds.n_splits}, "
            f"folds.seed={cfg.folds.seed}; it has {folds['fold'].nunique()} folds, {len(folds)} of "
            f"{len(ids)} images and no record of its own): {use}{keep}"
        )
    differ = wanted.setting_changes(record.lineage)
    if differ:
        elsewhere = (
            "leave folds.file unset to use these settings' own file, point folds.file at another file"
            if cfg.folds.file
            else "its name, which these settings share, does not say which duplicates file or external sets "
            "(nor external_mode without them): point folds.file at another file"
        )
        raise StageError(
            f"{target} holds folds of other settings ({', '.join(differ)}); {elsewhere}, or {keep}"
        )
    if record.lineage.upstream != wanted.upstream and set(folds["ID"]) != ids:
        if tracked:
            raise StageError(
                f"{target} does not match {cfg.data_dir} ({len(folds)} vs {len(ids)} IDs) and {keep}; "
                "set folds.file to a file of your own for this label file"
            )
        return None  # the kit's own file of these settings, for a label file that has changed: rebuilt
    return record


def load_folds(cfg: Config) -> tuple[pd.DataFrame, str]:
    """The folds file a run reads (``Config.folds_file``) and its content hash, which the run records. A
    file whose record names other fold settings (``folds.file`` pointing at it) stops with one line."""
    target = cfg.folds_file
    if not target.is_file():
        raise FileNotFoundError(f"no folds file {target}; run `make folds` first")
    record = FoldsRecord.read(target)
    content = file_hash(target)
    if record is not None and record.content == content and record.lineage.settings:
        settings_only = Lineage.of("folds", cfg, labels=None, duplicates=None, external=None)
        differ = settings_only.setting_changes(record.lineage)
        if differ:
            raise StageError(
                f"{target} holds folds of other settings ({', '.join(differ)}); run make folds with these "
                "settings (their own file), or point folds.file at the file you mean"
            )
    return read_folds(target), content


def describe_folds(folds_file: Path) -> str:
    """``synthetic-3x42.csv: 3 folds, seed 42`` from the file's record (what the leaderboard prints)."""
    record = FoldsRecord.read(folds_file)
    if record is None:
        return f"{folds_file.name}: folds of your own"
    return f"{folds_file.name}: {record.describe()}"
