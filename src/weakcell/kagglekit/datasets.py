"""The Kaggle datasets an offline kernel attaches, each a folder with its ``dataset-metadata.json``:

* ``make wheels`` -> ``dist/kaggle/<wheels slug>/``: the weakcell wheel, built from this checkout, and the
  wheels of ``kaggle.wheels`` (what the Kaggle image lacks) at the versions installed here, for every
  Python of ``kaggle.python_version`` on ``kaggle.platforms`` (checked: each package has a wheel each
  target installs), so a kernel runs ``pip install --no-index --find-links /kaggle/input/<wheels slug>
  weakcell``.
* ``make weights-dataset RUN=<run>`` -> ``dist/kaggle/<weights slug>/<run>/``: the weights inference loads
  (``fold<k>/{cell,mil}/model.pt`` of the final round, flat state dicts), the thresholds file of
  ``infer.image_level`` (``thresholds.json`` by default), the resolved ``config.yaml`` (local weight files
  nulled, see ``portable_config``) and ``run.json``, at their paths relative to ``runs/`` so that
  ``paths.runs`` pointed at the mounted dataset reproduces ``cfg.model_dir``; and, when the submission uses
  the whole-image model, ``image_model/`` (``image_model_files``). Resumable checkpoints (``last.pt``, with
  optimizer state) stay behind.
* ``make backbone-dataset`` -> ``dist/kaggle/<backbone slug>/``: ``model.pretrained_file``, the backbone's
  initial weights, which the train kernel reads from the attached dataset.

Upload either folder with ``kaggle datasets create -p <folder>`` (``--dir-mode zip`` for the weights, whose
files sit in sub-folders; Kaggle unpacks the archive), or ``kaggle datasets version`` for a new version.

About 510 lines: the three datasets share the staging, metadata and swap-in helpers above their
builders; the wheel-tag checks are the only part that could stand alone, and they serve ``wheels`` alone.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import parse_wheel_filename

from weakcell.combine import JOINING, thresholds_file, uses_image_model
from weakcell.config import Config
from weakcell.errors import StageError
from weakcell.kagglekit.naming import (
    backbone_id,
    backbone_slug,
    dataset_id,
    datasets_root,
    slug_of,
    title_of,
    weights_slug,
    wheels_slug,
)
from weakcell.outputs import atomic_write_json, atomic_write_text, folder_lock

METADATA_FILE = "dataset-metadata.json"
# What inference reads from a fold (weakcell.infer.predict_fold); nothing else of a run is a weight file.
FOLD_WEIGHTS = ("cell/model.pt", "mil/model.pt")
RUN_FILES = ("config.yaml", "run.json")  # the resolved config (kernels read it) and seed / commit


def normalize(name: str) -> str:
    """PEP 503 name: ``Fill_Voids`` and ``fill-voids`` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name(filename: str) -> str:
    """Normalized distribution name of a ``.whl`` file (the part before the first dash)."""
    return normalize(filename.split("-", 1)[0])


def dataset_metadata(cfg: Config, slug: str, description: str) -> dict[str, Any]:
    """``dataset-metadata.json`` of a dataset owned by the resolved owner (Kaggle creates it private unless
    ``kaggle datasets create --public``)."""
    title = title_of(slug)
    if not 6 <= len(title) <= 50:
        raise StageError(
            f"Kaggle dataset titles hold 6-50 characters; {title!r} (from slug {slug!r}) does not: "
            "set kaggle.wheels_dataset / kaggle.weights_dataset"
        )
    return {
        "title": title,
        "id": dataset_id(cfg, slug),
        "licenses": [{"name": "other"}],
        "description": description,
    }


def _write_json(path: Path, content: dict[str, Any]) -> None:
    atomic_write_json(path, content)


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def _swap_in(staging: Path, target: Path) -> None:
    """Replace ``target`` by the finished ``staging`` folder: a failed build leaves the old one intact."""
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)


