"""The folds report on a synthetic set with planted near-duplicates: how many near-duplicate pairs straddle
folds with plain multilabel stratification and with the kit's grouped folds.

Run from the repository root:

    python benchmarks/bench_folds.py [--images 400] [--copies 80] [--seeds 0 1 2]

1. A synthetic competition set (``make data``: ``--images`` training images at 256², 40 test images) and a
   synthetic external set of 120 images, their antibodies drawn in groups of 1 to 4 (``sources.csv``).
2. Planted near-duplicates (``weakcell.synthetic.duplicates``: JPEG, 1728/3072-scaled, 16-bit .tif.gz,
   brighter): ``--copies`` copies of competition training images into its train/ (a few images get
   two or three, making clusters), 20 into the external set, 5 into the test split.
3. ``weakcell duplicates`` over the three folders: precision and recall against the planted pairs.
4. For each fold seed and both external modes: the pairs straddling folds and the antibodies split, plain
   stratification (external images train-only at fold -1, or stratified with the rest) against the kit's.
Writes ``benchmarks/folds.md``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd

from weakcell.config import load_config
from weakcell.data.datasets import get_dataset
from weakcell.data.images import read_image
from weakcell.data.labels import read_label_file
from weakcell.duplicates.stage import MAX_DISTANCE
from weakcell.duplicates.stage import main as duplicates_main
from weakcell.fold_groups import fold_inputs
from weakcell.folds import folds_report, grouped_folds
from weakcell.synthetic import writer
from weakcell.synthetic.duplicates import TRANSFORMS, plant_copy

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "benchmarks" / "folds.md"
SMALL = ["synthetic.image_size=256", "synthetic.cell_scale=0.125", "synthetic.workers=0"]


def plant(
    rng: np.random.Generator, source: Path, ids: list[str], target: Path, n: int, tag: str
) -> dict[str, str]:
    """``n`` copies of images of ``source`` (some twice or thrice) into ``target``; new ID -> original ID."""
    picked = rng.choice(ids, size=n, replace=True, p=None)
    planted = {}
    for k, original in enumerate(picked):
        copy_id = f"{original}-{tag}{k}"
        plant_copy(read_image(source, original), target, copy_id, rng.choice(list(TRANSFORMS)))
        planted[copy_id] = str(original)
    return planted


def make_sets(root: Path, images: int, copies: int) -> tuple[dict[str, str], Path, Path]:
    """Write the competition and external sets with their planted copies; every ID -> its original, and
    the two sets' folders."""
    rng = np.random.default_rng(2021)
    spec = get_dataset("synthetic")
    competition = root / "data" / "synthetic"
    external = root / "data" / "synthetic-external"
    writer.run(
        load_config(
            None, [f"paths.root={root}", f"synthetic.n_train={images}", "synthetic.n_test=40", *SMALL]
        )
    )
    writer.run(
        load_config(
            None,
            [f"paths.root={root}", f"data.dir={external}", "synthetic.n_train=120", "synthetic.n_test=0",
             "synthetic.seed=7", *SMALL],
        )
    )  # fmt: skip
    labels = read_label_file(competition / spec.label_file, spec)
    ids = labels["ID"].tolist()
    origin = {i: i for i in ids}
    in_train = plant(rng, competition / "train", ids, competition / "train", copies, "copy")
    text = dict(zip(labels["ID"], labels["labels"].map(lambda c: "|".join(map(str, c)))))
    extra = pd.DataFrame({"ID": list(in_train), "Label": [text[o] for o in in_train.values()]})
    pd.concat([pd.read_csv(competition / "train.csv", dtype=str), extra]).to_csv(
        competition / "train.csv", index=False
    )
    in_test = plant(rng, competition / "train", ids, competition / "test", 5, "test")
    ext_labels = read_label_file(external / spec.label_file, spec)
    in_external = plant(rng, competition / "train", ids, external / "train", 20, "ext")
    ext_extra = pd.DataFrame({"ID": list(in_external), "Label": [text[o] for o in in_external.values()]})
    pd.concat([pd.read_csv(external / "train.csv", dtype=str), ext_extra]).to_csv(
        external / "train.csv", index=False
    )
    ext_ids = [*ext_labels["ID"], *in_external]
    sizes = rng.integers(1, 5, len(ext_ids))
    antibodies = np.repeat(np.arange(len(ext_ids)), sizes)[: len(ext_ids)]
    pd.DataFrame({"ID": ext_ids, "antibody": antibodies, "status": "ok"}).to_csv(
        external / "sources.csv", index=False
    )
    origin.update({i: i for i in ext_labels["ID"]})
    origin.update(in_train | in_test | in_external)
    return origin, competition, external


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--copies", type=int, default=80)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        origin, competition, external = make_sets(root, args.images, args.copies)
        folders = [str(competition / "train"), str(competition / "test"), str(external / "train")]
        duplicates = root / "duplicates.json"
        assert duplicates_main([*folders, "--json", str(duplicates), "--cache", ""]) == 0
        found = {(p["a"], p["b"]) for p in json.loads(duplicates.read_text())["pairs"]}
        truth = {tuple(sorted(ab)) for ab in combinations(origin, 2) if origin[ab[0]] == origin[ab[1]]}
        hits = len(found & truth)
        rows = []
        for mode in ("train_only", "folded"):
            for seed in args.seeds:
                cfg = load_config(
                    None,
                    [f"paths.root={root}", f"folds.duplicates={duplicates}", f"folds.external=[{external}]",
                     f"folds.external_mode={mode}", f"folds.seed={seed}"],
                )  # fmt: skip
                spec = get_dataset(cfg.data.dataset)
                inputs = fold_inputs(cfg, spec, read_label_file(cfg.data_dir / spec.label_file, spec))
                assert inputs is not None
                folds = grouped_folds(inputs, spec.n_classes, cfg.folds.n_splits, seed)
                rows.append(
                    (mode, seed, folds_report(inputs, folds, spec.n_classes, cfg.folds.n_splits, seed))
                )
        elapsed = time.perf_counter() - started
    write_report(args, hits, len(found), len(truth), rows, elapsed)


