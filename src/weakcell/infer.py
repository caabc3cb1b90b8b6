"""``make infer``: predict the test split with every fold's models and write the Kaggle submissions.

Per fold: the cell model predicts every test cell under each TTA symmetry (probabilities and embeddings
averaged over the symmetries); the fold's MIL head turns each image's averaged embeddings into image
probabilities and attention. Folds are then blended as a groupby-mean on (image_id, cell_id) / image_id,
after asserting that every fold predicted the same keys. A cell's confidence for class c is its own
probability times an image term ** ``infer.image_power`` (the top 2021 solutions' product; the term mixes
the image's MIL probability with its best cell's, ``scoring.cell_confidence``); the default power 0 submits
the cell probability alone, best under the organisers' reading of the metric. With ``image_model.enabled``
the whole-image model's fold ensemble predicts the images too (``pred_image_model.parquet``) and joins the
confidence and ``image_level.csv`` by the rules of ``weakcell.combine`` (``infer.image_model_rule``,
``infer.image_level``).

Writes ``submissions/<run>/``: ``pred_image.parquet``, ``pred_cell.parquet``, ``cell_level.csv`` (every ID
of the dataset's sample submission, masks at the original size, validated before it is written) and
``image_level.csv`` (classes above the tuned thresholds of ``runs/<run>/thresholds.json``). The four are
written into a staging folder, then published as one set (``submission.publish``: moved in place,
``published.json`` with their SHA-256 last), so a killed run never leaves a new file beside an old one
unnoticed; the folder's lock is held throughout and a killed run's temporaries are removed first. Its
``lineage.json`` (output ``submission``: the settings it reads, the cache, the fold weights, the thresholds,
the sample submission) is written last: a second call with the same lineage reuses the folder.

Just over 400 lines on purpose: the staging, lineage and reuse rules above belong with the one writer
that uses them; the prediction itself is ``predict_fold`` and ``weakcell.submission``.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from weakcell.cache.coverage import MissingImages, missing_images
from weakcell.cache.store import SKIPPED_FILE, CellCache, cache_fingerprint
from weakcell.combine import (
    CellTerms,
    blend,
    combined_confidence,
    image_level_probs,
    needs_image_model,
    thresholds_file,
)
from weakcell.config import OUTPUT_INPUTS, Config, changed_settings
from weakcell.constants import prob_columns
from weakcell.data.datasets import get_dataset
from weakcell.data.ids import check_ids
from weakcell.data.manifest import file_hash
from weakcell.engine import predict
from weakcell.errors import StageError
from weakcell.lineage import RECORD as LINEAGE_FILE
from weakcell.lineage import Lineage, digest, read_lineage, write_lineage
from weakcell.metrics import sigmoid
from weakcell.models import create_model
from weakcell.outputs import atomic_write, clean_temporaries, folder_lock, writing
from weakcell.stage2 import BagRequest, load_trained
from weakcell.submission import check_published, publish, write_cell_level, write_image_level
from weakcell.thresholds import read_thresholds
from weakcell.tta import predict_views
from weakcell.weights import load_state_dict


def predict_fold(
    cfg: Config, fold_dir: Path, cache: CellCache, image_ids: list[str], n_classes: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One fold's image and cell predictions of ``image_ids`` (TTA-averaged)."""
    cells = cache.cells[cache.cells["image_id"].isin(image_ids)]
    rows = cells.index.to_numpy()
    cell_model = create_model("cell", cfg, n_classes)
    cell_model.load_state_dict(load_state_dict(fold_dir / "cell" / "model.pt"))
    # (N, C) and (N, D) averaged over the TTA views, in ``rows`` order
    probs, embeddings = predict_views(cell_model, cache, rows, cfg.infer.tta, cfg.train)

    # stage 2 as the run trained it (``mil.mode``): MIL over each image's TTA-averaged embeddings (frozen),
    # or the end-to-end model over the image's crops (untransformed); embeddings are indexed by cache row
    table = np.zeros((len(cache.cells), embeddings.shape[1] if len(rows) else 1), dtype=np.float32)
    table[rows] = embeddings
    by_image = cells.groupby("image_id", sort=False).indices
    bags = [rows[by_image[i]] if i in by_image else np.zeros(0, np.int64) for i in image_ids]
    mil, stage2 = load_trained(cfg, fold_dir, n_classes, table.shape[1])
    n_max = max((len(b) for b in bags), default=1)
    targets = np.zeros((len(image_ids), n_classes), np.float32)
    image_bags = stage2.bags(BagRequest(cfg, cache, table, bags, targets, n_max, training=False))
    # batches of mil.batch_size images, as stage 2 trains (an end-to-end batch holds all their crops)
    mil_predict = cfg.train.model_copy(update={"batch_size": cfg.mil.batch_size})
    mil_out = predict(mil, image_bags, mil_predict, batch_keys=("bag",))
    image_probs = np.zeros((len(image_ids), n_classes))
    image_probs[mil_out["bag"]] = sigmoid(mil_out["logits"])
    images = pd.DataFrame(image_probs, columns=prob_columns(n_classes)).assign(image_id=image_ids)
    cell_table = cells[["image_id", "cell_id"]].reset_index(drop=True)
    cell_table = pd.concat([cell_table, pd.DataFrame(probs, columns=prob_columns(n_classes))], axis=1)
    return images, cell_table