# -------------------------------------------------------------------------------------------- wheels


def source_tree() -> Path:
    """The checkout this weakcell runs from (src layout); the wheel is built from it."""
    import weakcell

    root = Path(weakcell.__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or 'name = "weakcell"' not in pyproject.read_text():
        raise FileNotFoundError(
            f"weakcell is imported from {Path(weakcell.__file__).parent}, not from a source checkout "
            f"(no weakcell pyproject.toml at {root}): run `make wheels` in a clone of the repository"
        )
    return root


def pinned(packages: list[str]) -> list[str]:
    """``name==version`` of each package as installed here: the kernel then runs what the tests ran."""
    requirements = []
    for package in packages:
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            raise StageError(
                f"{package} (in kaggle.wheels) is not installed here, so its version is unknown: "
                "`make install`, or remove it from kaggle.wheels"
            ) from None
        requirements.append(f"{package}=={version}")
    return requirements


def _pip(args: list[str], what: str) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if result.returncode:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise OSError(f"{what} failed (pip exit code {result.returncode}):\n{tail}")


def build_weakcell_wheel(out: Path) -> None:
    """``pip wheel --no-deps`` of a clean copy of the sources: no stale ``build/`` of the checkout leaks in,
    and two builds at once do not share a folder."""
    root = source_tree()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    with tempfile.TemporaryDirectory(prefix="weakcell-wheel-") as tmp:
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(root / name, Path(tmp) / name)
        shutil.copytree(root / "src", Path(tmp) / "src", ignore=ignore)
        args = ["wheel", "--no-deps", "--quiet", "--disable-pip-version-check", "-w", str(out), tmp]
        if importlib.util.find_spec("setuptools") and importlib.util.find_spec("wheel"):
            args.insert(1, "--no-build-isolation")  # the build backend is here already: no download
        _pip(args, "building the weakcell wheel")


def platform_tags(platforms: list[str]) -> list[str]:
    """Every platform tag a system of ``platforms`` runs, best first: ``manylinux_2_N_<arch>`` stands for
    each glibc 2.N down to 2.5 (PEP 600) and their legacy names (manylinux2014 = 2.17, manylinux2010 =
    2.12, manylinux1 = 2.5), as pip does for the machine it runs on (``pip download --platform`` does not)."""
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    tags: list[str] = []
    for platform in platforms:
        match = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", platform)
        if not match:
            tags.append(platform)
            continue
        glibc, arch = int(match.group(1)), match.group(2)
        for minor in range(glibc, 4, -1):
            tags.append(f"manylinux_2_{minor}_{arch}")
            if minor in legacy:
                tags.append(f"{legacy[minor]}_{arch}")
    return list(dict.fromkeys(tags))


def fetch_wheels(requirements: list[str], out: Path, python_version: str, platforms: list[str]) -> None:
    """Binary wheels of ``requirements`` for CPython ``python_version`` on ``platforms`` from the index (or
    pip's cache): one wheel per package, compiled ones tagged for that interpreter, pure ones as they are.
    A package without such a wheel fails with pip's message (a wheel for another interpreter cannot be
    built here)."""
    target = ["--python-version", python_version, "--implementation", "cp"]
    for tag in platform_tags(platforms):
        target += ["--platform", tag]
    download = ["download", "--no-deps", "--only-binary=:all:", "--quiet", "--disable-pip-version-check"]
    _pip(
        [*download, "-d", str(out), *target, *requirements],
        f"downloading wheels for Python {python_version} on {', '.join(platforms)}",
    )


def supported_tags(python_version: str, platforms: list[str]) -> set[Tag]:
    """Every wheel tag CPython ``python_version`` on ``platforms`` installs (``packaging.tags``)."""
    version = tuple(int(part) for part in python_version.split(".")[:2])
    tags = platform_tags(platforms)
    return set(cpython_tags(version, platforms=tags)) | set(compatible_tags(version, platforms=tags))


def unmatched_wheels(folder: Path, python_versions: list[str], platforms: list[str]) -> list[str]:
    """``package: Python x.y`` for each package of ``folder`` that has no wheel installable on one of the
    targets; empty when every target can install every package."""
    by_package: dict[str, set[Tag]] = {}
    for wheel in folder.glob("*.whl"):
        name, _, _, tags = parse_wheel_filename(wheel.name)
        by_package.setdefault(normalize(name), set()).update(tags)
    return [
        f"{package}: Python {version}"
        for package, tags in sorted(by_package.items())
        for version in python_versions
        if not tags & supported_tags(version, platforms)
    ]


def dataset_folders(cfg: Config, slug: str) -> tuple[Path, Path]:
    """The dataset folder ``slug`` and an empty staging folder beside it: a dataset is built in staging and
    replaces the old folder only when complete, so an interrupted build never leaves half a dataset."""
    target = datasets_root(cfg) / slug
    staging = target.with_name(f".{slug}.staging")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return target, staging


@contextmanager
def datasets_lock(cfg: Config, stage: str) -> Iterator[None]:
    """Hold ``dist/kaggle/``'s lock: the dataset stages replace whole folders there (``_swap_in``) and
    clean staging folders, so one of them writes at a time."""
    with folder_lock(datasets_root(cfg), stage, cfg.checks.lock_wait_s):
        yield


def wheels(cfg: Config) -> Path:
    """``make wheels``: the wheels dataset folder. Rebuilt every time (pip's cache makes it quick) into a
    staging folder that replaces the old one only when complete."""
    with datasets_lock(cfg, "wheels"):
        return _wheels(cfg)


def _wheels(cfg: Config) -> Path:
    start = time.perf_counter()
    slug = wheels_slug(cfg)
    target, staging = dataset_folders(cfg, slug)
    build_weakcell_wheel(staging)
    requirements = pinned(cfg.kaggle.wheels)
    versions, platforms = cfg.kaggle.python_version, cfg.kaggle.platforms
    for version in versions:
        fetch_wheels(requirements, staging, version, platforms)
    found = {wheel_name(p.name) for p in staging.glob("*.whl")}
    missing = [r for r in ["weakcell", *requirements] if normalize(r.split("==")[0]) not in found]
    if missing:
        raise OSError(f"pip left no wheel for {', '.join(missing)} in {staging}")
    unmatched = unmatched_wheels(staging, versions, platforms)
    if unmatched:
        raise OSError(f"no wheel installable on {', '.join(platforms)} for {'; '.join(unmatched)}")
    install = f"pip install --no-index --find-links /kaggle/input/{slug} weakcell"
    description = (
        f"Offline install of weakcell and what the Kaggle image lacks: `{install}` "
        f"(`weakcell[segment]` for the Cellpose / SAM backends). Written by `make wheels`."
    )
    _write_json(staging / METADATA_FILE, dataset_metadata(cfg, slug, description))
    _swap_in(staging, target)
    names = sorted(p.name for p in target.glob("*.whl"))
    print(
        f"wheels: {len(names)} wheels for Python {', '.join(versions)} "
        f"({', '.join(n.split('-')[0] for n in names)}), "
        f"{folder_mb(target):.1f} MB, {time.perf_counter() - start:.0f} s -> {target}\n"
        f"  upload: kaggle datasets create -p {target}  (a new version: kaggle datasets version -p {target} -m ...)"
    )
    return target


# ------------------------------------------------------------------------------------------- weights


def weights_manifest(cfg: Config) -> list[tuple[Path, Path]]:
    """(source, path inside the dataset) of every file a kernel needs from run ``cfg.name``: the final
    round's fold weights, the thresholds ``infer.image_level`` reads, the run's config and run.json, the
    whole-image model's files when the submission uses it; paths relative to ``runs/``."""
    runs, run_dir, model_dir = cfg.path(cfg.paths.runs), cfg.run_dir, cfg.model_dir
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(
            f"no run {cfg.name!r}: {run_dir / 'config.yaml'} is missing; train it or set RUN="
        )
    folds = sorted(
        fold for fold in model_dir.glob("fold*") if all((fold / name).is_file() for name in FOLD_WEIGHTS)
    )
    if not folds:
        step = "make refine" if model_dir != run_dir else "make train"
        raise FileNotFoundError(
            f"no trained folds (fold<k>/cell/model.pt + mil/model.pt) in {model_dir}: run `{step}`"
        )
    thresholds = thresholds_file(cfg, model_dir)  # infer.image_level's own (weakcell.combine)
    if not thresholds.is_file():
        raise FileNotFoundError(f"no {thresholds}: run `make thresholds` before packing the weights")
    sources = [run_dir / name for name in RUN_FILES if (run_dir / name).is_file()]
    if model_dir != run_dir and (model_dir / "config.yaml").is_file():
        sources.append(model_dir / "config.yaml")
    sources.append(thresholds)
    sources += [fold / name for fold in folds for name in FOLD_WEIGHTS]
    sources += image_model_files(cfg)
    return [(source, source.relative_to(runs)) for source in sources]


def image_model_files(cfg: Config) -> list[Path]:
    """The whole-image model's files its inference reads, when a submission of ``cfg`` uses it
    (``weakcell.combine.uses_image_model``; none otherwise: the default packs nothing more): each trained
    fold's weights (flat state dicts) and its out-of-fold table, which marks the fold finished for
    ``trained_folds``; the model's ``lineage.json``, against which the kernel checks the network it builds.
    A missing model, or one trained as another network, is ``trained_folds``' one line."""
    if not uses_image_model(cfg):
        return []
    from weakcell.image_model import MODEL_FILE, OOF_FILE, trained_folds  # torch: only when it travels
    from weakcell.lineage import RECORD

    record = cfg.image_model_dir / RECORD
    folds = [fold / name for fold in trained_folds(cfg) for name in (MODEL_FILE, OOF_FILE)]
    return [record, *folds] if record.is_file() else folds


def portable_config(text: str, cfg: Config) -> str:
    """A run's config.yaml for the weights dataset, the config the kernel predicts with: the local files
    training started from (``model.pretrained_file``, ``image_model.pretrained_file``) become null, since the
    trained weights replace them and the files are not on Kaggle; the whole-image model is enabled exactly
    when the dataset packs it, with ``cfg``'s section (the network ``trained_folds`` checked) and the infer
    settings that join it (a run trained before ``image_model.enabled`` was set saved it off); everything
    else is kept, so a kernel builds exactly the networks that were trained."""
    config = yaml.safe_load(text) or {}
    portable = copy.deepcopy(config)
    for section in ("model", "image_model"):
        if isinstance(portable.get(section), dict) and portable[section].get("pretrained_file") is not None:
            portable[section]["pretrained_file"] = None
    uses = uses_image_model(cfg)
    if uses:
        portable["image_model"] = {**cfg.image_model.model_dump(mode="json"), "pretrained_file": None}
    portable.setdefault("image_model", {})["enabled"] = uses
    portable.setdefault("infer", {}).update({key: getattr(cfg.infer, key) for key in JOINING})
    return text if portable == config else yaml.safe_dump(portable, sort_keys=False)


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard link (weights are large and written atomically, so a link is a snapshot), else copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def weights_dataset(cfg: Config) -> Path:
    """``make weights-dataset RUN=<run>``: the run's weights dataset folder, with ``packed.json`` (what it
    holds: round, folds, network, classes) beside the run's config, read while holding the run's lock (no
    stage rewrites its weights meanwhile). Refuses when the run does not hold the round or network the config
    names (``agreement``)."""
    with (
        datasets_lock(cfg, "weights-dataset"),
        folder_lock(cfg.run_dir, "weights-dataset", cfg.checks.lock_wait_s),
    ):
        return _weights_dataset(cfg)


def _weights_dataset(cfg: Config) -> Path:
    from weakcell.kagglekit.agreement import PACKED_FILE, agreement_problems, packed_json, require_agreement

    require_agreement(cfg, "weights-dataset", compare=("run",), need=("run",))
    manifest = weights_manifest(cfg)
    slug = weights_slug(cfg)
    target, staging = dataset_folders(cfg, slug)
    for source, relative in manifest:
        if source.name == "config.yaml":
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(staging / relative, portable_config(source.read_text(), cfg))
        else:
            _link_or_copy(source, staging / relative)
    n_folds = sum(1 for _, relative in manifest if relative.as_posix().endswith(FOLD_WEIGHTS[1]))
    image_dir = cfg.image_model_dir.relative_to(cfg.path(cfg.paths.runs))
    n_image = sum(
        1 for _, relative in manifest if relative.parent.parent == image_dir and relative.suffix == ".pt"
    )
    image_note = f" + the whole-image model's {n_image} folds" if n_image else ""
    thresholds = thresholds_file(cfg, cfg.model_dir).relative_to(cfg.run_dir).as_posix()
    round_note = f", round {cfg.refine.rounds}"
    description = (
        f"Weights of weakcell run {cfg.name!r}{round_note}: {n_folds} folds of cell + MIL model.pt"
        f"{image_note} (weights only), {thresholds} and the resolved config.yaml. Written by "
        "`make weights-dataset`."
    )
    atomic_write_text(staging / cfg.name / PACKED_FILE, packed_json(cfg) + "\n")
    _write_json(staging / METADATA_FILE, dataset_metadata(cfg, slug, description))
    _swap_in(staging, target)
    stale = agreement_problems(cfg, compare=("dataset", "kernel"))
    if stale:  # the kernel is regenerated after the dataset; `make submit` refuses while they differ
        print(f"weights-dataset: the generated kernel no longer fits ({stale[0]}): run `make kernels`")
    print(
        f"weights-dataset: run {cfg.name}{round_note}, {n_folds} folds x (cell, mil) weights{image_note}, "
        f"{thresholds}, config.yaml, {folder_mb(target):.1f} MB -> {target}\n"
        f"  upload: kaggle datasets create -p {target} --dir-mode zip  "
        f"(a new version: kaggle datasets version -p {target} -m ... --dir-mode zip)"
    )
    return target


# ------------------------------------------------------------------------------------------ backbone


def backbone_dataset(cfg: Config) -> Path:
    """``make backbone-dataset``: the backbone's initial weights (``model.pretrained_file``) as a dataset
    the train kernel attaches, since a local path means nothing on Kaggle. The file is checked to load
    weights-only (and to be the one ``model.pretrained_file`` resolves to, for a folder) before packing."""
    from weakcell.models.backbone import resolve_weights_file
    from weakcell.weights import load_state_dict

    if cfg.model.pretrained_file is None:
        raise StageError(
            "model.pretrained_file is not set: the backbone starts from random weights and the train kernel "
            "needs no backbone dataset (set model.pretrained_file=<local file> to pack one)"
        )
    source = resolve_weights_file(cfg.path(cfg.model.pretrained_file), cfg.model.backbone)
    state = load_state_dict(source)
    with datasets_lock(cfg, "backbone-dataset"):
        return _backbone_dataset(cfg, source, len(state))


def _backbone_dataset(cfg: Config, source: Path, n_tensors: int) -> Path:
    slug = backbone_slug(cfg)
    target, staging = dataset_folders(cfg, slug)
    _link_or_copy(source, staging / source.name)
    description = (
        f"Initial weights of the {cfg.model.backbone} backbone ({source.name}, {n_tensors} tensors, weights "
        "only) for the weakcell train kernel. Written by `make backbone-dataset`."
    )
    metadata = dataset_metadata(cfg, slug, description)
    metadata["id"] = backbone_id(cfg)
    _write_json(staging / METADATA_FILE, metadata)
    _swap_in(staging, target)
    print(
        f"backbone-dataset: {source.name} ({cfg.model.backbone}), {folder_mb(target):.1f} MB -> {target}\n"
        f"  upload: kaggle datasets create -p {target}  (a new version: kaggle datasets version -p {target} -m ...)"
    )
    return target


# ---------------------------------------------------------------------------------- pretrained weights


def pretrained_datasets(cfg: Config) -> list[Path]:
    """``make pretrained-datasets``: a Kaggle dataset folder per item ``make weights`` fetched, each with its
    files (verified against ``weights/MANIFEST.json`` first) and their manifest entries: the backbone as
    the backbone dataset the train kernel attaches, Cellpose-SAM, SAM and HPA-Cell-Segmentation (both of
    its files) as ``kaggle.cellpose_dataset`` / ``kaggle.sam_dataset`` / ``kaggle.hpacellseg_dataset``, the
    folders the kernels search for ``cpsam*`` / ``sam_vit_b*`` / ``dpn_unet_*``."""
    from weakcell.pretrained import MANIFEST, manifest_keys, read_manifest, verified

    folder = cfg.weights_dir
    manifest = read_manifest(folder)
    datasets = {
        "backbone": (backbone_slug(cfg), backbone_id(cfg)),
        "cellpose": (slug_of(cfg.kaggle.cellpose_dataset), dataset_id(cfg, cfg.kaggle.cellpose_dataset)),
        "sam": (slug_of(cfg.kaggle.sam_dataset), dataset_id(cfg, cfg.kaggle.sam_dataset)),
        "hpacellseg": (
            slug_of(cfg.kaggle.hpacellseg_dataset),
            dataset_id(cfg, cfg.kaggle.hpacellseg_dataset),
        ),
    }
    wanted = manifest_keys(cfg)
    missing = [key for key in wanted if key not in manifest or not verified(folder, manifest[key])]
    if missing:
        raise FileNotFoundError(
            f"{folder / MANIFEST} lacks {', '.join(missing)} (weights.fetch): run `make weights` first"
        )
    groups: dict[str, list[str]] = {}  # dataset kind -> its manifest keys, in order
    for key in wanted:
        groups.setdefault(key.partition(":")[0], []).append(key)
    with datasets_lock(cfg, "pretrained-datasets"):
        return [
            _pretrained_dataset(cfg, {key: manifest[key] for key in keys}, *datasets[kind])
            for kind, keys in groups.items()
        ]


def _pretrained_dataset(cfg: Config, entries: dict[str, dict[str, Any]], slug: str, identifier: str) -> Path:
    """Items of ``make weights``' manifest (key -> entry) as one Kaggle dataset folder ``slug`` (id
    ``identifier``): their files and their manifest entries."""
    from weakcell.pretrained import MANIFEST

    target, staging = dataset_folders(cfg, slug)
    for entry in entries.values():
        _link_or_copy(cfg.weights_dir / entry["file"], staging / entry["file"])
    _write_json(staging / MANIFEST, entries)
    description = "; ".join(
        f"{entry['file']} ({key}, sha256 {entry['sha256']}, from {entry['source']}; licence "
        f"{entry.get('licence', 'see the source')})"
        for key, entry in entries.items()
    )
    metadata = dataset_metadata(
        cfg, slug, f"{description}, weights only. Written by `make pretrained-datasets`."
    )
    metadata["id"] = identifier
    _write_json(staging / METADATA_FILE, metadata)
    _swap_in(staging, target)
    files = ", ".join(entry["file"] for entry in entries.values())
    print(
        f"pretrained-datasets: {', '.join(entries)} {files}, {folder_mb(target):.1f} MB -> {target}\n"
        f"  upload: kaggle datasets create -p {target}"
    )
    return target
