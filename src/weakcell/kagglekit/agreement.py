"""Whether the config, the trained run, its Kaggle weights dataset and the generated inference kernel
describe the same models: the refinement round packed, the folds, the backbone, the crop size, the
class table and the whole-image model (network and how it joins, "none" when the submission does not use
it). A kernel generated for round 1 beside a dataset that holds round 0 passes every local check
and dies on Kaggle after caching the whole test set; ``make weights-dataset``, ``make kernels``,
``make submit`` and ``weakcell check`` compare the four first and name both sides of a difference.

Each side is a ``Summary`` (the same fields everywhere): the config's is what it asks for, the run's is
read from ``runs/<name>/`` (its saved config and the fold weights of the round), the dataset's from the
``packed.json`` that ``make weights-dataset`` writes beside the weights, the kernel's from the ``EXPECT``
line of its script (which the kernel itself also compares with ``packed.json`` before any work).
"""

from __future__ import annotations

import ast
import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from weakcell.combine import JOINING, uses_image_model
from weakcell.config import Config, ConfigError, load_config
from weakcell.data.datasets import get_dataset
from weakcell.errors import StageError
from weakcell.kagglekit.naming import datasets_root, weights_slug

PACKED_FILE = "packed.json"  # beside the run's config.yaml in the weights dataset
EXPECT_NAME = "EXPECT"  # the kernel script's settings line holding its Summary (JSON)
FOLD_WEIGHTS = ("cell/model.pt", "mil/model.pt")  # what inference reads from a fold


@dataclass(frozen=True)
class Summary:
    """What one side says about the models a kernel predicts with. ``folds`` None = not known here;
    ``image_model`` "none" where a packed.json or EXPECT line predates the whole-image model (none was
    packed then)."""

    run: str
    round: int
    folds: list[int] | None
    backbone: str
    crop_size: int
    classes: list[str]
    image_model: str = "none"

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def image_model_of(cfg: Config) -> str:
    """The whole-image model a submission made with ``cfg`` predicts with, in words: its network and how it
    joins the cell model; "none" when the submission does not use it (``weakcell.combine``)."""
    if not uses_image_model(cfg):
        return "none"
    joins = ", ".join(f"infer.{key}={getattr(cfg.infer, key)}" for key in JOINING)
    return f"{cfg.image_model.backbone} at {cfg.image_model.size} px, {joins}"


def summary_of(cfg: Config, folds: list[int] | None) -> Summary:
    """The models ``cfg`` builds and reads: its run, final round, network, class table and image model."""
    return Summary(
        run=cfg.name,
        round=cfg.refine.rounds,
        folds=folds,
        backbone=cfg.model.backbone,
        crop_size=cfg.cache.crop_size,
        classes=list(get_dataset(cfg.data.dataset).classes),
        image_model=image_model_of(cfg),
    )


def trained_folds(round_dir: Path) -> list[int]:
    """Indices of the folds of ``round_dir`` that hold both weight files inference reads."""
    return sorted(
        int(fold.name.removeprefix("fold"))
        for fold in round_dir.glob("fold*")
        if fold.name.removeprefix("fold").isdigit() and all((fold / name).is_file() for name in FOLD_WEIGHTS)
    )


def config_side(cfg: Config) -> tuple[str, Summary]:
    return "the config", summary_of(cfg, None)


def run_side(cfg: Config) -> tuple[str, Summary] | None:
    """The trained run: its saved config's network and classes, the folds trained in the round the config
    asks for; None when ``runs/<name>/config.yaml`` is absent."""
    saved = cfg.run_dir / "config.yaml"
    if not saved.is_file():
        return None
    try:
        trained = load_config(saved)
    except ConfigError as err:
        raise StageError(f"{saved} does not load ({err}); retrain the run or delete it") from err
    summary = summary_of(trained, trained_folds(cfg.model_dir))
    # the round is the one the config reads: a run without its folds shows folds []; so is the image model,
    # often enabled after training (a missing one is missing_image_model's)
    chosen = {"round": cfg.refine.rounds, "run": cfg.name, "image_model": image_model_of(cfg)}
    summary = Summary(**{**summary.as_json(), **chosen})
    return str(cfg.run_dir), summary


def dataset_run_dir(cfg: Config) -> Path:
    """``dist/kaggle/<weights slug>/<run>/``: where the weights dataset keeps the run's files."""
    return datasets_root(cfg) / weights_slug(cfg) / cfg.name


def dataset_side(cfg: Config) -> tuple[str, Summary] | None:
    """The weights dataset's ``packed.json``; None when no dataset was built for this run."""
    folder = dataset_run_dir(cfg)
    packed = folder / PACKED_FILE
    if not folder.is_dir():
        return None
    if not packed.is_file():
        raise StageError(
            f"{folder} has no {PACKED_FILE} (built by an older weakcell): rebuild it with `make weights-dataset`"
        )
    return str(folder.parent), Summary(**json.loads(packed.read_text()))


def kernel_file(cfg: Config, variant: str) -> Path | None:
    """The script of ``kernels/<variant>/`` (named by its kernel-metadata.json), None when not generated."""
    metadata = cfg.path(cfg.paths.kernels) / variant / "kernel-metadata.json"
    if not metadata.is_file():
        return None
    return metadata.parent / json.loads(metadata.read_text())["code_file"]


