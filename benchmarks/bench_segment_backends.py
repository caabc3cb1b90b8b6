"""Learned segmentation backends on CPU: HPA-Cell-Segmentation's post-processing against the upstream-
equivalent reference, per-stage seconds per backend and image size, and the batched cache against the
per-image path.

Run from the repository root (real images from ``../shared/data/hpa2021``, weights made here: timing only):

    python benchmarks/bench_segment_backends.py [--repeats 3] [--images 6] [--upstream DIR]

``--upstream DIR``: a checkout of CellProfiling/HPA-Cell-Segmentation (e.g. ``git clone`` it, or a Kaggle
dataset of it). Section 5 then also times upstream's own ``hpacellseg/utils.py:label_cell``, loaded from that
file under today's libraries, on the same maps, and compares its labels with ours. Nothing of it is copied
into the kit; without the option the section uses the step-by-step reference only.

Sections (written between the ``backends`` markers of ``benchmarks/segmentation.md``; ``bench_segment.py``
keeps them when it rewrites the file):
5. ``label_cell`` against ``tests/hpacellseg_reference.py`` on 2048² network-like maps of the 5 images: CPU
   seconds of each (one thread, medians; ours with numba's kernels and without), cells, pixels that
   differ, mean matched IoU.
6. Per backend and image size (1728², 2048², 3072², 4096² copies of a real image, ``segment.reference_size``
   2048): decode, prepare, network and finish CPU seconds of one image, one thread. With the reference size
   every copy gets the same network input, so the network is timed once per backend.
7. The cache on CPU, wall seconds: ``cache.batched=always`` (the network in the parent, 2 workers) against
   ``never`` (2 workers, each running the whole backend with its own model; what ``auto`` does on a CPU),
   same images and settings.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core per process, as the other segmentation benches

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from importlib import util as importlib_util
from pathlib import Path
from types import ModuleType

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests/: the reference and the model files made for the tests

from tests.hpacellseg_models import save_weights, thresholding_state  # noqa: E402
from tests.hpacellseg_reference import label_cell_reference, network_like_maps  # noqa: E402

from weakcell.config import load_config  # noqa: E402
from weakcell.data.images import list_image_ids, read_image, write_image  # noqa: E402
from weakcell.devices import cpu_model  # noqa: E402
from weakcell.segment import for_image, segment_image  # noqa: E402
from weakcell.segment.batched import network_stage  # noqa: E402
from weakcell.segment.hpacellseg import label_cell, labels  # noqa: E402
from weakcell.segment.metrics import match_instances  # noqa: E402

HPA_DIR = REPO.parent / "shared" / "data" / "hpa2021"
OUTPUT = REPO / "benchmarks" / "segmentation.md"
START, END = "<!-- backends:start -->", "<!-- backends:end -->"
SIDES = (1728, 2048, 3072, 4096)


def cpu_seconds(function: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median CPU seconds of ``repeats`` calls (after a warm-up call) and the last result."""
    result = function()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        result = function()
        times.append(time.process_time() - start)
    return statistics.median(times), result


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def load_upstream(checkout: Path) -> ModuleType:
    """Upstream's ``hpacellseg/utils.py`` from a local checkout, as a module (its imports are NumPy, SciPy and
    scikit-image only; NumPy 2 has ``np.bool`` again, which it names)."""
    path = checkout / "hpacellseg" / "utils.py"
    if not path.is_file():
        raise SystemExit(
            f"{path} not found: --upstream takes a checkout of CellProfiling/HPA-Cell-Segmentation"
        )
    spec = importlib_util.spec_from_file_location("hpacellseg_upstream_utils", path)
    assert spec is not None and spec.loader is not None
    module = importlib_util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # its remove_small_objects(min_size=...) calls warn under scikit-image 0.26 on every image
    warnings.filterwarnings("ignore", category=FutureWarning, module="hpacellseg_upstream_utils")
    return module


