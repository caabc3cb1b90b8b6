"""``make ablate``: which part of the pipeline earns its keep, as one table on the same folds and seed.

Three runs, each reused when finished (``FORCE=1`` is not passed on):

- the weak run ``name``: round 0 (cells inherit image labels, then attention MIL) and pseudo-label
  refinement rounds 1..``ablate.rounds``;
- ``<name>-control`` (``ablate.control``): round 0 of the weak run (not retrained: its weights and tables
  hard-linked, which is safe because they are only ever replaced by a rename, never rewritten in place; every
  other file copied, the lock never: ``weakcell.ablate_control``; taken again when the weak run's round 0 was
  retrained) plus rounds of the same length that keep the inherited labels (``refine.relative=0``): the extra epochs without the
  relabelling, so refinement is not credited with what more training does;
- ``<name>-<variant>`` (``ablate.variants``): a refinement rule variant, round 0 and its inner models taken from
  the weak run the same way (so only its refinement rounds train; a rule that reads the MIL head trains inner
  models of its own, ``shares_inner_models``), judged against the full weak row;
- ``<name>-oracle<epochs>`` (``ablate.oracle``): the backbone trained on the true cell labels for as many epochs
  as the weak run's backbone gets in total, then MIL: the ceiling.

With ``ablate.seeds`` every run is trained once per seed (``<name>-seed<s>``; same folds and data) and each
row is reported as mean +- sd over the seeds. The targets are judged on the held-out test split, each row's
test mAP with its 95% bootstrap interval over the test images and, for a row with a reference row, the paired
interval of their difference (``paired_differences``: a comparison holds only when it excludes 0) (``configs/bench.yaml`` makes that split
large enough to tell variants apart); out-of-fold figures stay as columns.

Each row of ``rows()`` names a run, a round, how cells and images are scored and the inference settings of
its test-split submission. Columns: out-of-fold image macro-F1 at 0.5 and with tuned thresholds
(cross-fitted over folds, so tuning is not scored on the rows it was tuned on), image mAP, cell mAP
against the synthetic truth (the competition metric too: ``cell_truth.CellTruth``), the competition metric
of the test-split submission, and wall time. Written to ``reports/leaderboard.md`` (+ ``.json``, ``.png``).
The grid holds the locks of the runs it builds while it trains and scores them (``weakcell.outputs``).

Over 400 lines on purpose: the grid's rows, the runs they need and the scoring of a row across seeds are
one definition read together (a row added here is trained, scored and paired in the same file); the
report's writing is ``weakcell.ablate_report``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from weakcell.ablate_control import link_round_zero
from weakcell.ablate_report import (
    ATTENTION_ROW,
    COLUMNS,
    CONTROL_ROW,
    INHERIT_ROW,
    ORACLE_ROW,
    markdown,
    plot,
    refined,
    targets,
)
from weakcell.competition_metric import percentile_interval
from weakcell.config import Config, InferConfig, RefineConfig
from weakcell.constants import CellScore, prob_columns
from weakcell.data.datasets import get_dataset
from weakcell.kagglekit.naming import slugify
from weakcell.outputs import atomic_write_text, folder_lock, read_json
from weakcell.scoring import cell_score_table, max_pool_images
from weakcell.sources import competition_rows
from weakcell.training_set import TrainingSet, load_training_set

WEAK, CONTROL, ORACLE = "weak", "control", "oracle"
VARIANT = "variant:"  # run keys of the refinement rule variants: variant:<label>


@dataclass(frozen=True)
class Row:
    """One line of the leaderboard."""

    label: str
    run: str  # WEAK, CONTROL, ORACLE or variant_run(label)
    round: int | str  # a refinement round; "final" = ablate.rounds
    cell_score: CellScore = "confidence"  # scoring.CELL_SCORES entry for the OOF cell mAP
    image_source: str = "mil"  # mil = the MIL head's image probabilities; stage1_max = max over cells
    infer: dict[str, Any] = field(default_factory=dict)  # infer.* overrides of its test submission
    reference: str | None = None  # the row it is judged against: the paired difference on the test split


INHERIT, ATTENTION = INHERIT_ROW, ATTENTION_ROW
# The "+ attention MIL" row multiplies each cell by its image's MIL term, as tuned when every class was
# judged in every image (benchmarks/confidence.md), whatever infer.image_power the other rows submit with.
IMAGE_TERM: dict[str, Any] = {"image_power": 3.0, "image_best_cell": 0.25}


def variant_run(label: str) -> str:
    """The run key of the refinement rule variant ``label`` (``ablate.variants``)."""
    return f"{VARIANT}{label}"


def rows(rounds: int, variants: Iterable[str] = ()) -> list[Row]:
    """The grid's rows for ``rounds`` refinement rounds, in table order, each with the row it is judged
    against: the image term against the cells alone; the last refinement round against the control of the
    same epochs (earlier rounds against the round before); the control against round 0 (what the extra
    epochs earn); each rule variant (``ablate.variants``), TTA, one fold and the oracle against the full
    weak row."""
    final = refined(rounds)
    before = [ATTENTION, *(refined(r) for r in range(1, rounds))]
    return [
        Row(INHERIT, WEAK, 0, "stage1", "stage1_max", {"image_power": 0.0}),
        Row(ATTENTION, WEAK, 0, infer=IMAGE_TERM, reference=INHERIT),
        *(
            Row(refined(r), WEAK, r, reference=CONTROL_ROW if r == rounds else before[r - 1])
            for r in range(1, rounds + 1)
        ),
        Row(CONTROL_ROW, CONTROL, "final", reference=INHERIT),
        *(Row(label, variant_run(label), "final", reference=final) for label in variants),
        Row("full weak, TTA off", WEAK, "final", infer={"tta": [0]}, reference=final),
        Row("full weak, one fold (fold 0)", WEAK, "final", infer={"folds": [0]}, reference=final),
        Row(ORACLE_ROW, ORACLE, 0, reference=final),
    ]


# -- the runs -----------------------------------------------------------------------------------------


def run_configs(cfg: Config) -> dict[str, Config]:
    """The config of each run the grid trains (only those it asks for)."""
    rounds = cfg.ablate.rounds
    weak = cfg.model_copy(update={"refine": cfg.refine.model_copy(update={"rounds": rounds})})
    configs = {WEAK: weak}
    if cfg.ablate.control and rounds > 0:
        # every inherited label is kept (scores and attention are >= 0) as a hard 1: soft targets would
        # relabel the control by its scores
        keep_labels = cfg.refine.model_copy(
            update={
                "rounds": rounds,
                "relative": 0.0,
                "negative_quantile": None,
                "threshold_scale": 0.0,
                "min_attention": 0.0,
                "targets": "hard",
            }
        )
        configs[CONTROL] = cfg.model_copy(update={"name": f"{cfg.name}-control", "refine": keep_labels})
    if rounds > 0:
        for label, settings in cfg.ablate.variants.items():
            rule = RefineConfig.model_validate({**cfg.refine.model_dump(), **settings, "rounds": rounds})
            configs[variant_run(label)] = cfg.model_copy(
                update={"name": f"{cfg.name}-{slugify(label)}", "refine": rule}
            )
    if cfg.ablate.oracle:
        epochs = cfg.train.epochs + rounds * cfg.refine.epochs  # the weak backbone's total
        configs[ORACLE] = cfg.model_copy(
            update={
                "name": f"{cfg.name}-oracle{epochs}",  # one oracle per epoch budget, each reusable
                "train": cfg.train.model_copy(update={"targets": "truth", "epochs": epochs}),
                "refine": cfg.refine.model_copy(update={"rounds": 0}),
            }
        )
    return configs


def shares_inner_models(weak: RefineConfig, variant: RefineConfig) -> bool:
    """Whether a rule variant's round-1 inner models are the weak run's, so that it can take them by hard
    link: they learn round 0's targets, so they differ only where the rule changes what they train (stage 2,
    for a rule that reads it) or for how long. A variant that trains its own keeps them: taking the weak
    run's would make its round 0 look stale at every call and retrain it whole."""
    return weak.reads_stage2 == variant.reads_stage2 and weak.inner_epochs == variant.inner_epochs


