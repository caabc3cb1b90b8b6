"""The leaderboard of ``make ablate``: the targets judged on the test split, ``leaderboard.md`` and
``leaderboard.png``, and the row labels they read. The grid, its runs and their scores are
``weakcell.ablate``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from weakcell.config import Config
from weakcell.data.datasets import get_dataset
from weakcell.folds_record import describe_folds
from weakcell.outputs import atomic_savefig

ORACLE_ROW = "oracle: true cell labels"
INHERIT_ROW = "inheritance only (cell model)"
CONTROL_ROW = "control: same epochs, labels kept"
ATTENTION_ROW = "+ attention MIL (cell x image)"
ORACLE_SHARE = 0.95  # the weak model's target share of the oracle's test mAP (issue 24)


def refined(round_: int) -> str:
    """The leaderboard label of the weak run after ``round_`` refinement rounds."""
    return f"+ refinement, {round_} round{'s' if round_ > 1 else ''}"


def beats(paired: pd.DataFrame, variant: str, reference: str, what: str) -> tuple[str, bool | None, str]:
    """A target met only when ``variant``'s paired 95% interval of its difference to ``reference`` on the
    test split lies above 0 (not judged without the paired line)."""
    line = paired[(paired["variant"] == variant) & (paired["reference"] == reference)]
    if line.empty:
        return what, None, "no paired difference (a row missing, or ablate.bootstrap 0)"
    got = line.iloc[0]
    return (
        what,
        bool(got["low"] > 0),
        f"{got['difference']:+.4f} test mAP, paired 95% interval [{got['low']:+.4f}, {got['high']:+.4f}]"
        f" (per seed {per_seed_text(got['per_seed'])})",
    )


def per_seed_text(values) -> str:
    return ", ".join(f"{v:+.3f}" for v in values)


def targets(summary: pd.DataFrame, paired: pd.DataFrame, rounds: int) -> list[tuple[str, bool | None, str]]:
    """The targets, judged on the held-out test split: (what, met, the numbers). A comparison is met only
    when the paired 95% interval of its difference excludes 0 (``ablate.paired_differences``); out-of-fold
    figures are the table's columns, not judged: the test split is what no choice saw."""
    by = summary.set_index("variant")
    final = refined(rounds)
    checks: list[tuple[str, bool | None, str]] = []
    if "test_cell_map" not in by or final not in by.index:
        return checks
    weak = by.loc[final, "test_cell_map"]
    if ORACLE_ROW in by.index:
        oracle = by.loc[ORACLE_ROW, "test_cell_map"]
        checks.append(
            (
                f"full weak test mAP >= {ORACLE_SHARE:.2f} x oracle",
                bool(weak >= ORACLE_SHARE * oracle),
                # 4 decimals: at 3 a miss by 0.0005 reads "0.536 vs 0.536"
                f"{weak:.4f} vs {ORACLE_SHARE:.2f} x {oracle:.4f} = {ORACLE_SHARE * oracle:.4f} "
                f"({weak / oracle:.3f} x)",
            )
        )
    if CONTROL_ROW in by.index:
        checks.append(beats(paired, final, CONTROL_ROW, "refinement beats the same-epochs control"))
    if ATTENTION_ROW in by.index:
        checks.append(
            beats(paired, ATTENTION_ROW, INHERIT_ROW, "the attention-MIL image term beats the cells alone")
        )
    if "test_f1_tuned" in by and pd.notna(by.loc[final, "test_f1_tuned"]):
        tuned, at_05 = by.loc[final, "test_f1_tuned"], by.loc[final, "test_f1_at_05"]
        checks.append(
            (
                "tuned thresholds beat 0.5 on test image macro-F1",
                bool(tuned > at_05),
                f"{tuned:.3f} vs {at_05:.3f} (out of fold, cross-fitted: {by.loc[final, 'f1_tuned']:.3f} vs "
                f"{by.loc[final, 'f1_at_05']:.3f})",
            )
        )
    return checks


