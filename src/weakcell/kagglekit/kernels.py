"""``make kernels``: generated, never hand-edited, offline Kaggle kernels in ``kernels/<variant>/``.

Each folder holds ``kernel-metadata.json`` (internet off, GPU on, the competition and the datasets it
attaches) and a script rendered from ``kernel.py.tmpl``: install from the wheels dataset with
``pip install --no-index --find-links``, then run the same ``weakcell`` stages as locally on
``/kaggle/input/...``, ending in a validated ``/kaggle/working/submission.csv``. ``kernel_metadata`` and
``kernel_script`` are pure; ``run`` writes the folders. The folders are rewritten on every call and not
committed (their ids name the user's Kaggle account).
"""

from __future__ import annotations

import ast
import json
import shutil
import textwrap
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

import yaml

import weakcell
from weakcell.combine import uses_image_model
from weakcell.config import Config
from weakcell.errors import StageError, UnknownName
from weakcell.kagglekit.agreement import EXPECT_NAME, expect_literal, require_agreement
from weakcell.kagglekit.naming import (
    PLACEHOLDER_OWNER,
    backbone_id,
    competition_key,
    competition_slug,
    dataset_id,
    kernel_slug,
    resolve_owner,
    slug_of,
    title_of,
    weights_slug,
    wheels_slug,
)
from weakcell.outputs import atomic_write_json, atomic_write_text, folder_lock

METADATA_FILE = "kernel-metadata.json"
TEMPLATE = Path(__file__).with_name("kernel.py.tmpl")


@dataclass(frozen=True)
class Variant:
    """One kind of kernel. ``backend`` replaces the run's ``segment.backend`` for the test-split cache;
    ``train`` trains inside the kernel instead of reading a weights dataset."""

    description: str
    backend: str | None = None
    train: bool = False


VARIANTS: dict[str, Variant] = {
    "inference": Variant("caches the test split with the run's own segmentation, then TTA x folds inference"),
    "cellpose": Variant(
        "caches the test split with Cellpose-SAM (weights from an attached dataset), then inference",
        backend="cellpose",
    ),
    "cellpose-sam": Variant(
        "caches the test split with Cellpose-SAM refined by SAM box prompts, then inference",
        backend="cellpose+sam",
    ),
    "hpacellseg": Variant(
        "caches the test split with HPA-Cell-Segmentation (the organisers' U-Nets, attached), then inference",
        backend="hpacellseg",
    ),
    "train": Variant("folds, cache, training, thresholds and inference, all inside the kernel", train=True),
}
# Segmentation parts that read a weights file: config key -> the kaggle.* field naming its dataset.
WEIGHT_KEYS: dict[str, tuple[str, str]] = {
    "cellpose": ("segment.cellpose.weights", "cellpose_dataset"),
    "sam": ("segment.sam.weights", "sam_dataset"),
    "hpacellseg": ("segment.hpacellseg.weights", "hpacellseg_dataset"),
}