def train_runs(configs: dict[str, Config]) -> dict[str, float]:
    """Train (or reuse) every run and tune each round's thresholds; wall seconds per run."""
    from weakcell import refine, thresholds, train

    seconds = {}
    for name, run_cfg in configs.items():
        start = time.perf_counter()
        if name == CONTROL or name.startswith(VARIANT):  # round 0 is the weak run's
            inner = name.startswith(VARIANT) and shares_inner_models(configs[WEAK].refine, run_cfg.refine)
            link_round_zero(configs[WEAK].run_dir, run_cfg.run_dir, inner=inner)
        else:
            train.run(run_cfg)
        refine.run(run_cfg)
        for round_ in range(run_cfg.refine.rounds + 1):
            thresholds.run(with_round(run_cfg, round_))
        seconds[name] = time.perf_counter() - start
    return seconds


def with_round(cfg: Config, round_: int) -> Config:
    """``cfg`` whose model folder is refinement round ``round_`` (what thresholds and infer read)."""
    return cfg.model_copy(update={"refine": cfg.refine.model_copy(update={"rounds": round_})})


# -- scoring one row ------------------------------------------------------------------------------------


def row_infer(cfg: Config, row: Row) -> InferConfig:
    """The inference settings of a row: the run's, with the row's overrides."""
    return cfg.infer.model_copy(update=row.infer)


