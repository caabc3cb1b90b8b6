"""The ablation's control run (``<name>-control``, ``weakcell.ablate``) and its refinement rule variants
(``<name>-<variant>``, with round 0's inner models too) take round 0 of the weak run instead of training it
again: weights and tables as hard links, which is safe because every writer replaces them by
an atomic rename and none rewrites one in place; every other file copied, so a stage of one run never changes
the other's; locks and temporaries never taken. A control whose round 0 is stale is replaced whole, its lock
kept (a waiting run may hold it open).
"""

from __future__ import annotations

import filecmp
import os
import shutil
from pathlib import Path

from weakcell.outputs import LOCK_FILE

# What the control's rounds start from: round 0's out-of-fold tables (the rule reads them) and its fold
# models (fine-tuned). ``target`` holds a current round 0 when each of these is ``source``'s own file.
ROUND_ZERO_INPUTS = ("oof_image.parquet", "oof_cell.parquet", "fold*/cell/model.pt")
# What a refinement rule variant also reads: round 0's inner models, whose predictions its targets come from.
INNER_INPUTS = ("inner/fold*/oof_image.parquet", "inner/fold*/oof_cell.parquet", "inner/fold*/cell/model.pt")


def holds_round_zero(source: Path, target: Path, inner: bool = False) -> bool:
    """Whether ``target`` holds ``source``'s current round 0: every ``ROUND_ZERO_INPUTS`` file of ``source``
    (and ``INNER_INPUTS`` with ``inner``) is in ``target`` as the same file (a hard link) or an equal copy. A
    retrained round 0 (``FORCE=1``) writes new files (atomic renames), so the old links no longer match."""
    patterns = ROUND_ZERO_INPUTS + (INNER_INPUTS if inner else ())
    files = [path.relative_to(source) for pattern in patterns for path in source.glob(pattern)]
    return bool(files) and all(
        (target / name).is_file()
        and (
            os.path.samefile(source / name, target / name)
            or filecmp.cmp(source / name, target / name, shallow=False)
        )
        for name in files
    )


# Round 0's files the control shares with the weak run by hard link: the large ones, which every writer
# replaces by an atomic rename and none rewrites in place (a retrained weak run gets new files; the links keep
# the old ones). Anything else (metrics.json, config.yaml, run.json, thresholds.json, logs, plots) is copied,
# so a stage of one run never changes the other's; locks and temporaries are never taken.
SHARED_SUFFIXES = (".pt", ".parquet", ".npz")
NOT_TAKEN = ("round*", "inner", LOCK_FILE, ".weakcell.*.lock", "*.tmp")


def _share(source: str, target: str) -> str:
    """``shutil.copytree``'s copy function: a hard link for ``SHARED_SUFFIXES`` (a copy across file
    systems), a copy otherwise."""
    if Path(source).suffix in SHARED_SUFFIXES:
        try:
            os.link(source, target)
            return target
        except OSError:
            pass
    return str(shutil.copy2(source, target))


def clear_folder(folder: Path) -> None:
    """Delete everything in ``folder`` but its lock file, which a waiting run may hold open (deleting it
    would let two runs lock two different files)."""
    for child in folder.iterdir() if folder.is_dir() else ():
        if child.name == LOCK_FILE:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def link_round_zero(source: Path, target: Path, inner: bool = False) -> None:
    """Round 0 of ``source`` into ``target`` (no retraining): weights and tables as hard links, the rest
    copied (``SHARED_SUFFIXES``); refinement rounds, locks and temporaries are not taken, round 0's inner
    models only with ``inner`` (a rule variant reads their predictions; the control reads none). A
    ``target`` whose round 0 is stale (``source`` was retrained) is replaced whole: its rounds were
    fine-tuned from the old round 0. Call it holding ``target``'s lock."""
    if holds_round_zero(source, target, inner):
        return
    clear_folder(target)
    ignore = shutil.ignore_patterns(*(p for p in NOT_TAKEN if not (inner and p == "inner")))
    shutil.copytree(source, target, copy_function=_share, ignore=ignore, dirs_exist_ok=True)
