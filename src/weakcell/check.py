"""``weakcell check [CONFIG]`` (``make check``): what a long stage would stumble on, found in seconds.

Parts, each a function ``Config -> list[Finding]`` in ``PARTS``:

* ``data``: the dataset folder, its label file, which labelled IDs lack channel files (against
  ``checks.max_missing_share``), every channel file's size and bit depth from its header
  (``weakcell.data.layout``: headers only, no pixel is decoded), IDs in two splits, and the sample
  submission's IDs and sizes against the test images;
* ``sources``: each ``data.sources`` folder's training split as ``data`` checks the competition's, and
  image IDs unique over the sources;
* ``segmentation``: the backend's names, and that it can start;
* ``weights``: every weights file the config needs (the backbone's initial weights, Cellpose-SAM, SAM),
  all missing ones named at once with where to get them;
* ``kaggle``: that the config, the trained run, its weights dataset and the generated kernel agree
  (``weakcell.kagglekit.agreement``), where they exist.

Every finding is printed; the stage fails (exit 2) with one line when any is a problem.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from weakcell.config import Config
from weakcell.data.datasets import DatasetSpec, get_dataset
from weakcell.data.labels import LabelError, read_label_file
from weakcell.data.layout import HeaderSurvey, channel_files, without_files
from weakcell.errors import StageError, UnknownName


@dataclass(frozen=True)
class Finding:
    """One line of the report: what was checked and whether it stops the pipeline."""

    part: str
    text: str
    problem: bool = False


def _examples(ids: list[str], n: int = 3) -> str:
    return ", ".join(ids[:n]) + (", ..." if len(ids) > n else "")


# -- data -----------------------------------------------------------------------------------------------


def _train_findings(
    cfg: Config, spec: DatasetSpec, survey: HeaderSurvey, fetch: str = "make download"
) -> tuple[list[Finding], set[str]]:
    """The label file, which labelled images have their files, their headers (``fetch``: the step that
    writes missing files). Returns the findings and the labelled IDs."""
    label_path = cfg.data_dir / spec.label_file
    try:
        labels = read_label_file(label_path, spec)
    except LabelError as err:
        return [Finding("data", str(err).splitlines()[0], True)], set()
    folder = cfg.data_dir / spec.train_dir
    files = channel_files(folder)
    ids = labels["ID"].astype(str).tolist()
    missing = without_files(ids, files)
    share = len(missing) / max(1, len(ids))
    limit = cfg.checks.max_missing_share
    findings = []
    if missing:
        text = (
            f"{len(missing)} of {len(ids)} labelled IDs in {label_path.name} lack channel files in {folder} "
            f"({share:.1%}; checks.max_missing_share={limit:g}), e.g. {_examples(missing)}"
        )
        fix = f"; download them ({fetch}), or keep only the rows of the images you have"
        findings.append(Finding("data", text + (fix if share > limit else ""), share > limit))
    unlabelled = sorted(set(files) - set(ids))
    if unlabelled:
        findings.append(
            Finding("data", f"{len(unlabelled)} image(s) in {folder} are not in {label_path.name}")
        )
    absent = set(missing)
    present = [i for i in ids if i not in absent]
    for image_id in tqdm(present, desc="check train headers", unit="img", leave=False, disable=None):
        survey.add(image_id, files[image_id])
    findings.append(
        Finding("data", f"train: {len(present)} of {len(ids)} labelled images present ({survey.describe()})")
    )
    return findings, set(ids)


def _test_findings(cfg: Config, spec: DatasetSpec, labelled: set[str]) -> list[Finding]:
    """The sample submission against the test images: every ID present, sizes as the headers say."""
    sample_path = cfg.data_dir / spec.sample_submission
    if not sample_path.is_file():
        return [Finding("data", f"no {sample_path}: `make infer` predicts the test split from it", True)]
    sample = pd.read_csv(sample_path, dtype={spec.id_column: str}, keep_default_na=False)
    if spec.id_column not in sample.columns:
        return [
            Finding(
                "data", f"{sample_path} has no {spec.id_column} column (columns {list(sample.columns)})", True
            )
        ]
    folder = cfg.data_dir / spec.test_dir
    files = channel_files(folder)
    ids = sample[spec.id_column].tolist()
    findings = []
    twice = sorted(set(ids) & labelled)
    if twice:
        findings.append(
            Finding(
                "data",
                f"{len(twice)} test ID(s) are also labelled training images, e.g. {_examples(twice)}; "
                "an ID must name one image (give the test copy another ID)",
                True,
            )
        )
    missing = set(without_files(ids, files))
    if missing:
        findings.append(
            Finding(
                "data",
                f"{len(missing)} of {len(ids)} IDs of {sample_path.name} lack channel files in {folder}, "
                f"e.g. {_examples(sorted(missing))}",
                True,
            )
        )
    survey = HeaderSurvey()
    wrong_size = []
    sized = {"ImageWidth", "ImageHeight"} <= set(sample.columns)
    for row in tqdm(
        sample.itertuples(index=False),
        total=len(sample),
        desc="check test headers",
        unit="img",
        leave=False,
        disable=None,
    ):
        image_id = getattr(row, spec.id_column)
        if image_id in missing:
            continue
        header = survey.add(image_id, files[image_id])
        if sized and header and (header.width, header.height) != (int(row.ImageWidth), int(row.ImageHeight)):
            wrong_size.append(
                f"{image_id}: {sample_path.name} says {row.ImageWidth}x{row.ImageHeight}, {header.path.name} is "
                f"{header.width}x{header.height}"
            )
    if wrong_size:
        findings.append(
            Finding(
                "data",
                f"{len(wrong_size)} test image(s) differ in size from {sample_path.name}: {wrong_size[0]}"
                "; the submission encodes masks at the sample's sizes",
                True,
            )
        )
    findings += [Finding("data", text, True) for text in survey.problems[:3]]
    findings.append(
        Finding(
            "data",
            f"test: {len(ids) - len(missing)} of {len(ids)} sample-submission images present ({survey.describe()})",
        )
    )
    return findings


def check_data(cfg: Config) -> list[Finding]:
    """The dataset layout of ``data.dir``: label file, channel files, headers, sample submission."""
    spec = get_dataset(cfg.data.dataset)
    if not cfg.data_dir.is_dir():
        step = (
            "make data"
            if spec.has_truth
            else "make download, or set data.dir to the unzipped competition files"
        )
        return [Finding("data", f"no dataset folder {cfg.data_dir} ({cfg.data.dataset}): {step}", True)]
    started = time.perf_counter()
    survey = HeaderSurvey()
    findings: list[Finding] = []
    labelled: set[str] = set()
    if "train" in cfg.cache.splits:
        found, labelled = _train_findings(cfg, spec, survey)
        findings += found + [Finding("data", text, True) for text in survey.problems[:3]]
        if len(survey.problems) > 3:
            findings.append(
                Finding("data", f"... and {len(survey.problems) - 3} more files with problems", True)
            )
    if "test" in cfg.cache.splits:
        findings += _test_findings(cfg, spec, labelled)
    findings.append(
        Finding("data", f"headers read in {time.perf_counter() - started:.1f} s (no pixel decoded)")
    )
    return findings


def check_sources(cfg: Config) -> list[Finding]:
    """Each ``data.sources`` folder as ``data`` checks the competition's training split (its train/ folder,
    label file, missing files against ``checks.max_missing_share``, headers), then that image IDs are unique
    over the sources."""
    from weakcell.sources import data_sources, fetch_step, require_layout, source_config, source_labels

    spec = get_dataset(cfg.data.dataset)
    external = [source for source in data_sources(cfg) if not source.is_competition]
    if not external:
        return [Finding("sources", "no data.sources: the competition's images alone")]
    findings = []
    for source in external:
        try:
            require_layout(source, spec)
        except StageError as err:
            findings.append(Finding("sources", str(err), True))
            continue
        survey = HeaderSurvey()
        found, _ = _train_findings(source_config(cfg, source), spec, survey, fetch=fetch_step(source))
        found += [Finding("sources", text, True) for text in survey.problems[:3]]
        findings += [Finding("sources", f"{source.name}: {f.text}", f.problem) for f in found]
    if not any(f.problem for f in findings):
        try:
            source_labels(cfg, spec)
        except (StageError, LabelError) as err:
            findings.append(Finding("sources", str(err).splitlines()[0], True))
    return findings


# -- segmentation and weights ---------------------------------------------------------------------------


def check_segmentation(cfg: Config) -> list[Finding]:
    """The backend's names (the weights it reads are the ``weights`` part's)."""
    from weakcell.segment import parse_backend

    try:
        parse_backend(cfg.segment.backend)
    except UnknownName as err:
        return [Finding("segmentation", f"segment.backend={cfg.segment.backend!r}: {err}", True)]
    return [Finding("segmentation", f"segment.backend={cfg.segment.backend} is registered")]


def _where_to_get(item: str, cfg: Config) -> str:
    from weakcell.pretrained import OFFICIAL

    if item == "backbone":
        return (
            f"`make weights` (weights.fetch includes backbone) writes {cfg.weights_dir}/{cfg.model.backbone}"
            f".safetensors; offline, place its ImageNet checkpoint at {cfg.weights_dir}/{cfg.model.backbone}.pth "
            "and run `make weights`"
        )
    keys = [item]
    if item == "hpacellseg":  # two files: the nuclei U-Net and the configured cell one
        from weakcell.segment.hpacellseg.backend import model_files

        keys = [f"hpacellseg:{stem}" for stem in model_files(cfg.segment.hpacellseg)]
    files = " and ".join(f"{OFFICIAL[key].file} from {OFFICIAL[key].url}" for key in keys)
    return (
        f"`make weights` with {item} in weights.fetch (or place the official {files} in {cfg.weights_dir}/ "
        f"and run `make weights`); on Kaggle attach kaggle.{item}_dataset"
    )


def check_weights(cfg: Config) -> list[Finding]:
    """Every weights file the config needs, all missing ones at once, each with where to get it."""
    from weakcell.models.backbone import resolve_weights_file
    from weakcell.segment import backend_weights

    rooted = cfg.rooted_weights()
    needed: dict[str, tuple[Path, ...] | Exception] = {}
    if rooted.model.pretrained_file is not None:
        try:
            needed["backbone"] = (resolve_weights_file(rooted.model.pretrained_file, cfg.model.backbone),)
        except FileNotFoundError as err:
            needed["backbone"] = err
    try:
        needed.update(backend_weights(rooted.segment))
    except UnknownName:
        pass  # the segmentation part reports it
    if not needed:
        return [Finding("weights", "no weights file needed (random init, classical segmentation)")]
    findings = []
    for item, found in needed.items():
        if isinstance(found, Exception):
            first = str(found).split(". ")[0]
            findings.append(Finding("weights", f"{item}: {first}; get it: {_where_to_get(item, cfg)}", True))
        else:
            findings.append(Finding("weights", f"{item}: {', '.join(map(str, found))}"))
    return findings


# -- kaggle ---------------------------------------------------------------------------------------------


def check_kaggle(cfg: Config) -> list[Finding]:
    """The config, the run, the weights dataset and the kernel, where they exist, describe one model."""
    from weakcell.kagglekit.agreement import agreement_problems, sides_of

    found = {name: side for name, side in sides_of(cfg).items() if side is not None}
    problems = agreement_problems(cfg)
    if not found:
        return [Finding("kaggle", f"no trained run {cfg.name!r}, weights dataset or kernel yet")]
    where = ", ".join(f"{name} {side[0]}" for name, side in found.items())
    if not problems:
        return [Finding("kaggle", f"the config and {where} agree (round {cfg.refine.rounds})")]
    return [Finding("kaggle", problem, True) for problem in problems]


PARTS: dict[str, Callable[[Config], list[Finding]]] = {
    "data": check_data,
    "sources": check_sources,
    "segmentation": check_segmentation,
    "weights": check_weights,
    "kaggle": check_kaggle,
}


def run(cfg: Config) -> list[Finding]:
    """Run every part, print each finding, and fail with one line when any is a problem."""
    findings = []
    for part, check in PARTS.items():
        for finding in check(cfg):
            print(f"  {'PROBLEM' if finding.problem else 'ok':<7} {part:<12} {finding.text}")
            findings.append(finding)
    problems = [f for f in findings if f.problem]
    if problems:
        more = f" (and {len(problems) - 1} more above)" if len(problems) > 1 else ""
        raise StageError(f"check: {problems[0].text}{more}")
    print(f"check: {len(findings)} checks passed for {cfg.name} ({cfg.data.dataset} in {cfg.data_dir})")
    return findings
