"""``weakcell duplicates DIR [DIR ...] --json OUT``: near-duplicate images within and across folders.

Each DIR is a folder of ``<id>_<color>.<png|jpg|tif|tif.gz>`` channel files (a data set's ``train/`` or
``test/``). Every image is hashed (``weakcell.duplicates.hashing``: 4 x 64-bit DCT hashes, cached by file
content in ``--cache``), every pair within ``--max-distance`` of the 256 bits is found
(``weakcell.duplicates.search``, exact), and the JSON holds::

    {"pairs": [{"a": id, "b": id, "distance": d}, ...], "clusters": [[id, ...], ...]}

pairs sorted by distance then IDs (``a < b``), clusters (connected components of the pairs) sorted. IDs
must be unique over all DIRs. ``make folds`` reads the file (``folds.duplicates``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from weakcell.cli import EXPECTED_ERRORS
from weakcell.duplicates.hashing import HashCache, ImageFiles, hash_files, init_worker, list_images
from weakcell.duplicates.search import clusters, find_pairs
from weakcell.errors import StageError
from weakcell.outputs import atomic_write_text
from weakcell.parallel import n_workers, pool_context

# Default largest distance of a pair, of 256 bits. Copies of the 5 real images (JPEG quality 75, resized to
# 1728 and 3072, 16-bit, x1.6 + 10, x0.5) stay within 8; different images are 108 or more apart
# (benchmarks/duplicates.md).
MAX_DISTANCE = 24
DEFAULT_CACHE = "cache/duplicates/hashes.parquet"
_SAVE_EVERY = 2000  # images between cache saves: a killed run keeps most of its work
_INLINE = 16  # at most this many images to hash: no process pool (spawning one costs about a second each)


@dataclass
class Hashed:
    """Every image's ID, folder and ``(4,)`` hash, in folder then ID order."""

    ids: list[str] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)
    hashes: list[np.ndarray] = field(default_factory=list)
    from_cache: int = 0
    incomplete: dict[str, list[str]] = field(default_factory=dict)  # folder -> IDs lacking a channel
    unreadable: list[str] = field(default_factory=list)  # why each image left out did not decode


def collect_images(
    folders: Sequence[str | Path],
) -> tuple[list[tuple[str, ImageFiles]], dict[str, list[str]]]:
    """Every complete image of ``folders`` with its folder, and the incomplete IDs per folder. Raises
    StageError for a folder that does not exist or an ID present in two folders."""
    images: list[tuple[str, ImageFiles]] = []
    incomplete: dict[str, list[str]] = {}
    seen: dict[str, str] = {}
    for folder in map(str, folders):
        if not Path(folder).is_dir():
            raise StageError(
                f"duplicates: {folder} is not a folder (give folders of <id>_<color> channel files)"
            )
        found, missing = list_images(folder)
        for image in found:
            if image.image_id in seen:
                raise StageError(
                    f"duplicates: image {image.image_id} is in both {seen[image.image_id]} and {folder}; "
                    "IDs must be unique over the folders"
                )
            seen[image.image_id] = folder
            images.append((folder, image))
        if missing:
            incomplete[folder] = missing
    return images, incomplete


def hash_images(folders: Sequence[str | Path], cache: HashCache, workers: int = 0) -> Hashed:
    """Hash every complete image of ``folders``, from ``cache`` where a file is unchanged or its content
    known; a progress bar counts images."""
    images, incomplete = collect_images(folders)
    result = Hashed(incomplete=incomplete)
    values: dict[Path, int] = {}
    todo: list[ImageFiles] = []
    for _, image in images:
        cached = {path: cache.lookup(path) for path in image.paths}
        hits = {path: value for path, value in cached.items() if value is not None}
        if len(hits) == len(cached):
            values.update(hits)
            result.from_cache += 1
        else:
            todo.append(image)
    unreadable: set[str] = set()
    try:
        with tqdm(total=len(images), initial=result.from_cache, unit="img", desc="duplicates") as bar:
            for done, (rows, error) in enumerate(_hash_all(todo, cache, workers), start=1):
                image = todo[done - 1]
                if error is not None:
                    unreadable.add(image.image_id)
                    result.unreadable.append(error)
                for (path, size, mtime_ns, sha256, value), original in zip(rows, image.paths):
                    cache.add(path, size, mtime_ns, sha256, value)
                    values[original] = value
                bar.update(1)
                if done % _SAVE_EVERY == 0:
                    cache.save()
    finally:
        cache.save()
    for folder, image in images:
        if image.image_id not in unreadable:
            result.ids.append(image.image_id)
            result.folders.append(folder)
            result.hashes.append(np.array([values[p] for p in image.paths], dtype=np.uint64))
    return result


