"""The data sets a run trains on: the competition's own images (``data.dir``, the only ones scored and
predicted) and the external sets of ``data.sources`` (``make external``'s folders, or any folder in the
data set's layout), each with its folder, label file, cache, fold mode and intensity gain.

- Caching: one cache per source (``make cache`` caches each in turn, the external ones' training split
  alone, into ``{paths.cache}/<name>/<segment.backend>``). A source's cache is the same stage on the
  source's folder, so its images are hashed, resumed and split across machines as the competition's are;
  adding or dropping a source never touches the competition's cache (runs with and without external
  data share it), and a changed external set changes only its own cache's fingerprint.
- Training: the caches are read as one (``CellCache.joined``), each external source's crops through its
  intensity gain (``weakcell.cache.intensity``); the run records every source's cache, label file and
  intensity settings (``sources_fingerprint``, the run's ``sources`` upstream), so a changed external
  set refuses the runs trained on it.
- Folds: every source joins ``folds.external`` (``Config`` fills it in), fold -1 (``train_only``: trained
  on in every fold, never validated) or stratified like the competition's images (``folded``).
- Scoring: thresholds (``thresholds.sources``), a round's ``metrics.json`` and ``make evaluate`` score the
  competition's images; the out-of-fold rows of folded external images get their own image scores
  (``image_map_<source>``), feed refinement like any fold's, and tune thresholds with
  ``thresholds.sources=all``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from weakcell.cache.intensity import cell_means, gain_table, measured_gain, sample_rows
from weakcell.cache.store import CellCache, cache_fingerprint
from weakcell.config import Config, SourceConfig
from weakcell.constants import CHANNELS
from weakcell.data.datasets import DatasetSpec
from weakcell.data.labels import read_label_file
from weakcell.data.manifest import table_hash
from weakcell.errors import StageError
from weakcell.lineage import digest

COMPETITION = "competition"  # the source name of the data set's own images


@dataclass(frozen=True)
class Source:
    """One data set a run trains on: its name, folder and cache; ``settings`` None for the competition's."""

    name: str
    data_dir: Path
    cache_dir: Path
    settings: SourceConfig | None = None

    @property
    def is_competition(self) -> bool:
        return self.settings is None


def data_sources(cfg: Config) -> list[Source]:
    """The competition's source, then every ``data.sources`` entry in order (the order cells are read in)."""
    sources = [Source(COMPETITION, cfg.data_dir, cfg.cache_dir)]
    for settings in cfg.data.sources:
        name = settings.source_name
        cache_dir = cfg.path(cfg.paths.cache) / name / cfg.segment.backend
        sources.append(Source(name, cfg.path(settings.dir), cache_dir, settings))
    return sources


def source_config(cfg: Config, source: Source) -> Config:
    """The config that caches ``source``: ``cfg`` itself for the competition's, else ``cfg`` pointed at
    the source's folder and cache, its training split alone (the segmentation and crop settings are the
    competition's: crops of every source must look alike)."""
    if source.is_competition:
        return cfg
    data = cfg.data.model_copy(update={"dir": str(source.data_dir), "sources": []})
    cache = cfg.cache.model_copy(update={"dir": str(source.cache_dir), "splits": ["train"]})
    return cfg.model_copy(update={"data": data, "cache": cache})


def fetch_step(source: Source) -> str:
    """The step that writes a source's image files, named where some are missing."""
    return "make download" if source.is_competition else "make external"


def require_layout(source: Source, spec: DatasetSpec) -> None:
    """An external source's folder must hold the data set's training folder (``make cache`` and ``weakcell
    check`` ask before any work); the competition's own folder is the data stages' to judge."""
    if not source.is_competition and not (source.data_dir / spec.train_dir).is_dir():
        raise StageError(
            f"data.sources: {source.data_dir} has no {spec.train_dir}/ folder (source {source.name}); make "
            "it with `make external`, or point data.sources[].dir at a folder in the data set's layout"
        )


def label_file(source: Source, spec: DatasetSpec) -> Path:
    """The source's label file, in the data set's layout; a missing one of an external set is one line."""
    path = source.data_dir / spec.label_file
    if not source.is_competition and not path.is_file():
        raise StageError(
            f"data.sources: {source.data_dir} has no {spec.label_file} (source {source.name}); make it with "
            "`make external`, or point data.sources[].dir at a folder in the data set's layout"
        )
    return path