def write_report(args, hits, n_found, n_truth, rows, elapsed) -> None:  # type: ignore[no-untyped-def]
    report = rows[0][2]
    lines = [
        "# Folds on a synthetic set with planted near-duplicates",
        "",
        f"`python benchmarks/bench_folds.py --images {args.images} --copies {args.copies} --seeds "
        f"{' '.join(map(str, args.seeds))}` ({elapsed:.0f} s on a shared 2-core machine). A synthetic competition "
        f"set of {args.images} training images (256²) plus {args.copies} planted copies of them, 40 test images plus 5 "
        "copies of training images, and a synthetic external set of 120 images (antibodies in groups of 1-4) plus "
        "20 copies of competition training images; copies are JPEG-re-encoded, 1728/3072-scaled, 16-bit .tif.gz or "
        "brighter (`weakcell.synthetic.duplicates`).",
        "",
        f"`weakcell duplicates` over the three folders (max distance {MAX_DISTANCE}): {n_found} pairs found, "
        f"{n_truth} planted; precision {hits / max(n_found, 1):.3f}, recall {hits / max(n_truth, 1):.3f}.",
        "",
        f"{report.pairs_in_folds} pairs among the folded training images ({report.pairs_elsewhere} more join a test "
        f"image); {report.images} training images in {report.groups} groups (largest {report.largest_group}). "
        "A pair straddles folds when its images are in different folds, fold -1 (train-only) included.",
        "",
        "| external images | fold seed | pairs straddling, plain | pairs straddling, kit | antibodies split, plain | antibodies split, kit | train-only images (kit) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, seed, r in rows:
        lines.append(
            f"| {mode} | {seed} | {r.plain_straddling} of {r.pairs_in_folds} ({r.plain_straddling / r.pairs_in_folds:.0%}) "
            f"| {r.kit_straddling} | {r.plain_split_antibodies} | {r.kit_split_antibodies} | {r.train_only} |"
        )
    lines += [
        "",
        f"Test images that are near-duplicates of training images, as `make folds` warns: "
        f"{', '.join(f'{t.test} ~ {t.train} (d={t.distance})' for t in report.test_twins.itertuples())}.",
    ]
    OUTPUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"-> {OUTPUT}")


if __name__ == "__main__":
    main()