def paired_markdown(paired: pd.DataFrame) -> str:
    """The paired differences as a table (empty without any)."""
    if paired.empty:
        return ""
    lines = [
        f"| {p.variant} | {p.reference} | {p.difference:+.4f} | [{p.low:+.4f}, {p.high:+.4f}] | "
        f"{per_seed_text(p.per_seed)} | {'yes' if p.low > 0 or p.high < 0 else 'no'} |"
        for p in paired.itertuples(index=False)
    ]
    return (
        "## Paired differences (test split)\n\n"
        "Each row against the row it is judged by, on the same test images: the difference of test mAP (mean "
        "over seeds), its 95% interval over bootstrap resamples of the test images with both rows scored on "
        "each resample (seeds averaged within a resample), and each seed's difference. A row earns its keep "
        "only where the interval excludes 0.\n\n"
        "| row | against | difference | paired 95% interval | per seed | excludes 0 |\n|---|---|---|---|---|---|\n"
        + "\n".join(lines)
        + "\n\n"
    )


COLUMNS = {
    "variant": "variant",
    "f1_at_05": "image F1 @0.5",
    "f1_tuned": "image F1 tuned*",
    "image_map": "image mAP",
    "cell_map": "cell mAP (OOF)",
    "test_f1_at_05": "test image F1 @0.5",
    "test_f1_tuned": "test image F1 tuned",
    "test_cell_map": "test mAP (competition)",
    "test_ci": "test 95% CI",
    "train_seconds": "train s",
    "infer_seconds": "infer s",
}


def mean_sd_text(summary_row: pd.Series, column: str) -> str:
    """A summary line's ``column`` as the leaderboard shows it: ``mean ± sd`` (the mean alone with one seed)."""
    value = summary_row.get(column)
    if value is None or pd.isna(value):
        return "-"
    if column.endswith("seconds"):
        return f"{value:.0f}"
    if column == "test_ci":
        return f"±{value:.3f}"
    sd = summary_row.get(f"{column}_sd")
    return f"{value:.3f}" if sd is None or pd.isna(sd) else f"{value:.3f} ± {sd:.3f}"


def per_class_markdown(classes: pd.DataFrame, names: tuple[str, ...]) -> str:
    """``ablate.per_class`` as a table, the largest gaps named under it ('' without per-class scores)."""
    if classes.empty:
        return ""
    rows_shown = [c for c in classes.columns if c not in ("n_gt", "gap")]
    shown = [*rows_shown, *(["gap"] if "gap" in classes else [])]
    header = "| class | true cells | " + " | ".join(shown) + " |\n|" + "---|" * (len(shown) + 2) + "\n"
    lines = [
        f"| {k} {names[k] if k < len(names) else ''} | {int(line['n_gt'])} | "
        + " | ".join(
            "-" if pd.isna(line[c]) else f"{line[c]:+.3f}" if c == "gap" else f"{line[c]:.3f}" for c in shown
        )
        + " |"
        for k, line in classes.iterrows()
    ]
    text = (
        "## Per class (test AP, mean over seeds)\n\nEach class's AP on the test split under the reading above; "
        "`gap` = oracle minus the final refinement round: where the weak model loses.\n\n"
        + header
        + "\n".join(lines)
    )
    if "gap" in classes:
        gap = classes["gap"].dropna()
        top = gap.sort_values(ascending=False).head(5)
        share = top.sum() / gap.sum() if gap.sum() > 0 else float("nan")
        text += (
            f"\n\nThe five largest gaps ({', '.join(names[k] if k < len(names) else str(k) for k in top.index)}) "
            f"hold {share:.0%} of the summed gap over {len(gap)} classes."
        )
    return text + "\n\n"