def images_to_predict(cfg: Config, cache: CellCache) -> pd.DataFrame:
    """``ID, ImageWidth, ImageHeight`` of the images to predict, in submission order.

    ``infer.split=test``: the dataset's sample submission (its IDs, order and sizes are what Kaggle scores;
    a 2018 ``Id,Predicted`` sample has no sizes: they come from the cache, which must hold every test ID).
    Another split: that split's cached images, sizes from the cache, so a submission can be made for
    images without a sample submission (e.g. the real training images in ../shared/data)."""
    spec = get_dataset(cfg.data.dataset)
    if cfg.infer.split == "test":
        sample = read_sample(cfg)
        if spec.submission == "cell":
            return sample
        return sizes_from_cache(sample[spec.id_column].tolist(), cache, cfg.cache_dir)
    # images the cache skipped (listed in the label file, files missing or unreadable) have nothing to predict
    images = cache.images[(cache.images["split"] == cfg.infer.split) & (cache.images["status"] == "ok")]
    if images.empty:
        raise StageError(
            f"the cache {cfg.cache_dir} holds no {cfg.infer.split!r} images; build it with "
            f'`make cache ARGS="cache.splits=[{cfg.infer.split}]"`'
        )
    return pd.DataFrame(
        {
            "ID": images["image_id"].astype(str).to_numpy(),
            "ImageWidth": images["width"].to_numpy(),
            "ImageHeight": images["height"].to_numpy(),
            "PredictionString": "",
        }
    )


def read_sample(cfg: Config) -> pd.DataFrame:
    """The dataset's sample submission (IDs as strings), a clear error when it is missing."""
    spec = get_dataset(cfg.data.dataset)
    sample_path = cfg.data_dir / spec.sample_submission
    if not sample_path.is_file():
        raise FileNotFoundError(f"no sample submission at {sample_path}: it lists the test IDs")
    sample = pd.read_csv(sample_path, dtype={spec.id_column: str}, keep_default_na=False)
    if spec.id_column not in sample.columns:
        raise StageError(f"{sample_path} has no {spec.id_column} column (found {list(sample.columns)})")
    check_ids(sample[spec.id_column], str(sample_path))
    return sample


def sizes_from_cache(image_ids: list[str], cache: CellCache, cache_dir: Path) -> pd.DataFrame:
    """``ID, ImageWidth, ImageHeight`` of ``image_ids`` in their order, sizes as the cache read them."""
    known = cache.images.drop_duplicates("image_id").set_index("image_id")
    missing = [i for i in image_ids if i not in known.index]
    if missing:
        raise StageError(
            f"{len(missing)} test ID(s) of the sample submission are not in the cache {cache_dir}, e.g. "
            f"{missing[0]}; build it with `make cache` (cache.splits must include test)"
        )
    rows = known.loc[image_ids]
    return pd.DataFrame(
        {
            "ID": image_ids,
            "ImageWidth": rows["width"].to_numpy(),
            "ImageHeight": rows["height"].to_numpy(),
            "PredictionString": "",
        }
    )