def oof_scores(cfg: Config, row: Row, round_dir: Path, data: TrainingSet) -> dict[str, float | int | None]:
    """Out-of-fold image and cell scores of one round, as the row reads them: the cell mAP is the
    competition metric of the row's cell score (the submitted confidence as its file would carry it)
    against the true cells of the training images."""
    from weakcell.data.labels import to_multi_hot
    from weakcell.evaluate import image_level_scores

    n_classes = data.n_classes
    # the competition's images (folded external sources have OOF rows too: weakcell.sources)
    oof_image = competition_rows(pd.read_parquet(round_dir / "oof_image.parquet"), data.images)
    oof_cell = competition_rows(pd.read_parquet(round_dir / "oof_cell.parquet"), data.images)
    image_ids = oof_image["image_id"].tolist()
    y_true = to_multi_hot(data.images.set_index("image_id").loc[image_ids, "labels"].tolist(), n_classes)
    if row.image_source == "stage1_max":
        probs = max_pool_images(oof_cell, oof_cell[prob_columns(n_classes)].to_numpy(), image_ids)
    else:
        probs = oof_image[prob_columns(n_classes)].to_numpy()
    image = image_level_scores(y_true, probs, folds=oof_image["fold"].to_numpy(), tuning=cfg.thresholds)
    scores = {
        "f1_at_05": image["macro_f1_at_05"],
        "f1_tuned": image["macro_f1_tuned_cross_fitted"],
        "image_map": image["map"],
    }
    if data.cell_truth is not None:
        table = cell_score_table(row.cell_score, oof_cell, oof_image, n_classes, row_infer(cfg, row))
        folds = set(oof_image["fold"].tolist())
        scores["cell_map"] = data.cell_truth.score(table, cfg.evaluate.verified, folds)["map"]
    return scores


# Inference settings that change only how a cell's confidence is formed from the same forward passes: rows
# that differ only in these share one inference and are rescored from its ``pred_cell.parquet``.
CONFIDENCE_KEYS = ("image_power", "image_best_cell")


def inference_key(run_cfg: Config, row: Row) -> tuple[str, str]:
    """What a row's test inference computes: the model folder and every forward-pass setting."""
    forward = {
        k: v for k, v in row_infer(run_cfg, row).model_dump(mode="json").items() if k not in CONFIDENCE_KEYS
    }
    return str(run_cfg.model_dir), json.dumps(forward, sort_keys=True)


