"""``make data``: write the synthetic benchmark in its competition's layout plus ``truth/``.

Layout under ``cfg.data_dir`` (``data.dataset=synthetic``: the hpa2021 layout, ``synthetic2018``: the
hpa2018 one, ``Id,Target`` with space-separated labels and an ``Id,Predicted`` sample submission)::

    train/{ID}_{red,green,blue,yellow}.png   train.csv (ID,Label)     sample_submission.csv
    test/{ID}_{...}.png                       truth/{ID}_cells.png, truth/{ID}_nuclei.png (uint16)
    truth/cells.csv (image_id,cell_id,split,Label,cell_line,mitotic,area)   truth/test.csv (ID,Label)
    truth/images.csv (image_id,split: every image, with or without cells)
    config.yaml (the resolved config)         COMPLETE (written last)   .weakcell-synthetic (first)

A cell's ``Label`` in ``cells.csv`` is empty when it shows no class of a table without Negative (2018).

A folder whose ``COMPLETE`` marker exists and whose ``config.yaml`` holds the same synthetic settings is
trusted and skipped; anything else is regenerated from scratch.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from tqdm import tqdm

from weakcell.cell_truth import IMAGES_FILE
from weakcell.config import OUTPUT_INPUTS, Config, SyntheticConfig, save_config
from weakcell.constants import EMPTY_MASK_RLE
from weakcell.data.datasets import get_dataset
from weakcell.data.images import write_channel, write_image
from weakcell.data.labels import format_labels
from weakcell.errors import StageError
from weakcell.outputs import LOCK_FILE, atomic_csv, atomic_write_text, folder_lock
from weakcell.parallel import n_workers, pool_context
from weakcell.synthetic.classes import ClassTable, class_table
from weakcell.synthetic.generate import generate_image, image_seed
from weakcell.synthetic.truth import TRUTH

MARKER = "COMPLETE"  # written last: its presence means the set is whole
# Bump when the generator's output changes for the same config, so old sets are regenerated.
GENERATOR_VERSION = "1"
OWNER = ".weakcell-synthetic"  # written first: the folder is ours to clear and regenerate


def is_complete(data_dir: Path, synthetic: SyntheticConfig, dataset: str = "synthetic") -> bool:
    """Whether ``data_dir`` holds a finished set of layout ``dataset`` made with the same synthetic settings."""
    saved, marker = data_dir / "config.yaml", data_dir / MARKER
    if not marker.is_file() or not saved.is_file() or marker.read_text().strip() != _marker_text():
        return False
    stored_config = yaml.safe_load(saved.read_text()) or {}
    stored = stored_config.get("synthetic", {})
    same_layout = stored_config.get("data", {}).get("dataset", "synthetic") == dataset
    current = {"synthetic": synthetic.model_dump(mode="json")}
    return same_layout and not OUTPUT_INPUTS["synthetic"].changed({"synthetic": stored}, current)


def _claim(data_dir: Path) -> None:
    """Mark ``data_dir`` as a synthetic set before anything in it is deleted; refuse a folder that holds
    other files and was never ours (a mistyped ``data.dir`` must not wipe real images)."""
    owner = data_dir / OWNER
    others = [p for p in data_dir.iterdir() if p.name != LOCK_FILE] if data_dir.is_dir() else []
    if others and not owner.is_file():
        raise StageError(
            f"{data_dir} holds files that the synthetic writer did not make (no {OWNER}); "
            "point data.dir at an empty or synthetic folder"
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(owner, "made by weakcell.synthetic.writer; the folder may be regenerated\n")


def _marker_text() -> str:
    return f"synthetic set complete, generator version {GENERATOR_VERSION}"


def make_one(task: tuple[SyntheticConfig, str, int, str, str]) -> dict[str, Any]:
    """Generate and write image ``index`` of ``split``; returns its label row and its cells' rows."""
    synthetic, split, index, data_dir, dataset = task
    table = class_table(dataset)
    spec = table.spec
    sample = generate_image(synthetic, image_seed(synthetic.seed, split, index), table=table)
    root = Path(data_dir)
    write_image(root / split, sample.image_id, sample.image)
    write_channel(root / TRUTH / f"{sample.image_id}_cells.png", sample.cells)
    write_channel(root / TRUTH / f"{sample.image_id}_nuclei.png", sample.nuclei)
    areas = np.bincount(sample.cells.ravel(), minlength=len(sample.cell_labels) + 1)  # px per cell id
    cells = [
        {
            "image_id": sample.image_id,
            "cell_id": cell_id,
            "split": split,
            "Label": format_labels(labels, spec.label_sep),
            "cell_line": sample.cell_line,
            "mitotic": sample.mitotic[cell_id],
            "area": int(areas[cell_id]),
        }
        for cell_id, labels in sample.cell_labels.items()
    ]
    return {
        "split": split,
        "ID": sample.image_id,
        "Label": format_labels(sample.image_labels, spec.label_sep),
        "size": sample.image.shape[-1],
        "cells": cells,
    }


