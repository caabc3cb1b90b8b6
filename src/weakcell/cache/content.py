"""Which cached images still hold the content of their files: the cache's side of lineage.

Every committed images row records the content hash of the channel files it was cut from
(``weakcell.data.manifest``). A row describes its image as it is now when that hash is the files' current
one; an image none of whose ``ok`` rows does is cached again (its files hold other pixels: a data set
regenerated under the same IDs), and the merge keeps only the rows that describe the files as they are.
Rows committed before hashes were recorded are judged by time: they stand while no channel file was
modified after their commit, and get the current hash at the merge.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from weakcell.cache.store import SHARDS_DIR
from weakcell.data.manifest import FileHasher, image_files, memo_path


def recorded_hashes(images: pd.DataFrame) -> pd.Series:
    """The content hash each committed images row records, '' for rows from before hashes were recorded
    (shard indexes without the column, or concatenated with ones that have it)."""
    if "content_hash" not in images:
        return pd.Series("", index=images.index, dtype=object)
    return images["content_hash"].astype(object).where(images["content_hash"].notna(), "")


def current_rows(
    images: pd.DataFrame, hashes: dict[str, str], shards_dir: Path, folders: dict[str, str]
) -> np.ndarray:
    """(len(images),) bool: whether each committed images row describes its image as its files are now.

    An ``ok`` row does when its content hash is the files' current one (``hashes``); a row committed before
    hashes were recorded, when none of the image's channel files was modified after its commit (a data
    set regenerated since is cached again). Skipped rows (retried on every run anyway) and rows of images
    this run does not list (another split, an image since dropped from the label file) are kept as they are.
    """
    recorded = recorded_hashes(images).to_numpy()
    now = images["image_id"].map(hashes).to_numpy()
    judged = (images["status"] == "ok").to_numpy() & images["image_id"].isin(hashes.keys()).to_numpy()
    current = ~judged | (recorded == now)
    for position in np.flatnonzero(judged & (recorded == "")):
        image_id, commit = images["image_id"].iat[position], images["commit"].iat[position]
        committed_at = (shards_dir / f"{commit}.images.parquet").stat().st_mtime_ns
        files = [path for path in image_files(folders[image_id], image_id) if path is not None]
        current[position] = all(path.stat().st_mtime_ns <= committed_at for path in files)
    return current


def content_now(
    data_dir: Path, cache_dir: Path, images: pd.DataFrame, folders: dict[str, str]
) -> tuple[FileHasher, dict[str, str]]:
    """The current content hash of every image of ``folders`` (ID -> its split's folder) with an ``ok``
    row in ``images`` (the others are hashed by the worker that caches them), from the memo where the files
    are unchanged."""
    hasher = FileHasher(data_dir, memo_path(cache_dir, data_dir))
    cached = set(images.loc[images["status"] == "ok", "image_id"])
    hashes = hasher.image_hashes(
        (image_id, folder) for image_id, folder in folders.items() if image_id in cached
    )
    return hasher, hashes


def finished_images(
    data_dir: Path, cache_dir: Path, folders: dict[str, str], done: pd.DataFrame
) -> tuple[set[str], set[str], FileHasher]:
    """Which images of ``folders`` are finished (an ``ok`` row in ``done`` for their current content) and
    which were cached from content their files no longer hold (to be cached again); with the hasher that
    judged them (it remembers what it hashed: ``save`` it)."""
    hasher, hashes = content_now(data_dir, cache_dir, done, folders)
    ok = done[(done["status"] == "ok") & done["image_id"].isin(hashes.keys())]
    finished = set(ok.loc[current_rows(ok, hashes, cache_dir / SHARDS_DIR, folders), "image_id"])
    return finished, set(hashes) - finished, hasher


def current_images(
    data_dir: Path, cache_dir: Path, images: pd.DataFrame, folders: dict[str, str]
) -> pd.DataFrame:
    """The committed rows of ``images`` that describe their images as the files are now
    (``current_rows``); a row from before hashes were recorded gets its image's current hash."""
    _, hashes = content_now(data_dir, cache_dir, images, folders)
    images = images[current_rows(images, hashes, cache_dir / SHARDS_DIR, folders)]
    images = images.assign(content_hash=recorded_hashes(images))
    adopted = (
        (images["content_hash"] == "") & images["image_id"].isin(hashes.keys()) & (images["status"] == "ok")
    )
    images.loc[adopted, "content_hash"] = images.loc[adopted, "image_id"].map(hashes)
    return images
