"""A synthetic external set: images of the generator (a set made by ``make data`` with its own seed and
class frequencies) transformed the ways the public HPA images differ from the competition's, then stored
as ``make external`` stores the public ones. For the benchmark of what external data buys
(``benchmarks/bench_external.py``) and the multi-source tests.

Per image (``ExternalLook``, drawn per image from its own seed):

- another intensity scale: every channel times the set's ``gain`` (another camera or exposure; the
  public 16-bit files carry their own range);
- another size: the whole field resized by one of ``scales`` (the competition's 1728², 2048², 3072² and
  ``make external``'s 1024² over 2048: the field of view is kept, so cells scale with the image);
- fetched as a JPEG (artefacts at ``jpeg_quality``) or, for ``sixteen_bit_share`` of the images, as a
  16-bit file (the TIFF fallback: v * 257 plus the sub-8-bit detail an 8-bit copy rounds away);
- stored through ``make external``'s own conversion (``weakcell.external.convert.to_stored``: the 16-bit
  rule, every channel one size) as uint8 PNGs, with ``train.csv`` in the data set's numbering,
  ``sources.csv`` (one antibody per image, the format, bit depth and sizes) and ``source.json``.

The per-cell truth of the generated set is not carried over: public images have none.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from weakcell.constants import CHANNELS
from weakcell.data.datasets import DatasetSpec
from weakcell.data.images import read_image, write_channel
from weakcell.data.labels import format_labels, read_label_file
from weakcell.errors import StageError
from weakcell.external.convert import SOURCES_COLUMNS, to_stored
from weakcell.outputs import atomic_csv, atomic_write_text
from weakcell.synthetic.truth import TRUTH

MARKER = "COMPLETE"  # written last, holding the settings it was made with


@dataclass(frozen=True)
class ExternalLook:
    """How the external set differs from the competition's images (see the module docstring)."""

    gain: tuple[float, float, float, float] = (0.6, 0.5, 0.7, 0.6)  # R, G, B, Y intensity scale
    # 1024, 1728, 2048 and 3072 px over the competition's 2048
    scales: tuple[float, ...] = (0.5, 0.84375, 1.0, 1.5)
    jpeg_quality: int = 85  # a little below the q90 the dry run assumes, so that the artefacts show
    sixteen_bit_share: float = 0.25
    id_prefix: str = "ext"  # IDs are <prefix>HPA<n>_<plate>_<well>_1: unique beside the competition's
    seed: int = 0


def transform_image(image: np.ndarray, look: ExternalLook, rng: np.random.Generator) -> tuple[list, str]:
    """``(4, H, W)`` uint8 -> the four decoded planes as fetched (uint8 from a JPEG, or uint16) and the
    format (``jpg`` or ``tif``), drawn from ``rng``."""
    scale = float(rng.choice(look.scales))
    height, width = image.shape[1:]
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    method = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    sixteen = rng.random() < look.sixteen_bit_share
    planes = []
    for plane, gain in zip(image.astype(np.float32), look.gain):
        dimmed = cv2.resize(plane * gain, size, interpolation=method) if scale != 1 else plane * gain
        if sixteen:
            detail = rng.integers(0, 257, dimmed.shape)  # what the 16-bit camera had below 8 bits
            planes.append(np.clip(np.rint(dimmed) * 257 + detail, 0, 65535).astype(np.uint16))
        else:
            as_uint8 = np.clip(np.rint(dimmed), 0, 255).astype(np.uint8)
            ok, encoded = cv2.imencode(".jpg", as_uint8, [cv2.IMWRITE_JPEG_QUALITY, look.jpeg_quality])
            if not ok:
                raise OSError("JPEG encoding failed")
            planes.append(cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED))
    return planes, "tif" if sixteen else "jpg"


def _settings(raw_dir: Path, look: ExternalLook) -> str:
    marker = raw_dir / "COMPLETE"
    made_from = marker.read_text().strip() if marker.is_file() else ""
    config = (raw_dir / "config.yaml").read_text() if (raw_dir / "config.yaml").is_file() else ""
    return json.dumps({"look": asdict(look), "raw": made_from, "raw_config": config}, sort_keys=True)