def markdown(
    summary: pd.DataFrame,
    paired: pd.DataFrame,
    cfg: Config,
    checks,
    seconds: float,
    classes: pd.DataFrame | None = None,
) -> str:
    shown = [c for c in COLUMNS if c in summary]
    header = "| " + " | ".join(COLUMNS[c] for c in shown) + " |\n|" + "---|" * len(shown) + "\n"
    lines = [
        "| " + " | ".join(row["variant"] if c == "variant" else mean_sd_text(row, c) for c in shown) + " |"
        for _, row in summary.iterrows()
    ]
    target_lines = [
        f"- {'met' if met else 'NOT met' if met is not None else 'not judged'}: {what}: {numbers}"
        for what, met, numbers in checks
    ]
    reading = (
        "the organisers' reading: a class is judged only in images with a true cell of it"
        if cfg.evaluate.verified == "image"
        else "every class judged in every image"
    )
    seeds = cfg.ablate.seeds or [cfg.seed]
    n_test = cfg.synthetic.n_test if cfg.data.dataset == "synthetic" else "the"
    spread = "mean ± sd over the seeds" if len(seeds) > 1 else "one seed"
    return (
        f"# Leaderboard: {cfg.name} on {cfg.data.dataset} (`make ablate`)\n\n"
        f"Same folds ({describe_folds(cfg.folds_file)}) and data for every row; training seeds "
        f"{', '.join(map(str, seeds))} ({spread}); {cfg.model.backbone}, crops {cfg.cache.crop_size} px, "
        f"{cfg.train.epochs} epochs + {cfg.refine.epochs} per refinement round (pseudo-labels from nested inner "
        f"models: no fold's labels reach its own model); the oracle trains "
        f"{cfg.train.epochs + cfg.ablate.rounds * cfg.refine.epochs} epochs on the true cell labels.\n\n"
        + header
        + "\n".join(lines)
        + "\n\n*tuned thresholds scored cross-fitted: tuned on the other folds' OOF images, applied to each "
        "fold's own. OOF columns are out-of-fold on the training split (cell mAP: the competition metric of "
        f"the row's cell score on the cache's cells against the synthetic per-cell truth); the test columns score each row's submission for {n_test} held-out test images: "
        f"the 2021 competition metric (mAP@IoU 0.6, {reading}), its 95% interval over bootstrap resamples of "
        f"the test images ({cfg.ablate.bootstrap} resamples, half-width, mean over seeds), and the "
        "`image_level.csv` macro-F1 at 0.5 and at the thresholds tuned on all OOF images (rows whose image "
        "score is the MIL head's). Rows that differ only in the confidence formula share one inference, "
        "rescored. TTA and fold rows differ from the full weak row only on the test split. Train seconds: "
        "the run's folds up to that round, inner models included (as measured when they were trained).\n\n"
        + paired_markdown(paired)
        + per_class_markdown(
            classes if classes is not None else pd.DataFrame(), get_dataset(cfg.data.dataset).classes
        )
        + "## Targets (test split)\n\n"
        + "\n".join(target_lines)
        + f"\n\nGrid wall time this call: {seconds / 60:.1f} min (finished runs are reused).\n"
    )


def plot(summary: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = summary["variant"].tolist()[::-1]
    y = np.arange(len(labels))
    figure, axis = plt.subplots(figsize=(9, 0.45 * len(labels) + 1.5))
    for offset, column, name in ((0.2, "cell_map", "cell mAP (OOF)"), (-0.2, "test_cell_map", "test mAP")):
        if column in summary:
            sd = summary.get(f"{column}_sd")
            error = None if sd is None or sd.isna().all() else sd.fillna(0).to_numpy()[::-1]
            axis.barh(y + offset, summary[column].to_numpy()[::-1], height=0.38, xerr=error, label=name)
    oracle = summary[summary["variant"] == ORACLE_ROW]
    if len(oracle) and "test_cell_map" in summary:
        axis.axvline(
            ORACLE_SHARE * oracle["test_cell_map"].iloc[0],
            color="k",
            linestyle=":",
            label=f"{ORACLE_SHARE:.2f} x oracle (test)",
        )
    axis.set_yticks(y, labels)
    axis.set_xlabel("mAP (error bars: sd over seeds)")
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, frameon=False)  # off the bars
    axis.set_title("weakcell ablations")
    figure.tight_layout()
    atomic_savefig(path, figure, dpi=110)
    plt.close(figure)