def upstream_note(checkout: Path) -> str:
    """What the upstream columns ran: the checkout's commit and today's library versions."""
    import scipy
    import skimage

    found = subprocess.run(
        ["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    commit = found.stdout.strip() if found.returncode == 0 else ""  # a copy without .git: no commit to name
    return (
        f"\nUpstream columns: `hpacellseg/utils.py:label_cell` of a local checkout{f' ({commit})' if commit else ''} "
        f"run unchanged under scikit-image {skimage.__version__}, NumPy {np.__version__}, SciPy {scipy.__version__} "
        "(`--upstream DIR`). The organisers' code and the step-by-step reference take the same time here, so the "
        "reference stands in for upstream when no checkout is at hand.\n"
    )


def label_cell_on(compiled: bool, nuclei_pred: np.ndarray, cell_pred: np.ndarray, repeats: int):
    """``cpu_seconds`` of ``label_cell`` with numba's kernels (``compiled``) or on the numpy / scikit-image
    path Kaggle's image runs."""
    labels.USE_COMPILED = compiled
    try:
        return cpu_seconds(lambda: label_cell(nuclei_pred, cell_pred), repeats)
    finally:
        labels.USE_COMPILED = True


def postprocessing(ids: list[str], repeats: int, upstream: ModuleType | None = None) -> str:
    """Section 5: ours (with numba where installed, and without) against the step-by-step reference and,
    given a checkout, upstream's own function."""
    compiled = labels._compiled_kernels() is not None
    rows, ratios, fallback_ratios, upstream_ratios, upstream_fallback_ratios = [], [], [], [], []
    for image_id in ids:
        cells = cv2.imread(
            str(HPA_DIR / "hpacellseg_masks" / f"{image_id}_predictedmask.png"), cv2.IMREAD_UNCHANGED
        )
        nuclei_pred, cell_pred = network_like_maps(cells, read_image(HPA_DIR / "train", image_id)[2])
        reference_s, reference = cpu_seconds(
            lambda n=nuclei_pred, c=cell_pred: label_cell_reference(n, c), max(1, repeats // 2)
        )
        fallback_s, fallback = label_cell_on(False, nuclei_pred, cell_pred, repeats)
        ours_s, ours = (
            label_cell_on(True, nuclei_pred, cell_pred, repeats) if compiled else (fallback_s, fallback)
        )
        ref_cells, our_cells = reference[1].astype(np.int32), ours[1]
        match = match_instances(our_cells, ref_cells, 0.5)
        differing = [
            int((found[1] != ref_cells).sum() + (found[0] != reference[0]).sum())
            for found in (ours, fallback)
        ]
        ratios.append(reference_s / ours_s)
        fallback_ratios.append(reference_s / fallback_s)
        row = [
            image_id[:8],
            f"{reference_s:.2f}",
            f"{ours_s:.3f}",
            f"{reference_s / ours_s:.1f}x",
            f"{fallback_s:.3f}",
            f"{reference_s / fallback_s:.1f}x",
            f"{ref_cells.max()} / {our_cells.max()} / {fallback[1].max()}",
            f"{differing[0]} / {differing[1]}",
            f"{match['mean_iou']:.5f}",
        ]
        if upstream is not None:
            # upstream only reads its inputs (every step works on arrays derived from them): no copies
            upstream_s, theirs = cpu_seconds(
                lambda n=nuclei_pred, c=cell_pred: upstream.label_cell(n, c),
                max(1, repeats // 2),
            )
            their_cells = theirs[1].astype(np.int32)
            upstream_match = match_instances(our_cells, their_cells, 0.5)
            upstream_ratios.append(upstream_s / ours_s)
            upstream_fallback_ratios.append(upstream_s / fallback_s)
            row += [
                f"{upstream_s:.2f}",
                f"{upstream_s / ours_s:.1f}x",
                f"{upstream_s / fallback_s:.1f}x",
                f"{their_cells.max()} / {our_cells.max()}",
                f"{upstream_match['mean_iou']:.5f}",
            ]
        rows.append(row)
    median = statistics.median
    median_row = [
        "**median**",
        "",
        "",
        f"{median(ratios):.1f}x",
        "",
        f"{median(fallback_ratios):.1f}x",
        "",
        "",
        "",
    ]
    header = [
        "image",
        "reference s",
        "label_cell s" if compiled else "label_cell s (numba not installed)",
        "speed-up",
        "without numba s",
        "speed-up without numba",
        "cells (reference / ours / without numba)",
        "pixels differing (cells + nuclei; ours / without numba)",
        "mean matched IoU",
    ]
    if upstream is not None:
        median_row += [
            "",
            f"{median(upstream_ratios):.1f}x",
            f"{median(upstream_fallback_ratios):.1f}x",
            "",
            "",
        ]
        header += [
            "upstream s",
            "speed-up on upstream",
            "without numba",
            "cells (upstream / ours)",
            "IoU vs upstream",
        ]
    rows.append(median_row)
    return table(header, rows)


def resized(image: np.ndarray, side: int) -> np.ndarray:
    interpolation = cv2.INTER_AREA if side < image.shape[1] else cv2.INTER_LINEAR
    return np.stack([cv2.resize(plane, (side, side), interpolation=interpolation) for plane in image])


def backend_row(
    name: str, overrides: list[str], image: np.ndarray, folder: Path, repeats: int
) -> list[list[str]]:
    """Section 6 rows of one backend: decode once per size (a PNG round trip), prepare / network / finish."""
    cfg = load_config(None, ["segment.reference_size=2048", f"segment.backend={name}", *overrides]).segment
    stage = network_stage(cfg)
    rows, network_s = [], None
    for side in SIDES:
        copy = resized(image, side)
        write_image(folder, f"copy{side}", copy)
        decode_s, _ = cpu_seconds(lambda s=side: read_image(folder, f"copy{s}"), repeats)
        image_cfg = for_image(cfg, copy.shape[1:])
        if stage is None:
            segment_s, seg = cpu_seconds(lambda c=copy: segment_image(c, cfg), repeats)
            rows.append(
                [
                    name,
                    f"{side}²",
                    f"{decode_s:.3f}",
                    "-",
                    "-",
                    f"{segment_s:.3f}",
                    f"{decode_s + segment_s:.2f}",
                    f"{seg.n_cells}",
                ]
            )
            continue
        prepare_s, item = cpu_seconds(lambda c=copy, ic=image_cfg: stage.prepare(c, ic), repeats)
        if (
            network_s is None
        ):  # the same input for every copy: timed once after a warm-up (minutes on one core)
            network_s, outputs = cpu_seconds(lambda it=item, ic=image_cfg: stage.predict([it], ic), 1)
        else:
            outputs = stage.predict([item], image_cfg)
        finish_s, seg = cpu_seconds(
            lambda c=copy, it=item, ic=image_cfg, out=outputs[0]: stage.finish(c, it, out, ic), repeats
        )
        total = decode_s + prepare_s + network_s + finish_s
        rows.append(
            [
                name,
                f"{side}²",
                f"{decode_s:.3f}",
                f"{prepare_s:.3f}",
                f"{network_s:.1f}",
                f"{finish_s:.3f}",
                f"{total:.1f}",
                f"{seg.n_cells}",
            ]
        )
    return rows


def backends(image: np.ndarray, weights: Path, repeats: int) -> str:
    """Section 6."""
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows += backend_row("classical", [], image, folder, repeats)
        rows += backend_row("hpacellseg", [f"segment.hpacellseg.weights={weights}"], image, folder, repeats)
        cellpose = cellpose_weights(folder / "cellpose")
        if cellpose is not None:
            overrides = [
                f"segment.cellpose.weights={cellpose}",
                "segment.cellpose.backbone=vit_b",
                "segment.cellpose.device=cpu",
            ]
            rows += backend_row("cellpose", overrides, image, folder, repeats)
    return table(
        ["backend", "image", "decode s", "prepare s", "network s", "finish / segment s", "total s", "cells"],
        rows,
    )


def cellpose_weights(folder: Path) -> Path | None:
    """A random Cellpose-SAM with a ViT-B encoder (the official cpsam is ViT-L, 1.2 GB), or None without
    cellpose installed."""
    try:
        from tests.test_kaggle_offline import random_segmentation_weights
    except ImportError:
        return None
    return random_segmentation_weights(folder)["cellpose"] / "cpsam"


def cache_designs(ids: list[str], weights: Path, count: int, batch_sizes: list[int]) -> str:
    """Section 7: wall seconds of the cache stage over ``count`` 2048² images, batched against per-image."""
    from weakcell.cache import build

    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        chosen = [ids[i % len(ids)] for i in range(count)]
        names = [f"{image_id[:-4]}{i:04d}" for i, image_id in enumerate(chosen)]
        for name, image_id in zip(names, chosen):
            for channel in ("red", "green", "blue", "yellow"):
                (data / "train").mkdir(parents=True, exist_ok=True)
                shutil.copy(
                    HPA_DIR / "train" / f"{image_id}_{channel}.png", data / "train" / f"{name}_{channel}.png"
                )
        import pandas as pd

        pd.DataFrame({"ID": names, "Label": ["0"] * count}).to_csv(data / "train.csv", index=False)
        for network_scale, batch in [(scale, batch) for scale in (0.0625, 0.125) for batch in batch_sizes]:
            overrides = [
                f"segment.hpacellseg.batch_size={batch}",
                "data.dataset=hpa2021",
                f"data.dir={data}",
                "cache.splits=[train]",
                "cache.workers=2",
                "segment.backend=hpacellseg",
                "segment.reference_size=2048",
                f"segment.hpacellseg.weights={weights}",
                f"segment.hpacellseg.network_scale={network_scale}",
            ]
            for design in ("per-image", "batched"):
                if design == "per-image" and batch != batch_sizes[0]:
                    continue  # no batches there
                mode = "never" if design == "per-image" else "always"
                root = f"paths.root={tmp}/{design}{network_scale}-{batch}"
                cfg = load_config(None, [root, *overrides, f"cache.batched={mode}"])
                tasks = build.plan_images(cfg)
                (cfg.cache_dir / "masks").mkdir(parents=True, exist_ok=True)
                start = time.perf_counter()
                results = list(build.cache_images(tasks, cfg, cfg.cache_dir, 2))
                seconds = time.perf_counter() - start
                cells = sum(len(result.cells) for result in results)
                side = round(2048 * network_scale)
                label = f"cache.batched={mode}" + (f", batch {batch}" if mode == "always" else "")
                rows.append(
                    [
                        label,
                        f"{side}² (+64 padding)",
                        f"{count}",
                        f"{seconds:.1f}",
                        f"{seconds / count:.2f}",
                        f"{cells}",
                    ]
                )
    return table(["design", "network input", "images", "wall s", "s / image", "cells"], rows)


def subsections(block: str) -> dict[str, str]:
    """``{"5": text, ...}`` of the ``### N.`` subsections of a written block."""
    parts = block.split("\n### ")
    return {part.split(".", 1)[0]: "### " + part for part in parts[1:]}


def write(header: str, fresh: dict[str, str]) -> None:
    """Put the sections between the markers of ``benchmarks/segmentation.md`` (appended when absent); a
    section not run this time keeps its previous text."""
    text = OUTPUT.read_text() if OUTPUT.is_file() else "# Segmentation benchmark\n"
    kept = subsections(text[text.index(START) : text.index(END)]) if START in text and END in text else {}
    merged = {**kept, **fresh}
    body = "\n".join(merged[key].rstrip("\n") + "\n" for key in sorted(merged))
    block = f"{START}\n{header}\n{body}\n{END}\n"
    if START in text and END in text:
        text = text[: text.index(START)] + block + text[text.index(END) + len(END) + 1 :]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    OUTPUT.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (median reported)")
    parser.add_argument("--images", type=int, default=6, help="images of the cache comparison (section 7)")
    parser.add_argument("--sections", default="5,6,7", help="which sections to run")
    parser.add_argument("--batches", default="1,4", help="segment.hpacellseg.batch_size values of section 7")
    parser.add_argument(
        "--upstream",
        type=Path,
        help="a checkout of CellProfiling/HPA-Cell-Segmentation: section 5 times its own code",
    )
    args = parser.parse_args()
    cv2.setNumThreads(1)
    if not (HPA_DIR / "train").is_dir():
        raise SystemExit(f"{HPA_DIR} not found: the real images are needed")
    ids = list_image_ids(HPA_DIR / "train")
    wanted = set(args.sections.split(","))
    cpu = cpu_model()
    header = (
        "## 5-7. Learned backends (`python benchmarks/bench_segment_backends.py`), "
        f"{cpu}, {os.cpu_count()} cores shared with other jobs\n"
    )
    fresh: dict[str, str] = {}
    upstream = load_upstream(args.upstream) if args.upstream else None
    with tempfile.TemporaryDirectory() as tmp:
        weights = save_weights(Path(tmp) / "weights", thresholding_state(), thresholding_state())
        if "5" in wanted:
            fresh["5"] = (
                f"### 5. HPA-Cell-Segmentation's post-processing against the upstream-equivalent reference "
                f"(--repeats {args.repeats})\n\n{postprocessing(ids, args.repeats, upstream)}\n\n"
                "CPU seconds of one thread on the same 2048² uint8 maps; `label_cell` with numba's kernels "
                "(`weakcell.segment.hpacellseg.compiled`, the `numba` extra) and without (`labels.USE_COMPILED "
                "= False`: the numpy / scikit-image path Kaggle's image runs). The pixels that differ are where "
                "two watershed fronts arrive at exactly the same height and scikit-image's heap breaks the tie "
                "in an order that depends on its whole content.\n"
                + (upstream_note(args.upstream) if upstream is not None else "")
            )
        if "6" in wanted:
            image = read_image(HPA_DIR / "train", ids[-1])
            fresh["6"] = (
                f"### 6. Seconds per image by stage, one thread\n\n{backends(image, weights, args.repeats)}\n"
            )
        if "7" in wanted:
            designs = cache_designs(ids, weights, args.images, [int(b) for b in args.batches.split(",")])
            fresh["7"] = (
                f"### 7. The cache on CPU, 2 workers, {args.images} images\n\n{designs}\n\n"
                "Wall seconds on the shared machine. On a CPU the network in one process (2 torch threads) "
                "competes with the workers for the same cores and loses to two workers each running the "
                "whole backend on one thread, so `cache.batched=auto` batches only when the network runs on "
                "a GPU (`bench_segment_gpu.py`).\n"
            )
    print(header + "\n".join(fresh.values()))
    write(header, fresh)
    print(f"wrote {OUTPUT.relative_to(REPO)}")


if __name__ == "__main__":
    main()