def test_scores(cfg: Config, row: Row, slug: str, inferred: Path | None = None) -> dict[str, Any]:
    """Infer the test split as the row says (or rescore ``inferred``, an inference of the same forward
    passes) and score it with the competition metric, with its bootstrap interval over test images."""
    from weakcell import infer
    from weakcell.evaluate import submission_cell_maps, submission_image_scores
    from weakcell.thresholds import read_thresholds

    # a path under paths.submissions (infer.output takes a bare name there, a path as given)
    output = str(Path(cfg.paths.submissions) / f"{cfg.name}-ablate" / slug)
    infer_cfg = cfg.model_copy(update={"infer": row_infer(cfg, row).model_copy(update={"output": output})})
    seconds = 0.0
    folder = inferred
    if folder is None:
        start = time.perf_counter()
        folder = infer.run(infer_cfg)
        seconds = time.perf_counter() - start
    scores: dict[str, Any] = {"infer_seconds": seconds, "inferred": str(folder)}
    if not get_dataset(cfg.data.dataset).has_truth:
        return scores
    # the file this row wrote, or the same predictions under the row's confidence formula as its file
    # would carry it (infer.min_score applied: ALTERNATIVES["confidence"]); only that formula is scored,
    # the shared inference's own CSV was scored with its row
    rescored = inferred is not None
    entry = "confidence" if rescored else "submission"
    reading = cfg.evaluate.verified
    result = submission_cell_maps(
        infer_cfg,
        folder,
        alternatives=(entry,) if rescored else False,
        readings=(reading,),
        bootstrap=cfg.ablate.bootstrap,
        interval_of=entry,
        submission=not rescored,
    )[reading][entry]
    scores["test_cell_map"] = result["map"]
    # per class, for the report's "where the gap is" table (NaN: no true cell of the class in the split)
    scores["test_ap"] = [float(v) for v in result["ap"]]
    scores["test_n_gt"] = [int(v) for v in result["n_gt"]]
    if "interval" in result:
        scores["test_low"], scores["test_high"] = result["interval"]
        # for the paired differences (paired_differences): the mAP of each resample, and what they were drawn for
        scores["test_resampled"], scores["test_resamples"] = result["resampled"], result["resamples_key"]
    if row.image_source == "mil":  # the submission's image probabilities are the MIL head's
        # thresholds tuned on all OOF images, scored on images no fold saw: tuning's held-out test
        image = submission_image_scores(cfg, folder, read_thresholds(cfg.model_dir / "thresholds.json"))
        scores.update(test_f1_at_05=image["macro_f1_at_05"], test_f1_tuned=image["macro_f1_tuned"])
    return scores


def round_seconds(run_cfg: Config, round_: int) -> float:
    """Training wall time up to and including ``round_`` (the rounds' ``metrics.json``)."""
    total = 0.0
    for r in range(round_ + 1):
        path = run_cfg.round_dir(r) / "metrics.json"
        if path.is_file():
            total += float(read_json(path).get("seconds", 0.0))
    return total


def seed_config(cfg: Config, seed: int) -> Config:
    """The grid's config for one training seed: ``cfg.seed`` keeps the run names (its runs are the
    single-seed ablation's), other seeds train ``<name>-seed<s>``. Folds and data are the same for all."""
    name = cfg.name if seed == cfg.seed else f"{cfg.name}-seed{seed}"
    return cfg.model_copy(update={"seed": seed, "name": name})


def leaderboard(cfg: Config) -> pd.DataFrame:
    """Every row for every seed of ``ablate.seeds`` (one row per variant and seed, column ``seed``)."""
    seeds = cfg.ablate.seeds or [cfg.seed]
    return pd.concat(
        [seed_leaderboard(seed_config(cfg, seed)).assign(seed=seed) for seed in seeds], ignore_index=True
    )


def seed_leaderboard(cfg: Config) -> pd.DataFrame:
    """Train what the grid needs, then score every row, holding the lock of every run it builds."""
    configs = run_configs(cfg)
    with ExitStack() as held:
        for run_cfg in configs.values():
            held.enter_context(folder_lock(run_cfg.run_dir, "ablate", cfg.checks.lock_wait_s))
        return _seed_leaderboard(cfg, configs)