def kernel_side(cfg: Config, variant: str) -> tuple[str, Summary] | None:
    """The ``EXPECT = {...}`` line of a generated inference kernel; None when there is no kernel or it
    trains its own models (nothing to agree with)."""
    script = kernel_file(cfg, variant)
    if script is None or not script.is_file():
        return None
    for line in script.read_text().splitlines():
        name, _, value = line.partition(" = ")
        if name == EXPECT_NAME:
            literal = ast.literal_eval(value.split("  #", 1)[0].strip())
            return None if literal is None else (str(script.parent), Summary(**literal))
    raise StageError(
        f"{script} has no {EXPECT_NAME} line (generated by an older weakcell): run `make kernels`"
    )


def disagreements(sides: list[tuple[str, Summary]]) -> list[str]:
    """``field: A says x, B holds y`` for each field on which two neighbouring sides differ (a field a side
    does not know, folds None, is not compared)."""
    found = []
    for (left_name, left), (right_name, right) in itertools.pairwise(sides):
        for field, left_value in left.as_json().items():
            right_value = getattr(right, field)
            if left_value is None or right_value is None or left_value == right_value:
                continue
            if field == "classes":
                left_value, right_value = f"{len(left_value)} classes", f"{len(right_value)} classes"
                if left_value == right_value:
                    left_value, right_value = "one class table", "another"
            found.append(f"{field}: {left_name} says {left_value}, {right_name} {right_value}")
    return found


def missing_round(cfg: Config, run: tuple[str, Summary] | None) -> str | None:
    """A problem when the run exists but the round the config reads has no trained folds."""
    if run is None or run[1].folds:
        return None
    step = "make refine" if cfg.refine.rounds else "make train"
    return (
        f"{cfg.model_dir} holds no trained folds, but the config reads round {cfg.refine.rounds} "
        f"(refine.rounds={cfg.refine.rounds}): run `{step}`, or set refine.rounds to the round you trained"
    )


def missing_image_model(cfg: Config, run: tuple[str, Summary] | None) -> str | None:
    """A problem when the run exists and the config uses the whole-image model, but the run holds no trained
    one, or one trained as another network (``weakcell.image_model.trained_folds``' line)."""
    if run is None or not uses_image_model(cfg):
        return None
    from weakcell.image_model import trained_folds  # torch: only for a config that uses the image model

    try:
        trained_folds(cfg)
    except (OSError, StageError) as err:
        return str(err)
    return None


SIDES = ("run", "dataset", "kernel")
FIXES = {
    "run": "`make train` (and `make refine`)",
    "dataset": "`make weights-dataset`",
    "kernel": "`make kernels`",
}


def sides_of(cfg: Config, compare: tuple[str, ...] = SIDES) -> dict[str, tuple[str, Summary] | None]:
    """Each side of ``compare`` (run, dataset, kernel) as found on disk, None where absent."""
    readers = {
        "run": lambda: run_side(cfg),
        "dataset": lambda: dataset_side(cfg),
        "kernel": lambda: kernel_side(cfg, cfg.kaggle.submit_variant),
    }
    return {name: readers[name]() for name in compare}


def agreement_problems(
    cfg: Config, compare: tuple[str, ...] = SIDES, need: tuple[str, ...] = ()
) -> list[str]:
    """Every reason the config and the sides of ``compare`` that exist do not describe the same models,
    and every side of ``need`` that is absent (with the command that builds it)."""
    found = sides_of(cfg, compare)
    problems = [
        f"no {name} of run {cfg.name!r} yet: {FIXES[name]}" for name in need if found.get(name) is None
    ]
    for missing in (missing_round(cfg, found.get("run")), missing_image_model(cfg, found.get("run"))):
        if missing:
            problems.append(missing)
    sides = [config_side(cfg), *(side for side in found.values() if side is not None)]
    return problems + disagreements(sides)


def require_agreement(
    cfg: Config, stage: str, compare: tuple[str, ...] = SIDES, need: tuple[str, ...] = ()
) -> None:
    """``agreement_problems`` as one ``StageError`` line (the first problem, naming both sides)."""
    problems = agreement_problems(cfg, compare, need)
    if problems:
        more = f" (and {len(problems) - 1} more: `weakcell check` lists them)" if len(problems) > 1 else ""
        raise StageError(
            f"{stage}: {problems[0]}{more}; build the run, weights dataset and kernels from one config "
            "(`make weights-dataset kernels CONFIG=<your config>`)"
        )


def packed_json(cfg: Config) -> str:
    """``packed.json`` of the weights dataset: the run's own summary (what its weights are)."""
    side = run_side(cfg)
    if side is None:
        raise StageError(
            f"no run {cfg.name!r}: {cfg.run_dir / 'config.yaml'} is missing; train it or set RUN="
        )
    return json.dumps(side[1].as_json(), indent=2)


def expect_literal(cfg: Config) -> str:
    """The kernel's ``EXPECT`` value as a Python literal: the config's summary, with the run's folds when
    the run is here (read back with ``ast.literal_eval``, which evaluates nothing but literals)."""
    run = run_side(cfg)
    folds = run[1].folds if run is not None and run[1].folds else None
    return repr(summary_of(cfg, folds).as_json())