def check_cells(cfg: Config, cache: CellCache, image_ids: list[str]) -> MissingImages:
    """The images to predict that give no cells (none found, unreadable, not cached): their rows would be
    empty placeholders, on Kaggle lost images nobody sees. Refused in one line naming one of them, unless
    ``checks.allow_empty_rows``; refused anyway when no image has a cell (nothing to predict)."""
    missing = missing_images(image_ids, cache.images, cfg.infer.split)
    what = f"{cfg.infer.split} images to predict"
    fix = f"fix or cache them (make cache; {cfg.cache_dir / SKIPPED_FILE} says why images failed)"
    if missing.count and missing.count == missing.labelled:
        raise StageError(
            f"infer: nothing to predict: {missing.describe(what)}, e.g. {missing.example()}; {fix}"
        )
    if missing.count and not cfg.checks.allow_empty_rows:
        raise StageError(
            f"infer: {missing.describe(what)}, e.g. {missing.example()}: their rows would be empty; {fix}, "
            "or submit them as empty rows with checks.allow_empty_rows=true"
        )
    return missing


def model_sources(cfg: Config) -> dict[str, float]:
    """``run[/round<r>]`` -> weight of every run whose predictions are blended."""
    return dict(cfg.infer.blend) if cfg.infer.blend else {cfg.infer.models or cfg.name: 1.0}


def model_folds(cfg: Config, source_name: str) -> tuple[Path, list[Path]]:
    """The folder whose folds predict (``source_name`` = ``run`` for its final refinement round as this
    config counts them, or ``run/round<r>``) and the fold folders to blend (``infer.folds`` or all)."""
    name, _, round_name = source_name.partition("/")
    source = cfg.model_copy(update={"name": name})
    if round_name and not (round_name.startswith("round") and round_name[5:].isdigit()):
        raise StageError(f"model source {source_name!r}: expected <run> or <run>/round<r>")
    run_dir = source.round_dir(int(round_name[5:])) if round_name else source.model_dir
    # the networks are built from this config: they must be the ones the weights were trained as
    differ = changed_settings(source.run_dir, cfg, OUTPUT_INPUTS["model"])
    if differ:
        raise StageError(
            f"the models in {source.run_dir} were trained with other network settings ({', '.join(differ[:4])}); "
            f"infer with that run's config ({source.run_dir / 'config.yaml'}) or the same settings"
        )
    fold_dirs = sorted(p for p in run_dir.glob("fold*") if (p / "mil" / "model.pt").is_file())
    if cfg.infer.folds is not None:
        fold_dirs = [p for p in fold_dirs if int(p.name.removeprefix("fold")) in cfg.infer.folds]
    if not fold_dirs:
        step = "make refine" if cfg.refine.rounds else "make train"
        raise FileNotFoundError(
            f"no trained folds in {run_dir} (infer.folds={cfg.infer.folds}); run `{step}` first"
        )
    return run_dir, fold_dirs


# What one inference publishes together (``submission.publish``), in the order they are moved in place.
OUTPUT_FILES = ("pred_image.parquet", "pred_cell.parquet", "cell_level.csv", "image_level.csv")
IMAGE_MODEL_FILE = "pred_image_model.parquet"  # the whole-image model's test probabilities, when it is used
STAGING_DIR = ".staging.tmp"  # the next run's files, inside the output folder (a rename stays atomic)