def _seed_leaderboard(cfg: Config, configs: dict[str, Config]) -> pd.DataFrame:
    train_runs(configs)
    data = load_training_set(configs[WEAK])
    rounds = cfg.ablate.rounds
    records = []
    inferred: dict[tuple[str, str], Path] = {}
    for row in rows(rounds, cfg.ablate.variants):
        round_ = rounds if row.round == "final" else int(row.round)
        if row.run not in configs or (row.infer.get("tta") == [0] and cfg.infer.tta == [0]):
            continue  # a run not trained, or a TTA-off row when the runs infer without TTA anyway
        run_cfg = with_round(configs[row.run], round_ if row.run != ORACLE else 0)
        record: dict[str, Any] = {
            "variant": row.label,
            "reference": row.reference,
            "run": run_cfg.name,
            "round": round_,
        }
        record.update(oof_scores(cfg, row, run_cfg.model_dir, data))
        key = inference_key(run_cfg, row)
        record.update(test_scores(run_cfg, row, slugify(row.label), inferred.get(key)))
        inferred.setdefault(key, Path(record.pop("inferred")))
        record["train_seconds"] = round_seconds(run_cfg, run_cfg.refine.rounds)
        records.append(record)
    return pd.DataFrame(records)


def across_seeds(table: pd.DataFrame) -> pd.DataFrame:
    """One line per variant (in table order): ``<column>`` the mean over seeds, ``<column>_sd`` the
    standard deviation (NaN with one seed), ``test_ci`` the mean half-width of the bootstrap intervals,
    ``seeds`` how many."""
    numeric = [
        c
        for c in table.columns
        if c not in ("variant", "run", "seed") and pd.api.types.is_numeric_dtype(table[c])
    ]
    grouped = table.groupby("variant", sort=False)
    summary = grouped[numeric].mean()
    spread = grouped[numeric].std(ddof=1).add_suffix("_sd")
    summary = pd.concat([summary, spread], axis=1)
    if {"test_low", "test_high"} <= set(table.columns):
        summary["test_ci"] = (
            ((table["test_high"] - table["test_low"]) / 2).groupby(table["variant"], sort=False).mean()
        )
    summary["seeds"] = grouped.size()
    return summary.reset_index()


def round_on_round(rounds: int) -> list[tuple[str, str]]:
    """With two rounds or more, the last round against the round before it too: whether the last round
    earns its keep over stopping one round earlier (its own reference is the control of its epochs)."""
    return [(refined(rounds), refined(rounds - 1))] if rounds >= 2 else []


def paired_differences(table: pd.DataFrame, also: Iterable[tuple[str, str]] = ()) -> pd.DataFrame:
    """One line per row with a reference row in ``table`` (one line per variant and seed, as
    ``leaderboard``), then one per ``(variant, reference)`` pair of ``also``: ``difference``, the mean over
    seeds of its test mAP minus its reference's;
    ``low``/``high``, the 95% percentile interval of that mean over the bootstrap resamples of the test
    images, both rows scored on the same resample (every row's ``test_resampled`` comes from the same
    resamples of the same images: ``competition_metric.bootstrap_maps``), seeds averaged within each
    resample; ``per_seed``, each seed's difference."""
    if "test_resampled" not in table:
        return pd.DataFrame(columns=["variant", "reference", "difference", "low", "high", "per_seed"])
    by_seed = table.set_index(["variant", "seed"])
    lines = []
    pairs = [*table.drop_duplicates("variant")[["variant", "reference"]].itertuples(index=False), *also]
    for variant, reference in pairs:
        if not isinstance(reference, str) or reference not in set(table["variant"]):
            continue
        seeds = sorted(
            set(table.loc[table["variant"] == variant, "seed"])
            & set(table.loc[table["variant"] == reference, "seed"])
        )
        points, resampled = [], []
        for seed in seeds:
            row, base = by_seed.loc[(variant, seed)], by_seed.loc[(reference, seed)]
            if row.get("test_resamples") != base.get("test_resamples"):
                raise ValueError(
                    f"{variant} and {reference} (seed {seed}) were resampled on other test images"
                )
            points.append(float(row["test_cell_map"] - base["test_cell_map"]))
            resampled.append(np.asarray(row["test_resampled"]) - np.asarray(base["test_resampled"]))
        if not seeds:
            continue
        low, high = percentile_interval(np.mean(resampled, axis=0))
        lines.append(
            {
                "variant": variant,
                "reference": reference,
                "difference": float(np.mean(points)),
                "low": low,
                "high": high,
                "per_seed": points,
            }
        )
    return pd.DataFrame(lines, columns=["variant", "reference", "difference", "low", "high", "per_seed"])