def make_external_set(raw_dir: Path, out_dir: Path, spec: DatasetSpec, look: ExternalLook) -> Path:
    """Transform the training images of the synthetic set ``raw_dir`` into an external set in ``out_dir``
    (``train/``, the label file, ``sources.csv``, ``source.json``); an identical finished set is kept."""
    settings = _settings(raw_dir, look)
    if (out_dir / MARKER).is_file() and (out_dir / MARKER).read_text() == settings:
        print(f"external set in {out_dir} is complete and matches; skipping")
        return out_dir
    _clear(out_dir, spec)
    labels = read_label_file(raw_dir / spec.label_file, spec)
    cell_lines = _cell_lines(raw_dir)
    rng = np.random.default_rng(look.seed)
    rows, stored_labels = [], []
    for n, (raw_id, classes) in enumerate(
        tqdm(zip(labels["ID"], labels["labels"]), total=len(labels), desc="external set", unit="img")
    ):
        antibody = f"{look.id_prefix}HPA{n:06d}"
        image_id = f"{antibody}_{1000 + n}_{'ABCDEFGH'[n % 8]}{n % 12 + 1}_1"
        planes, fmt = transform_image(read_image(raw_dir / spec.train_dir, raw_id), look, rng)
        converted = to_stored(planes, None)
        hashes = {}
        for color, plane in zip(CHANNELS, converted.image):
            path = out_dir / spec.train_dir / f"{image_id}_{color}.png"
            write_channel(path, plane)
            hashes[f"sha256_{color}"] = hashlib.sha256(path.read_bytes()).hexdigest()
        height, width = converted.native
        rows.append(
            {
                "ID": image_id,
                "url_stem": f"synthetic://{antibody}/{raw_id}",
                "antibody": antibody,
                "cell_line": cell_lines.get(raw_id, ""),
                "locations": "|".join(spec.classes[c] for c in classes),
                "format": fmt,
                "bit_depth": converted.bit_depth,
                "width": width,
                "height": height,
                "stored_width": int(converted.image.shape[2]),
                "stored_height": int(converted.image.shape[1]),
                **hashes,
                "status": "ok",
                "reason": "",
            }
        )
        stored_labels.append(
            {spec.id_column: image_id, spec.label_column: format_labels(classes, spec.label_sep)}
        )
    atomic_csv(out_dir / spec.label_file, pd.DataFrame(stored_labels))
    atomic_csv(out_dir / "sources.csv", pd.DataFrame(rows).reindex(columns=list(SOURCES_COLUMNS)))
    record = {"made_by": "weakcell.synthetic.external", "from": str(raw_dir), "look": asdict(look)}
    atomic_write_text(out_dir / "source.json", json.dumps(record, indent=2) + "\n")
    atomic_write_text(out_dir / MARKER, settings)
    formats = pd.Series([row["format"] for row in rows]).value_counts().to_dict()
    print(f"external set: {len(rows)} images ({formats}) from {raw_dir} -> {out_dir}")
    return out_dir


def _clear(out_dir: Path, spec: DatasetSpec) -> None:
    """Empty ``out_dir`` of an older external set made here (a changed look must not leave other images
    behind); refuse a folder holding anything else."""
    record = out_dir / "source.json"
    ours = record.is_file() and json.loads(record.read_text()).get("made_by") == "weakcell.synthetic.external"
    if out_dir.is_dir() and any(out_dir.iterdir()) and not ours:
        raise StageError(
            f"{out_dir} holds files that weakcell.synthetic.external did not make; choose an empty folder"
        )
    (out_dir / MARKER).unlink(missing_ok=True)
    shutil.rmtree(out_dir / spec.train_dir, ignore_errors=True)
    (out_dir / spec.train_dir).mkdir(parents=True, exist_ok=True)


def _cell_lines(raw_dir: Path) -> dict[str, str]:
    """Image ID -> the cell line the generator drew for it (``truth/cells.csv``)."""
    path = raw_dir / TRUTH / "cells.csv"
    if not path.is_file():
        return {}
    cells = pd.read_csv(path, dtype=str, usecols=["image_id", "cell_line"], keep_default_na=False)
    return dict(zip(cells["image_id"], cells["cell_line"]))