def _file_stamp(path: Path) -> list[int] | None:
    """(bytes, modification time in ns) of a file, None when it is absent: what ``make`` trusts, and free."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def submission_lineage(
    cfg: Config, models: dict[str, tuple[Path, list[Path]]], thresholds: Path, image_folds: list[Path]
) -> Lineage:
    """What one inference is made from (``weakcell.config.lineage``, output ``submission``): the settings it
    reads, the cell cache's fingerprint, every fold's weight files (by size and modification time: a fold
    trained again has new weights under the same settings; the whole-image model's ``image_folds`` too),
    the thresholds and the sample submission (by content)."""
    weights = {
        str(fold / part): _file_stamp(fold / part)
        for _, fold_dirs in models.values()
        for fold in fold_dirs
        for part in ("cell/model.pt", "mil/model.pt")
    }
    weights.update({str(fold / "model.pt"): _file_stamp(fold / "model.pt") for fold in image_folds})
    sample = cfg.data_dir / get_dataset(cfg.data.dataset).sample_submission
    return Lineage.of(
        "submission",
        cfg,
        cache=cache_fingerprint(cfg.cache_dir),
        models=digest(weights),
        thresholds=file_hash(thresholds),
        sample=file_hash(sample) if sample.is_file() else None,
    )


def up_to_date(out_dir: Path, lineage: Lineage) -> bool:
    """The folder holds a complete, valid publication made from this very lineage (its ``lineage.json``)."""
    try:
        saved = read_lineage(out_dir)
        check_published(out_dir / "cell_level.csv")
    except (OSError, ValueError):  # StageError is a ValueError: a damaged record or file is redone
        return False
    return (
        saved is not None
        and saved.fingerprint == lineage.fingerprint
        and all((out_dir / name).is_file() for name in OUTPUT_FILES)
    )


def run(cfg: Config) -> Path:
    """Predict the images of ``infer.split`` with the trained folds and write ``submissions/<output>/``,
    holding that folder's lock."""
    out_dir = cfg.submission_dir
    with folder_lock(out_dir, "infer", cfg.checks.lock_wait_s):
        return _infer(cfg, out_dir)


def image_model_folds(cfg: Config) -> list[Path]:
    """The whole-image model's fold folders when inference uses it (``image_model.enabled``), else none; a
    rule or image level that needs the model without it is refused before any work."""
    if cfg.image_model.enabled:
        from weakcell.image_model import trained_folds  # its image cache and network only when used

        return trained_folds(cfg)
    if needs_image_model(cfg.infer):
        raise StageError(
            f"infer.image_model_rule={cfg.infer.image_model_rule} and infer.image_level={cfg.infer.image_level} "
            "need the whole-image model: set image_model.enabled=true and train it (make image-model)"
        )
    return []


def _infer(cfg: Config, out_dir: Path) -> Path:
    start = time.perf_counter()
    # under the lock, every temporary here is a killed run's
    shutil.rmtree(out_dir / STAGING_DIR, ignore_errors=True)
    clean_temporaries(out_dir)
    spec = get_dataset(cfg.data.dataset)
    sources = model_sources(cfg)
    models = {name: model_folds(cfg, name) for name in sources}  # every source checked before any work
    image_folds = image_model_folds(cfg)
    # the first source's round decides the image labels, with the thresholds of infer.image_level's source
    thresholds_path = thresholds_file(cfg, models[next(iter(sources))][0])
    if not thresholds_path.is_file():
        raise FileNotFoundError(f"no {thresholds_path}; run `make thresholds` first")
    for warning in json.loads(thresholds_path.read_text()).get("warnings", []):
        print(f"infer: WARNING from {thresholds_path}: {warning}")
    lineage = submission_lineage(cfg, models, thresholds_path, image_folds)
    if not cfg.force and up_to_date(out_dir, lineage):
        print(
            f"infer: {out_dir} is up to date (its {LINEAGE_FILE}: same models, thresholds, cache and settings), "
            "skipping (FORCE=1 redoes it)"
        )
        return out_dir
    cache = CellCache(cfg.cache_dir)
    sample = images_to_predict(cfg, cache)
    image_ids = sample["ID"].astype(str).tolist()
    empty = check_cells(cfg, cache, image_ids)  # before any prediction: a refusal costs nothing
    n_classes = spec.n_classes

    images, cells = predict_sources(cfg, models, sources, cache, image_ids, n_classes)
    model_images = None
    if image_folds:
        from weakcell.image_model import predict_images

        model_images = predict_images(cfg, image_folds, image_ids, cfg.infer.split)
    image_of_cell = of_cells(images, cells, n_classes)
    terms = CellTerms(
        cells[prob_columns(n_classes)].to_numpy(),
        image_of_cell,
        of_cells(model_images, cells, n_classes) if model_images is not None else None,
        cells["image_id"].to_numpy(),
    )
    confidence = combined_confidence(terms, cfg.infer)
    scored = cells[["image_id", "cell_id"]].assign(**dict(zip(prob_columns(n_classes), confidence.T)))

    # every file is written (each validated) into the staging folder, then all are published together
    names = (*OUTPUT_FILES, IMAGE_MODEL_FILE) if model_images is not None else OUTPUT_FILES
    with staging_folder(out_dir, names) as staged:
        atomic_write(staged["pred_image.parquet"], lambda tmp: images.to_parquet(tmp, index=False))
        if model_images is not None:
            atomic_write(staged[IMAGE_MODEL_FILE], lambda tmp: model_images.to_parquet(tmp, index=False))
        cell_table = cells.assign(**{f"image_{c}": image_of_cell[:, c] for c in range(n_classes)})
        atomic_write(staged["pred_cell.parquet"], lambda tmp: cell_table.to_parquet(tmp, index=False))
        write_cell_level(
            scored, lambda i: cache.masks(i).cells, sample, staged["cell_level.csv"], cfg.infer.min_score
        )
        # images come in the sample submission's order (image_ids above); a competition scored on image
        # labels (2018) gets its file checked against its own sample submission, under its ID column
        image_sample = read_sample(cfg) if spec.submission == "image" and cfg.infer.split == "test" else None
        write_image_level(
            image_level_probs(cfg, images, model_images),
            read_thresholds(thresholds_path),
            staged["image_level.csv"],
            columns=spec.image_level_columns,
            sample_submission=image_sample,
            negative=spec.negative,
        )
        publish(out_dir, staged)
    if model_images is None:  # an earlier run's image-model predictions are not this publication's
        with writing(out_dir / IMAGE_MODEL_FILE):
            (out_dir / IMAGE_MODEL_FILE).unlink(missing_ok=True)
    write_lineage(out_dir, lineage)  # after the files: a run killed before it is redone, never reused
    empty_rows = f" ({empty.count} empty rows: {empty.describe('images')})" if empty.count else ""
    scored_file = "cell_level.csv" if spec.submission == "cell" else "image_level.csv"
    with_image_model = f" + the whole-image model's {len(image_folds)} folds" if image_folds else ""
    print(
        f"infer: {' + '.join(f'{len(f)} folds of {d}' for d, f in models.values())}{with_image_model} x "
        f"{len(cfg.infer.tta)} TTA views, {len(images)} images{empty_rows}, {len(cells)} cells, "
        f"{time.perf_counter() - start:.0f} s -> {out_dir / scored_file} (the Kaggle file), "
        f"{', '.join(f for f in names if f != scored_file)}"
    )
    return out_dir


def predict_sources(
    cfg: Config,
    models: dict[str, tuple[Path, list[Path]]],
    sources: dict[str, float],
    cache: CellCache,
    image_ids: list[str],
    n_classes: int,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The image (MIL) and cell predictions of every source's folds: folds of one run as a plain mean,
    runs weighted by ``sources``."""
    per_source = []
    for _, fold_dirs in models.values():
        results = [predict_fold(cfg, fold_dir, cache, image_ids, n_classes) for fold_dir in fold_dirs]
        per_source.append(
            (
                blend([r[0] for r in results], ["image_id"]),
                blend([r[1] for r in results], ["image_id", "cell_id"]),
            )
        )
    weights = list(sources.values())
    images = blend([p[0] for p in per_source], ["image_id"], weights)
    return images, blend([p[1] for p in per_source], ["image_id", "cell_id"], weights)


def of_cells(images: pd.DataFrame, cells: pd.DataFrame, n_classes: int) -> np.ndarray:
    """(N, C): each cell's image's probabilities from an ``image_id, p_*`` table."""
    return images.set_index("image_id").loc[cells["image_id"], prob_columns(n_classes)].to_numpy()


@contextmanager
def staging_folder(out_dir: Path, names: tuple[str, ...] = OUTPUT_FILES) -> Iterator[dict[str, Path]]:
    """The staged path of each of ``names`` in ``out_dir``'s staging folder, which is removed when the
    block ends, however it ends (a killed run's: by the next run)."""
    staging = out_dir / STAGING_DIR
    with writing(staging):
        staging.mkdir(parents=True, exist_ok=True)
    try:
        yield {name: staging / name for name in names}
    finally:
        shutil.rmtree(staging, ignore_errors=True)


if __name__ == "__main__":
    from weakcell.cli import stage_main

    raise SystemExit(stage_main(run))