def _hash_all(
    todo: list[ImageFiles], cache: HashCache, workers: int
) -> Iterator[tuple[list[tuple[str, int, int, str, int]], str | None]]:
    """``hash_files`` of each image in order, in a pool when there is enough work."""
    if len(todo) <= _INLINE:
        init_worker(cache.by_content)
        yield from (hash_files(image.paths) for image in todo)
        return
    with ProcessPoolExecutor(
        n_workers(workers, len(todo)), mp_context=pool_context(), initializer=init_worker,
        initargs=(cache.by_content,),
    ) as pool:  # fmt: skip
        yield from pool.map(hash_files, [image.paths for image in todo], chunksize=4)


def duplicates_json(ids: Sequence[str], hashes: np.ndarray, max_distance: int) -> dict[str, list]:
    """``{"pairs": [...], "clusters": [...]}`` of the images whose hashes are within ``max_distance``."""
    first, second, distance = find_pairs(hashes, max_distance)
    pairs = sorted(
        (int(d), *sorted((ids[i], ids[j])))
        for i, j, d in zip(first.tolist(), second.tolist(), distance.tolist())
    )
    groups = sorted(sorted(ids[k] for k in group) for group in clusters(len(ids), first, second))
    return {"pairs": [{"a": a, "b": b, "distance": d} for d, a, b in pairs], "clusters": groups}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``weakcell duplicates``; see the module docstring."""
    parser = argparse.ArgumentParser(prog="weakcell duplicates", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", metavar="DIR", help="folders of <id>_<color> channel files")
    parser.add_argument("--json", required=True, help="where to write the pairs and clusters")
    parser.add_argument(
        "--max-distance",
        type=int,
        default=MAX_DISTANCE,
        help=f"largest pair distance of 256 bits ({MAX_DISTANCE})",
    )
    parser.add_argument(
        "--cache", default=DEFAULT_CACHE, help=f"hash cache file ({DEFAULT_CACHE}); '' = none"
    )
    parser.add_argument("--workers", type=int, default=0, help="processes; 0 = one per core")
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_:
        return 0 if exit_.code == 0 else 2
    try:
        if not 0 <= args.max_distance <= 128:
            raise StageError(f"duplicates: --max-distance {args.max_distance} is outside 0..128")
        cache = HashCache(Path(args.cache) if args.cache else None)
        hashed = hash_images(args.folders, cache, args.workers)
        hashes = np.stack(hashed.hashes) if hashed.hashes else np.zeros((0, 4), dtype=np.uint64)
        payload = duplicates_json(hashed.ids, hashes, args.max_distance)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.json, json.dumps(payload, indent=1) + "\n")
    except EXPECTED_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for folder, missing in hashed.incomplete.items():
        print(
            f"duplicates: skipped {len(missing)} image(s) of {folder} lacking a channel, e.g. {missing[:3]}"
        )
    if hashed.unreadable:
        print(
            f"duplicates: skipped {len(hashed.unreadable)} image(s) that do not decode, e.g. {hashed.unreadable[0]}"
        )
    print(
        f"duplicates: {len(hashed.ids):,} images in {len(args.folders)} folder(s) "
        f"({hashed.from_cache:,} from the cache), {len(payload['pairs']):,} pairs within distance "
        f"{args.max_distance} in {len(payload['clusters']):,} clusters -> {args.json}"
    )
    return 0