def sample_submission(test: pd.DataFrame, table: ClassTable) -> pd.DataFrame:
    """The test split's sample submission in the competition's form: 2021 ``ID,ImageWidth,ImageHeight,
    PredictionString`` (an empty-mask placeholder per image), 2018 ``Id,Predicted`` ("0" per image, as
    Kaggle's own sample has it)."""
    if table.spec.submission == "image":
        return pd.DataFrame({table.spec.id_column: test["ID"], "Predicted": "0"})
    return pd.DataFrame(
        {
            "ID": test["ID"],
            "ImageWidth": test["size"],
            "ImageHeight": test["size"],
            "PredictionString": f"0 1 {EMPTY_MASK_RLE}",
        }
    )


def run(cfg: Config) -> Path:
    """Write the benchmark into ``cfg.data_dir`` unless an identical complete set is there (``force``
    regenerates), holding the folder's lock. Prints one summary line; returns the folder."""
    if not get_dataset(cfg.data.dataset).has_truth:
        raise StageError(
            f"`weakcell data` generates a synthetic set only; data.dataset={cfg.data.dataset} is read as-is "
            f"from {cfg.data_dir} (run with data.dataset=synthetic or synthetic2018, e.g. configs/demo.yaml)"
        )
    with folder_lock(cfg.data_dir, "data", cfg.checks.lock_wait_s):
        return _write(cfg)


def _write(cfg: Config) -> Path:
    table = class_table(cfg.data.dataset)
    spec = table.spec
    data_dir = cfg.data_dir
    synthetic = cfg.synthetic
    if not cfg.force and is_complete(data_dir, synthetic, cfg.data.dataset):
        print(
            f"synthetic set in {data_dir} is complete and matches the config; skipping (force=true redoes it)"
        )
        return data_dir
    _claim(data_dir)
    # Nothing in the folder is trusted from here on: drop the marker first, then the old set.
    (data_dir / MARKER).unlink(missing_ok=True)
    for folder in (spec.train_dir, spec.test_dir, TRUTH):
        shutil.rmtree(data_dir / folder, ignore_errors=True)
    for folder in (spec.train_dir, spec.test_dir, TRUTH):
        (data_dir / folder).mkdir(parents=True, exist_ok=True)

    tasks = [
        (synthetic, split, index, str(data_dir), cfg.data.dataset)
        for split, n in (("train", synthetic.n_train), ("test", synthetic.n_test))
        for index in range(n)
    ]
    workers = n_workers(synthetic.workers, len(tasks))
    start = time.perf_counter()
    pool_or_none = ProcessPoolExecutor(workers, mp_context=pool_context()) if workers > 1 else None
    with pool_or_none or contextlib.nullcontext() as pool:
        chunksize = max(1, len(tasks) // (8 * workers))
        results = pool.map(make_one, tasks, chunksize=chunksize) if pool else map(make_one, tasks)
        rows = list(tqdm(results, total=len(tasks), desc="synthetic", unit="img", leave=False))

    images = pd.DataFrame([{k: v for k, v in row.items() if k != "cells"} for row in rows])
    train, test = (images[images["split"] == split] for split in ("train", "test"))
    layout = {"ID": spec.id_column, "Label": spec.label_column}
    atomic_csv(data_dir / spec.label_file, train[["ID", "Label"]].rename(columns=layout))
    atomic_csv(data_dir / TRUTH / "test.csv", test[["ID", "Label"]].rename(columns=layout))
    atomic_csv(data_dir / spec.sample_submission, sample_submission(test, table))
    cells = pd.DataFrame([cell for row in rows for cell in row["cells"]])
    atomic_csv(data_dir / TRUTH / "cells.csv", cells)
    # the truth's images and their splits, also of an image without cells (which cells.csv cannot list)
    atomic_csv(data_dir / TRUTH / IMAGES_FILE, images[["ID", "split"]].rename(columns={"ID": "image_id"}))
    save_config(cfg, data_dir)
    atomic_write_text(data_dir / MARKER, _marker_text() + "\n")
    seconds = time.perf_counter() - start
    print(
        f"synthetic: {len(images)} images ({len(train)} train, {len(test)} test), {len(cells)} cells in "
        f"{seconds:.1f} s ({len(images) / seconds:.1f} images/s, {workers} workers) -> {data_dir}"
    )
    return data_dir
