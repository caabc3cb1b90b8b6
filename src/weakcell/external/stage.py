"""``make external`` / ``weakcell external``: a public HPA image list -> a data set in the competition's layout.

Output folder (``external.dir``, default ``{paths.data}/{data.dataset}-external``)::

    train/<ID>_<color>.png   the stored images, uint8, every channel the same size
    train.csv                the labels in the data set's own numbering (hpa2021: ID,Label with '|')
    sources.csv              one row per image tried: ID, url_stem, antibody, cell_line, locations, format,
                             bit_depth, width, height (native), stored_width, stored_height,
                             sha256_<color> of each stored PNG, status (ok | failed), reason (why
                             it failed, or why a channel took the TIFF)
    source.json              the list it came from (path, sha256, form), the settings, what each filter dropped
    fetch-log.jsonl          one line per finished image, appended as it finishes: what a rerun skips

A killed run resumes: an image whose line says ``ok`` and whose four PNGs exist is never requested again;
failed images are tried again (``FORCE=1`` fetches every image again). ``--dry-run`` (``external.dry_run=true``) prints the counts, bytes, disk
space and time at the chosen rate and fetches nothing.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from weakcell.config import Config, ExternalConfig
from weakcell.constants import CHANNELS
from weakcell.data.datasets import DatasetSpec, get_dataset
from weakcell.data.images import write_channel
from weakcell.data.labels import format_labels
from weakcell.errors import StageError
from weakcell.external.convert import SOURCES_COLUMNS, ImageRejected, to_stored
from weakcell.external.fetch import ChannelFailed, Fetcher
from weakcell.external.lists import Selection, channel_file, read_image_list, select_images
from weakcell.external.locations import location_table
from weakcell.outputs import atomic_write, clean_temporaries, folder_lock, writing

LOG = "fetch-log.jsonl"

# What the dry run's arithmetic assumes (benchmarks/external-sizes.md measures the byte rates):
# mean pixels of a public image, taking the competition's size mix as the proxy (17,955 images at 2048²,
# 3,842 at 3072², 9 at 4096² of 21,806; ../shared/reference/hpa-external-data.md)
MEAN_NATIVE_PIXELS = 5.12e6
# bytes per pixel of one channel: the 5 real 2048² images re-encoded as JPEG at quality 90 (the HPA's own
# quality is not published; 85 and 95 give 0.11 and 0.20), and stored as PNG at png_compression 1
JPEG_BYTES_PER_PIXEL = 0.138
PNG_BYTES_PER_PIXEL = 0.37


def external_dir(cfg: Config) -> Path:
    """Where ``make external`` writes: ``external.dir`` or ``{paths.data}/{data.dataset}-external``."""
    if cfg.external.dir:
        return cfg.path(cfg.external.dir)
    return cfg.path(cfg.paths.data) / f"{cfg.data.dataset}-external"


@dataclass(frozen=True)
class Estimate:
    """The dry run's arithmetic for ``images`` images (4 channels each, JPEG first)."""

    images: int
    requests: int
    download_bytes: float
    stored_bytes: float
    seconds: float  # at the chosen request rate

    @classmethod
    def of(cls, images: int, settings: ExternalConfig) -> Estimate:
        requests = images * len(CHANNELS)
        side = settings.size
        stored_pixels = MEAN_NATIVE_PIXELS if side is None else side * side
        return cls(
            images,
            requests,
            requests * MEAN_NATIVE_PIXELS * JPEG_BYTES_PER_PIXEL,
            requests * stored_pixels * PNG_BYTES_PER_PIXEL,
            requests / settings.rate,
        )

    def lines(self, settings: ExternalConfig, free_bytes: int, folder: Path) -> list[str]:
        storage = "native size" if settings.size is None else f"{settings.size} px"
        needs_mbit = settings.rate / len(CHANNELS) * self.download_bytes / max(self.images, 1) * 8 / 1e6
        return [
            f"  to fetch: {self.images:,} images x {len(CHANNELS)} channels = {self.requests:,} JPEG requests "
            f"(a TIFF fallback adds one per channel), about {self.download_bytes / 1e9:,.1f} GB",
            f"  to store: about {self.stored_bytes / 1e9:,.1f} GB of PNG at {storage}; "
            f"{free_bytes / 1e9:,.1f} GB free on {folder}",
            f"  time: about {_duration(self.seconds)} at external.rate={settings.rate:g} requests/s "
            f"({settings.rate / len(CHANNELS):g} images/s, which needs about {needs_mbit:,.0f} Mbit/s)",
        ]


def _duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:,.1f} h" if seconds < 72 * 3600 else f"{seconds / 86400:,.1f} days"