def per_class(table: pd.DataFrame, rounds: int) -> pd.DataFrame:
    """Test AP per class (mean over seeds) of the rows that tell where the weak model loses to the oracle:
    inheritance, the control, the final refinement round and the oracle (those present), one line per
    class with its true test cells (``n_gt``) and ``gap`` = oracle - final round; empty without per-class
    scores (a dataset without per-cell truth)."""
    if "test_ap" not in table:
        return pd.DataFrame()
    wanted = [INHERIT, CONTROL_ROW, refined(rounds), ORACLE_ROW]
    present = [label for label in wanted if label in set(table["variant"])]
    columns = {}
    for label in present:
        seeds_ap = pd.DataFrame(table.loc[table["variant"] == label, "test_ap"].tolist(), dtype=float)
        columns[label] = seeds_ap.mean().to_numpy()  # NaN-skipping; a class no seed could score stays NaN
    first = table.loc[table["variant"] == present[0], "test_n_gt"].iloc[0] if present else []
    out = pd.DataFrame({"n_gt": np.asarray(first, dtype=int), **columns})
    if {refined(rounds), ORACLE_ROW} <= set(present):
        out["gap"] = out[ORACLE_ROW] - out[refined(rounds)]
    return out


def run(cfg: Config) -> pd.DataFrame:
    """The grid, ``reports/leaderboard.md`` (+ json, png); returns one line per variant (across seeds)."""
    start = time.perf_counter()
    if cfg.ablate.subset:  # the quick grid: one refinement round, no control run
        cfg = cfg.model_copy(update={"ablate": cfg.ablate.model_copy(update={"rounds": 1, "control": False})})
    table = leaderboard(cfg)
    summary = across_seeds(table)
    paired = paired_differences(table, also=round_on_round(cfg.ablate.rounds))
    seconds = time.perf_counter() - start
    checks = targets(summary, paired, cfg.ablate.rounds)
    classes = per_class(table, cfg.ablate.rounds)
    reports = cfg.path(cfg.paths.reports)
    reports.mkdir(parents=True, exist_ok=True)
    atomic_write_text(reports / "leaderboard.md", markdown(summary, paired, cfg, checks, seconds, classes))
    atomic_write_text(
        reports / "leaderboard.json",
        json.dumps(
            {
                "rows": summary.to_dict(orient="records"),
                "paired": paired.to_dict(orient="records"),
                "per_seed": table.drop(columns="test_resampled", errors="ignore").to_dict(orient="records"),
                "per_class": classes.to_dict(orient="records"),
                "targets": checks,
                "seconds": seconds,
            },
            indent=2,
            default=float,
        ),
    )
    plot(summary, reports / "leaderboard.png")
    shown = ["variant", *[c for c in COLUMNS if c in summary and c != "variant"]]
    with pd.option_context("display.width", 220, "display.max_columns", 20):
        print(summary[shown].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    for line in paired.itertuples(index=False):
        print(
            f"  {line.variant} - {line.reference}: {line.difference:+.3f} [{line.low:+.3f}, {line.high:+.3f}]"
        )
    for what, met, numbers in checks:
        print(f"  {'met    ' if met else 'NOT met' if met is not None else 'n/a    '} {what}: {numbers}")
    print(
        f"ablate: {len(summary)} variants x {summary['seeds'].max()} seeds in {seconds / 60:.1f} min -> "
        f"{reports / 'leaderboard.md'}, .json, .png"
    )
    return summary


if __name__ == "__main__":
    from weakcell.cli import stage_main

    raise SystemExit(stage_main(run))
