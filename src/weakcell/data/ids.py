"""Image IDs as they enter the kit, and the file names built from them.

An image ID becomes part of file paths everywhere (``train/{ID}_green.png``, ``masks/{ID}_cells.png``,
``truth/{ID}_cells.png``), so one rule holds wherever IDs are read from a file (label files, sample
submissions, truth tables, the ``sources.csv`` of external data): letters, digits, ``.``, ``_`` and ``-``,
starting with a letter or a digit (``SAFE_ID``). The competitions' IDs pass as they are (2021 and 2018 are
UUIDs, ``5c27f04c-bb99-11e8-b2b9-ac1f6b6435d0``), as do the synthetic ones; public HPA images are named
``antibody/plate_well_field`` (``10580/1717_F9_1``), which ``safe_stem`` maps to the file stem
``10580_1717_F9_1``. And every path made from an ID goes through ``inside(folder, name)``, which refuses
a name that would leave its folder, so a file read from elsewhere (a submission scored against the truth)
cannot reach outside either.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from weakcell.errors import WeakcellError

# The first character is never a dot or a dash: no hidden files, nothing a command line reads as a flag.
SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
RULE = "letters, digits, '.', '_' and '-', starting with a letter or digit, at most 200 characters"


class IdError(WeakcellError, ValueError):
    """An image ID that is not safe to build file names from, or a name that would leave its folder."""


def is_safe_id(image_id: object) -> bool:
    """Whether ``image_id`` follows the rule (``SAFE_ID``)."""
    return isinstance(image_id, str) and SAFE_ID.fullmatch(image_id) is not None


def check_id(image_id: object, where: str) -> str:
    """``image_id`` when it is safe; else an ``IdError`` naming ``where`` (e.g. ``train.csv row 3``)."""
    if not is_safe_id(image_id):
        raise IdError(f"{where}: ID {image_id!r} is not a safe image ID ({RULE}); fix that row")
    return str(image_id)


def check_ids(ids: Iterable[object], where: str) -> None:
    """Every ID of a file's rows (``where`` names the file); one line naming the first unsafe row (1 = the
    first data row) and how many more there are."""
    bad = [(row, image_id) for row, image_id in enumerate(ids, start=1) if not is_safe_id(image_id)]
    if bad:
        row, image_id = bad[0]
        more = f" ({len(bad) - 1} more rows like it)" if len(bad) > 1 else ""
        raise IdError(f"{where} row {row}: ID {image_id!r} is not a safe image ID ({RULE}){more}; fix it")


def safe_stem(source_id: str) -> str:
    """The file stem of an external image named ``antibody/plate_well_field`` (or any name with characters
    outside the rule): each run of other characters becomes ``_``, leading ones are dropped
    (``10580/1717_F9_1`` -> ``10580_1717_F9_1``). Distinct names may share a stem (``a/b`` and ``a_b``):
    the caller that writes files checks its stems are unique."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", str(source_id)).lstrip("._-")
    return check_id(stem[:200], f"the stem of {source_id!r}")


def inside(folder: str | os.PathLike[str], name: str) -> Path:
    """``folder / name`` for a plain file name: one path component, not ``.`` or ``..``. Anything else
    (``../x``, ``a/b``, an absolute path, a NUL byte) is an ``IdError``: a path built from an ID never
    leaves its folder. Decided on the name alone, so a folder that is a symlink (Kaggle's inputs) works."""
    separators = {os.sep, os.altsep or os.sep, "/", "\0"}
    if not name or name in (".", "..") or any(s in name for s in separators):
        raise IdError(f"file name {name!r} would leave {folder}; an image ID may hold only {RULE}")
    return Path(folder) / name