class FetchLog:
    """``fetch-log.jsonl``: one JSON record per finished image, appended and flushed as it finishes, so a
    kill loses at most the images in flight. A torn last line (a kill mid-write) is ignored."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def records(self) -> dict[str, dict[str, Any]]:
        """ID -> its latest record."""
        latest: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                latest[record["ID"]] = record
        return latest

    def done(self, folder: Path) -> set[str]:
        """IDs stored in a finished run: their record says ok and their four PNGs exist."""
        return {
            image
            for image, record in self.records().items()
            if record["status"] == "ok" and all(channel_file(folder, image, c).is_file() for c in CHANNELS)
        }

    def append(self, record: dict[str, Any]) -> None:
        with writing(self.path), self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()


def fetch_image(fetcher: Fetcher, row: Any, folder: Path, settings: ExternalConfig) -> dict[str, Any]:
    """Fetch, decode, convert and store one image's four channels -> its log record. A channel that fails
    stops the image (its other channels are not requested); the record says why."""
    record: dict[str, Any] = {"ID": row.ID, "status": "failed", "reason": "", "bytes": 0, "retries": 0}
    channels = []
    try:
        for color in CHANNELS:
            channel = fetcher.channel(row.url_stem, color)
            record["bytes"] += channel.nbytes
            record["retries"] += channel.retries
            channels.append(channel)
        converted = to_stored([c.plane for c in channels], settings.size)
    except ChannelFailed as err:
        record["reason"] = f"{CHANNELS[len(channels)]}: " + "; ".join(err.reasons)
        return record
    except ImageRejected as err:
        record["reason"] = str(err)
        return record
    for color, plane in zip(CHANNELS, converted.image):
        path = channel_file(folder, row.ID, color)
        with writing(path):
            write_channel(path, plane, settings.png_compression)
            record[f"sha256_{color}"] = hashlib.sha256(path.read_bytes()).hexdigest()
    formats = [c.source for c in channels]
    record.update(
        status="ok",
        reason=", ".join(
            f"{color}: {'; '.join(c.reasons)}" for color, c in zip(CHANNELS, channels) if c.reasons
        ),
        format=formats[0] if len(set(formats)) == 1 else "|".join(formats),
        fallback=any(c.source != "jpg" for c in channels),
        bit_depth=converted.bit_depth,
        height=converted.native[0],
        width=converted.native[1],
        stored_height=int(converted.image.shape[1]),
        stored_width=int(converted.image.shape[2]),
    )
    return record


@dataclass
class Tally:
    """What this run did, for the progress bar and the summary line."""

    stored: int = 0
    fallback: int = 0
    retries: int = 0
    nbytes: int = 0
    failed: Counter[str] = field(default_factory=Counter)

    def add(self, record: dict[str, Any]) -> None:
        self.nbytes += record["bytes"]
        self.retries += record["retries"]
        if record["status"] == "ok":
            self.stored += 1
            self.fallback += bool(record["fallback"])
        else:
            self.failed[record["reason"]] += 1

    def postfix(self) -> str:
        return f"{self.nbytes / 1e6:,.1f} MB, {self.fallback} TIFF, {sum(self.failed.values())} failed"


def fetch_all(todo: pd.DataFrame, folder: Path, settings: ExternalConfig, log: FetchLog) -> Tally:
    """Fetch ``todo``'s images with ``settings.workers`` threads (at most twice as many queued), logging
    each as it finishes; a progress bar shows images/s, bytes and the ETA."""
    fetcher = Fetcher(
        workers=settings.workers,
        rate=settings.rate,
        timeout_s=settings.timeout_s,
        retries=settings.retries,
        backoff_s=settings.backoff_s,
    )
    tally = Tally()
    rows = todo.itertuples(index=False)
    pending: set[Future[dict[str, Any]]] = set()
    with (
        ThreadPoolExecutor(settings.workers, thread_name_prefix="external") as pool,
        tqdm(total=len(todo), unit="img", desc="external", smoothing=0.05) as bar,
    ):

        def submit_next() -> None:
            row = next(rows, None)
            if row is not None:
                pending.add(pool.submit(fetch_image, fetcher, row, folder, settings))

        for _ in range(2 * settings.workers):
            submit_next()
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                pending.discard(future)
                record = future.result()  # a write fault (full disk) stops the stage here
                log.append(record)
                tally.add(record)
                bar.update(1)
                bar.set_postfix_str(tally.postfix(), refresh=False)
                submit_next()
    return tally


def write_tables(folder: Path, selection: Selection, log: FetchLog, spec: DatasetSpec) -> pd.DataFrame:
    """``train.csv`` (stored images, the data set's numbering) and ``sources.csv`` (every image tried)
    from the log, in list order; only images the current filters select. Returns the sources table."""
    records = log.records()
    images = selection.images[selection.images["ID"].isin(records)]
    logged = pd.DataFrame([records[i] for i in images["ID"]], columns=["ID", *SOURCES_COLUMNS[5:]])
    sizes = ["bit_depth", "width", "height", "stored_width", "stored_height"]
    logged = logged.astype(dict.fromkeys(sizes, "Int64"))  # failed images have none: empty, not 16.0
    sources = images.assign(locations=images["locations"].map("|".join)).merge(logged, on="ID", how="left")
    sources = sources.reindex(columns=list(SOURCES_COLUMNS))
    atomic_write(folder / "sources.csv", lambda tmp: sources.to_csv(tmp, index=False))
    stored = images[sources["status"].eq("ok").to_numpy()]
    labels = pd.DataFrame(
        {
            spec.id_column: stored["ID"],
            spec.label_column: [format_labels(c, spec.label_sep) for c in stored["classes"]],
        }
    )
    atomic_write(folder / spec.label_file, lambda tmp: labels.to_csv(tmp, index=False))
    return sources


def _source_record(cfg: Config, list_path: Path, list_format: str, selection: Selection) -> dict[str, Any]:
    return {
        "image_list": str(list_path),
        "image_list_sha256": hashlib.sha256(list_path.read_bytes()).hexdigest(),
        "list_format": list_format,
        "dataset": cfg.data.dataset,
        "settings": cfg.external.model_dump(mode="json", exclude={"dry_run"}),
        "sixteen_bit_rule": "over an image's 16-bit channels: all <= 255 -> kept as 8-bit values, "
        "else round(v / 257)",
        "dropped": selection.dropped,
        "unmapped_locations": dict(selection.unmapped.most_common()),
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _print_selection(list_path: Path, list_format: str, listed: int, selection: Selection) -> None:
    print(f"external: {list_path} ({list_format} list): {listed:,} images listed")
    for reason, count in selection.dropped.items():
        if count:
            print(f"  dropped {count:,}: {reason}")
    if selection.unmapped:
        names = ", ".join(f"{name} ({n:,})" for name, n in selection.unmapped.most_common(8))
        print(f"  location names outside the class table (dropped from labels): {names}")
    for note in selection.notes:
        print(f"  note: {note}")
    print(f"  selected: {len(selection.images):,} images")


def _free_bytes(folder: Path) -> int:
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    return shutil.disk_usage(existing).free


def run(cfg: Config) -> Tally | None:
    """Entry point: read and filter the list, print the plan, then fetch what is not done yet."""
    settings = cfg.external
    if not settings.image_list:
        raise StageError(
            "external: no image list; set external.image_list=<the hosts' kaggle_2021.tsv or the 2018 "
            "HPAv18RBGY_wodpl.csv> (README, External data)"
        )
    spec = get_dataset(cfg.data.dataset)
    list_path = cfg.path(settings.image_list)
    images, fmt = read_image_list(list_path, settings.list_format, settings.base_url)
    selection = select_images(
        images,
        location_table(spec.classes),
        drop_in_trainset=settings.drop_in_trainset,
        cell_lines=settings.cell_lines,
        keep_classes=settings.keep_classes,
        max_images=settings.max_images,
    )
    folder = external_dir(cfg)
    log = FetchLog(folder / LOG)
    done = set() if cfg.force else log.done(folder / spec.train_dir)  # FORCE=1 fetches everything again
    todo = selection.images[~selection.images["ID"].isin(done)]
    _print_selection(list_path, fmt.name, len(images), selection)
    estimate = Estimate.of(len(todo), settings)
    free = _free_bytes(folder)
    print(f"  already stored: {len(selection.images) - len(todo):,}; to fetch: {len(todo):,}")
    print("\n".join(estimate.lines(settings, free, folder)))
    if settings.dry_run:
        print("external: dry run, nothing fetched")
        return None
    if settings.check_disk and estimate.stored_bytes > free:
        raise StageError(
            f"external: about {estimate.stored_bytes / 1e9:,.1f} GB to store but {free / 1e9:,.1f} GB free on "
            f"{folder}; free space, store smaller images (external.size=1024) or skip this check with "
            "external.check_disk=false"
        )
    with folder_lock(folder, "external", cfg.checks.lock_wait_s):
        train = folder / spec.train_dir
        with writing(train):
            train.mkdir(parents=True, exist_ok=True)
        clean_temporaries(train)
        tally = fetch_all(todo, train, settings, log)
        write_tables(folder, selection, log, spec)
        record = _source_record(cfg, list_path, fmt.name, selection)
        atomic_write(folder / "source.json", lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))
    failed = sum(tally.failed.values())
    reasons = ", ".join(f"{reason}: {n:,}" for reason, n in tally.failed.most_common(4))
    print(
        f"external: {tally.stored:,} images stored ({tally.fallback:,} with a TIFF fallback), "
        f"{len(done):,} already done, {failed:,} failed{f' ({reasons})' if failed else ''}, "
        f"{tally.retries:,} retries, {tally.nbytes / 1e9:,.2f} GB fetched -> {folder} "
        f"({spec.train_dir}/, {spec.label_file}, sources.csv)"
    )
    return tally


if __name__ == "__main__":
    from weakcell.cli import stage_main

    raise SystemExit(stage_main(run))