def source_labels(cfg: Config, spec: DatasetSpec) -> pd.DataFrame:
    """``ID, labels, source`` of every source's label file, the competition's first; IDs must be unique
    over the sources (they key the cache, the folds file and every prediction)."""
    parts = [
        read_label_file(label_file(source, spec), spec)[["ID", "labels"]].assign(source=source.name)
        for source in data_sources(cfg)
    ]
    labels = pd.concat(parts, ignore_index=True)
    repeated = labels[labels["ID"].duplicated(keep=False)]
    if len(repeated):
        image_id = repeated["ID"].iloc[0]
        where = sorted(set(repeated.loc[repeated["ID"] == image_id, "source"]))
        raise StageError(
            f"image {image_id} is in the label files of {' and '.join(where)}; image IDs must be unique over "
            "the sources (drop it from one of them)"
        )
    return labels


def sources_fingerprint(cfg: Config, spec: DatasetSpec) -> str | None:
    """What a run records of its external sources (None without any): per source in order, its cache's
    fingerprint, its label file's content and its intensity settings (the measured gain follows from the
    caches). A source's name or folder is not in it: moving a set keeps its runs."""
    external = [source for source in data_sources(cfg) if not source.is_competition]
    if not external:
        return None
    return digest(
        [
            {
                "cache": cache_fingerprint(source.cache_dir),
                "labels": table_hash(label_file(source, spec)),
                "intensity": source.settings.intensity if source.settings else None,
                "gain": source.settings.gain if source.settings else None,
            }
            for source in external
        ]
    )


@dataclass(frozen=True)
class SourceSummary:
    """What a run trained on from one source (``run.json``'s ``sources``, the printed lines)."""

    name: str
    images: int
    cells: int
    folds: str  # "validated" for the competition's images, else the source's fold mode
    gain: tuple[float, ...] | None  # the intensity gain its crops are read through (None = as cached)
    measured: bool  # the gain was measured on the caches (not given as data.sources[].gain)

    def record(self) -> dict[str, object]:
        gain = None if self.gain is None else [round(g, 4) for g in self.gain]
        return {**self.__dict__, "gain": gain}

    def line(self) -> str:
        gain = ""
        if self.gain is not None:
            values = " ".join(f"{c[0].upper()} {g:.2f}" for c, g in zip(CHANNELS, self.gain))
            gain = f", intensity gain {values} ({'measured' if self.measured else 'given'})"
        return f"{self.name}: {self.images} images, {self.cells} cells, {self.folds}{gain}"


def _training_rows(cache: CellCache) -> np.ndarray:
    return np.flatnonzero((cache.cells["split"] == "train").to_numpy())


def open_caches(cfg: Config, sources: list[Source]) -> tuple[CellCache, list[SourceSummary]]:
    """The caches of ``sources`` read as one (the competition's alone: its own reader), each external
    source's crops through its gain: ``data.sources[].gain``, or measured on a sample of the training
    crops of its cache against the competition's (``weakcell.cache.intensity``); with what each holds."""
    readers = [CellCache(source.cache_dir) for source in sources]
    reference = None
    parts: list[tuple[CellCache, np.ndarray | None]] = []
    summaries = []
    for source, reader in zip(sources, readers):
        gain: np.ndarray | None = None
        settings = source.settings
        if settings is not None and settings.intensity == "gain":
            if settings.gain is not None:
                gain = np.asarray(settings.gain, dtype=np.float64)
            else:
                if reference is None:
                    reference = cell_means(readers[0], sample_rows(_training_rows(readers[0])))
                gain = measured_gain(reference, cell_means(reader, sample_rows(_training_rows(reader))))
        parts.append((reader, None if gain is None else gain_table(gain)))
        train = reader.images["split"] == "train"
        summaries.append(
            SourceSummary(
                name=source.name,
                images=int(train.sum()),
                cells=int((reader.cells["split"] == "train").sum()),
                folds="validated" if settings is None else cfg.folds.mode_of(settings.dir),
                gain=None if gain is None else tuple(float(g) for g in gain),
                measured=gain is not None and settings is not None and settings.gain is None,
            )
        )
    cache = readers[0] if len(readers) == 1 else CellCache.joined(parts)
    return cache, summaries


def source_rows(table: pd.DataFrame, images: pd.DataFrame, source: str = COMPETITION) -> pd.DataFrame:
    """The rows of ``table`` (keyed by ``image_id``) of the images of ``source``, by the ``source`` column
    of ``images`` (``TrainingSet.images``); without that column every image is the competition's."""
    if "source" not in images.columns:
        return table if source == COMPETITION else table.iloc[:0]
    own = images.loc[images["source"] == source, "image_id"]
    return table[table["image_id"].isin(own)]


def competition_rows(table: pd.DataFrame, images: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``table`` of the competition's own images (``source_rows``): what is scored."""
    return source_rows(table, images, COMPETITION)


def external_sources(images: pd.DataFrame) -> list[str]:
    """The external sources among ``images`` (``TrainingSet.images``), in order of appearance."""
    if "source" not in images.columns:
        return []
    return [name for name in images["source"].drop_duplicates() if name != COMPETITION]