def variant_of(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise UnknownName(f"unknown kernel variant {name!r}; known: {', '.join(VARIANTS)}") from None


def variant_overrides(overrides: list[str], variant: str) -> list[str]:
    """``kaggle.kernel_overrides`` for one variant: plain ``key=value`` entries, and ``<variant>:key=value``
    entries of this variant without their prefix."""
    chosen = []
    for override in overrides:
        prefix, colon, rest = override.partition(":")
        if not colon or "=" in prefix:  # no variant prefix (a value may hold a colon)
            chosen.append(override)
        elif prefix == variant:
            chosen.append(rest)
        else:
            variant_of(prefix)  # a typo in a variant name fails here
    return chosen


# Weights-reading parts whose backends need the ``segment`` extra (cellpose, segment-anything).
SEGMENT_EXTRA = {"cellpose", "sam"}


def segment_inputs(cfg: Config, variant: str) -> dict[str, str]:
    """Config key -> dataset id of each segmentation weights file the variant's backend reads."""
    backend = variant_of(variant).backend or cfg.segment.backend
    inputs = {}
    for part in backend.split("+"):
        if part.strip() in WEIGHT_KEYS:
            key, field = WEIGHT_KEYS[part.strip()]
            inputs[key] = dataset_id(cfg, getattr(cfg.kaggle, field))
    return inputs


def _needs_segment_extra(cfg: Config, variant: str) -> bool:
    backend = variant_of(variant).backend or cfg.segment.backend
    return any(part.strip() in SEGMENT_EXTRA for part in backend.split("+"))


def weight_inputs(cfg: Config, variant: str) -> dict[str, str]:
    """Config key -> dataset id of every weights file the kernel reads from an attached dataset: the
    segmentation weights, and for a kernel that trains, the backbone's initial weights
    (``model.pretrained_file``, packed by ``make backbone-dataset``) when the config names them."""
    inputs = segment_inputs(cfg, variant)
    if variant_of(variant).train and cfg.model.pretrained_file is not None:
        inputs["model.pretrained_file"] = backbone_id(cfg)
    return inputs


def stages(cfg: Config, variant: str) -> list[str]:
    """The weakcell stages the kernel runs, in order."""
    if not variant_of(variant).train:
        return ["cache", "infer"]
    from weakcell.cli import STAGES  # refinement is a stage only once it has landed

    refine = ["refine"] if cfg.refine.rounds > 0 and "refine" in STAGES else []
    image_model = ["image-model"] if uses_image_model(cfg) else []  # before thresholds: they may read its OOF
    return ["folds", "cache", "train", *refine, *image_model, "thresholds", "infer"]


def kernel_metadata(cfg: Config, variant: str) -> dict[str, Any]:
    """``kernel-metadata.json``: a private script kernel, internet off, GPU on (``kaggle.machine_shape``, a
    T4 by default), the competition and every dataset it reads (wheels, the run's weights, segmentation
    and backbone weights, ``kaggle.extra_datasets``)."""
    slug = kernel_slug(cfg, variant)
    datasets = [dataset_id(cfg, wheels_slug(cfg))]
    if not variant_of(variant).train:
        datasets.append(dataset_id(cfg, weights_slug(cfg)))
    datasets += [*weight_inputs(cfg, variant).values(), *cfg.kaggle.extra_datasets]
    shape = {"machine_shape": cfg.kaggle.machine_shape} if cfg.kaggle.gpu and cfg.kaggle.machine_shape else {}
    return {
        "id": f"{resolve_owner(cfg)}/{slug}",
        "title": title_of(slug),
        "code_file": f"{slug}.py",
        "language": "python",
        "kernel_type": "script",
        "is_private": cfg.kaggle.private,
        "enable_gpu": cfg.kaggle.gpu,
        **shape,
        "enable_tpu": False,
        "enable_internet": False,
        "dataset_sources": list(dict.fromkeys(datasets)),
        "competition_sources": [competition_slug(cfg)],
        "kernel_sources": [],
        "model_sources": [],
    }


def _literal(value: Any) -> str:
    """A Python literal of a str / list / dict of str or None: its JSON text where Python reads that back
    as the same value (``["cache", "infer"]``), else ``repr`` (JSON spells a character beyond the BMP as a
    surrogate pair, which Python reads as two characters). Never the bare text: a user's string (a run
    name, an override) is always quoted, whatever quotes or backslashes it holds."""
    if value is None:
        return "None"
    text = json.dumps(value)
    return text if ast.literal_eval(text) == value else repr(value)


def kernel_overrides(cfg: Config, variant: str) -> list[str]:
    """The ``key=value`` overrides a kernel runs its stages with, on top of the run's config and the Kaggle
    paths: the variant's, then ``kaggle.kernel_overrides`` (those for another variant left out)."""
    spec = variant_of(variant)
    overrides = []
    if not spec.train:
        # the test split only, predicted by this run's packed round into submissions/<run>/; the external
        # sources it was trained on are neither cached nor attached (weakcell.sources)
        overrides = [
            "data.sources=[]",
            "cache.splits=[test]",
            "infer.split=test",
            "infer.models=null",
            "infer.output=null",
            f"refine.rounds={cfg.refine.rounds}",
        ]
    if spec.backend:
        overrides.append(f"segment.backend={spec.backend}")
    return overrides + variant_overrides(cfg.kaggle.kernel_overrides, variant)


_NO_CONFIG_LINE = "CONFIG_YAML = None  # inference reads the run's config.yaml from the weights dataset"


def _config_line(cfg: Config) -> str:
    """``CONFIG_YAML = ...``: the resolved config a training kernel trains with, without local locations
    (they mean nothing on Kaggle: the kernel sets its own)."""
    portable = cfg.model_copy(
        update={
            "paths": cfg.paths.model_copy(update={"root": "."}),
            "data": cfg.data.model_copy(update={"dir": None}),
            # a local file means nothing there: WEIGHT_INPUTS points it at the attached dataset
            "model": cfg.model.model_copy(update={"pretrained_file": None}),
        }
    )
    config_yaml = yaml.safe_dump(portable.model_dump(mode="json"), sort_keys=False)
    # a readable block unless the text could end the literal early or holds escapes
    literal = (
        f'"""\\\n{config_yaml}"""'
        if '"""' not in config_yaml and "\\" not in config_yaml
        else _literal(config_yaml)
    )
    return f"# the resolved config this kernel trains with\nCONFIG_YAML = {literal}"


def buildable_variant(cfg: Config, variant: str) -> Variant:
    """The variant's spec, refused where the kernel could not run: a training kernel of a config with
    ``data.sources`` (they are not attached on Kaggle)."""
    spec = variant_of(variant)
    if spec.train and cfg.data.sources:
        raise StageError(
            f"the {variant} kernel trains on Kaggle, where data.sources ({', '.join(s.dir for s in cfg.data.sources)}) "
            "is not attached; leave it out of kaggle.variants, or train with data.sources=[]"
        )
    return spec


def kernel_script(cfg: Config, variant: str) -> str:
    """The kernel's Python source, rendered from ``kernel.py.tmpl``."""
    spec = buildable_variant(cfg, variant)
    key = competition_key(cfg)
    inputs = weight_inputs(cfg, variant)
    overrides = kernel_overrides(cfg, variant)
    settings = {
        "VARIANT": (variant, None),
        "COMPETITION": (competition_slug(cfg), "attached competition data"),
        "DATASET": (key, "its weakcell layout"),
        "WHEELS": (wheels_slug(cfg), "attached dataset: the weakcell wheel + the wheels the image lacks"),
        "INSTALL": ("weakcell[segment]" if _needs_segment_extra(cfg, variant) else "weakcell", None),
        "WEIGHTS": (
            None if spec.train else weights_slug(cfg),
            "none: trains its own"
            if spec.train
            else "attached dataset: the run's weights, thresholds, config",
        ),
        "RUN": (cfg.name, None),
        "WEIGHT_INPUTS": (
            {k: slug_of(v) for k, v in inputs.items()},
            "config key -> attached dataset with weights (segmentation, backbone)",
        ),
        "STAGES": (stages(cfg, variant), None),
        "OVERRIDES": (overrides, "on top of the run's config and the Kaggle paths"),
        "SUBMISSION": (
            "cell_level.csv" if key == "hpa2021" else "image_level.csv",
            "copied to submission.csv",
        ),
    }
    expect = None if spec.train else expect_literal(cfg)
    lines = [
        f"{name} = {_literal(value)}" + (f"  # {comment}" if comment else "")
        for name, (value, comment) in settings.items()
    ]
    # the models the weights dataset must hold (its packed.json), compared before any work
    lines.append(
        f"{EXPECT_NAME} = {expect or 'None'}  # the run, round, folds, network and classes to predict with"
    )
    lines.append(_config_line(cfg) if spec.train else _NO_CONFIG_LINE)
    where_weights = (
        "it trains its own models"
        if spec.train
        else "the run's weights, thresholds and resolved config come from the weights dataset"
    )
    about = (
        f"{spec.description[0].upper()}{spec.description[1:]}. Built from weakcell {weakcell.__version__} "
        # the run's name is a user string: it appears only as the quoted literal RUN, never in this docstring
        "for the run named by RUN below. Internet is off: weakcell and the packages the Kaggle image lacks "
        "install from "
        f"the attached wheels dataset; {where_weights}. Writes /kaggle/working/submission.csv with the same "
        "CLI as a local run."
    )
    return Template(TEMPLATE.read_text()).substitute(
        variant=variant, about=textwrap.fill(about, width=105), settings="\n".join(lines)
    )


def write_kernel(cfg: Config, variant: str) -> Path:
    """Write ``kernels/<variant>/`` (its old files removed: the folder is generated)."""
    folder = cfg.path(cfg.paths.kernels) / variant
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    metadata = kernel_metadata(cfg, variant)
    atomic_write_text(folder / metadata["code_file"], kernel_script(cfg, variant))
    atomic_write_json(folder / METADATA_FILE, metadata)
    return folder


def run(cfg: Config) -> list[Path]:
    """``make kernels``: every variant of ``kaggle.variants``, holding the kernels folder's lock."""
    for variant in cfg.kaggle.variants:
        buildable_variant(cfg, variant)  # fail before writing anything
    # the run and its weights dataset, where they exist, must be the models the kernels will expect
    require_agreement(cfg, "kernels", compare=("run", "dataset"))
    with folder_lock(cfg.path(cfg.paths.kernels), "kernels", cfg.checks.lock_wait_s):
        return _write_kernels(cfg)


def _write_kernels(cfg: Config) -> list[Path]:
    folders = []
    for variant in cfg.kaggle.variants:
        folder = write_kernel(cfg, variant)
        metadata = json.loads((folder / METADATA_FILE).read_text())
        print(
            f"kernels: {folder}/{metadata['code_file']} + {METADATA_FILE} "
            f"(attaches {', '.join(metadata['competition_sources'] + metadata['dataset_sources'])})"
        )
        folders.append(folder)
    if resolve_owner(cfg) == PLACEHOLDER_OWNER:
        print(
            f"kernels: no Kaggle username (kaggle.owner, $KAGGLE_USERNAME or kaggle.json): the ids say "
            f"{PLACEHOLDER_OWNER!r}; regenerate with ARGS=kaggle.owner=<you> before `make submit`"
        )
    return folders
