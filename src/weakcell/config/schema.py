"""The config's schema: one pydantic section per stage and ``Config``, the whole pipeline's settings.

Over 400 lines on purpose: it is one declarative list of fields (name, default, bounds, description), one
class per config section, read top to bottom like the YAML files; splitting it by section would scatter one
schema over many files without separating any logic. Loading and overrides live in
``weakcell.config.loading``, which settings invalidate which output in ``weakcell.config.lineage``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from weakcell.constants import HPA2021_CELL_LINES, CellScore
from weakcell.data.ids import RULE, is_safe_id


def _integer_code(value: object) -> object:
    """A literal of ints alone would take ``true`` as 1 and ``1.0`` as 1 (equal in Python): a code is an int."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"a TTA code is an integer 0..7, not a {type(value).__name__}")
    return value


# A symmetry of the square applied to a crop (``cache.loader.apply_symmetries``): bit 0 flips left-right,
# bit 1 up-down, bit 2 transposes; there are 8.
TtaCode = Annotated[Literal[0, 1, 2, 3, 4, 5, 6, 7], BeforeValidator(_integer_code)]


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PathsConfig(Section):
    """Where things live. Relative paths resolve against ``root``; a Kaggle kernel sets
    ``root=/kaggle/working`` and points ``data.dir`` at ``/kaggle/input/...``: one switch, no absolute
    paths in the package."""

    root: str = Field(".", description="folder every relative path below resolves against")
    data: str = Field("data", description="datasets: data.dir defaults to {paths.data}/{data.dataset}")
    cache: str = Field(
        "cache", description="cell-crop caches: {paths.cache}/{data.dataset}/{segment.backend}"
    )
    runs: str = Field("runs", description="trained runs: {paths.runs}/{name}")
    folds: str = Field("folds", description="folds files: {paths.folds}/{data.dataset}.csv")
    submissions: str = Field("submissions", description="inference outputs: {paths.submissions}/{name}")
    reports: str = Field("reports", description="plots and evaluation reports")
    kernels: str = Field("kernels", description="generated Kaggle kernels: {paths.kernels}/<variant>")


class SourceConfig(Section):
    """An external data set trained on beside the competition's (one entry of ``data.sources``): a folder in
    the data set's own layout (``train/<ID>_<color>.png``, the label file; ``make external`` writes one),
    cached into its own cache folder and read through its own intensity gain (``weakcell.sources``)."""

    dir: str = Field(
        description="the set's folder (train/, its label file, sources.csv), e.g. data/hpa2021-external"
    )
    name: str | None = Field(
        None,
        description="names the source in logs and tables and its cache, {paths.cache}/<name>/<segment.backend>; "
        "null = the folder's name",
    )
    folds: Literal["train_only", "folded"] | None = Field(
        None,
        description="train_only = fold -1 (trained on in every fold, never validated), folded = stratified "
        "into the folds like the competition's images; null = folds.external_mode. The set joins "
        "folds.external (make folds covers it)",
    )
    intensity: Literal["gain", "none"] = Field(
        "gain",
        description="gain = its crops are read through a per-channel gain that maps its cells' mean "
        "intensity onto the competition's (measured on both caches' training crops, or `gain`); none = as cached",
    )
    gain: tuple[float, float, float, float] | None = Field(
        None, description="R, G, B, Y gain to use instead of measuring one (intensity=gain)"
    )

    @field_validator("gain")
    @classmethod
    def _positive_gain(
        cls, value: tuple[float, float, float, float] | None
    ) -> tuple[float, float, float, float] | None:
        if value is not None and not all(0 < g <= 64 for g in value):
            raise ValueError(f"a gain multiplies intensities: 4 values in (0, 64], not {value}")
        return value

    @property
    def source_name(self) -> str:
        """``name``, else the folder's last part."""
        return self.name or Path(self.dir).name


class DataConfig(Section):
    """Which dataset a run reads. ``dir`` defaults to ``{paths.data}/{dataset}``: the competition's images,
    the only ones scored and predicted. ``sources`` adds external sets to train on."""

    dataset: Literal["synthetic", "synthetic2018", "hpa2021", "hpa2018"] = Field(
        "synthetic",
        description="layout and class table: hpa2021 (19 classes), hpa2018 (28), or a synthetic set",
    )
    dir: str | None = Field(
        None,
        description="the dataset's folder (train/, train.csv, test/, ...); None = {paths.data}/{dataset}",
    )
    sources: list[SourceConfig] = Field(
        default_factory=list,
        description="external sets trained on beside the competition's images, each {dir, name, folds: "
        "train_only|folded, intensity: gain|none, gain} (weakcell.sources); [] = the competition's alone",
    )

    @field_validator("sources")
    @classmethod
    def _distinct_sources(cls, value: list[SourceConfig]) -> list[SourceConfig]:
        names = [source.source_name for source in value]
        unsafe = [name for name in names if not is_safe_id(name)]
        if unsafe:  # a name becomes a cache folder: cache/<name>/<backend>
            raise ValueError(f"data.sources name {unsafe[0]!r} is not a folder name ({RULE}); set its name")
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"data.sources names {repeated[0]!r} twice; give each source its own name")
        if "competition" in names:
            raise ValueError("'competition' names the data set's own images; give the source another name")
        return value


class SyntheticConfig(Section):
    """Knobs of the synthetic HPA benchmark (``make data``); see ``weakcell.synthetic``."""

    n_train: int = Field(240, ge=1, description="training images (train/, train.csv)")
    n_test: int = Field(40, ge=0, description="test images (test/, sample_submission.csv)")
    image_size: int = Field(512, ge=64, description="side of the square images, pixels")
    cell_scale: float = Field(
        0.25, gt=0, description="cell size relative to real HPA at 2048 px (0.25 = real cells at 512 px)"
    )
    cell_lines: list[str] = Field(
        default_factory=lambda: ["U-2 OS", "A-431", "HeLa", "CACO-2"],
        description="cell-line presets drawn per image (size, shape, density)",
    )
    cells_per_image: tuple[int, int] = Field(
        (10, 28),
        description="range of cells in a whole 2048-real-px field (scaled by cell-line density and area)",
    )
    labels_per_image_mean: float = Field(
        1.64, ge=1.0, description="mean number of classes per image (real hpa2021: 1.64)"
    )
    class_balance: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="0 = real hpa2021 class frequencies, 1 = uniform; in between = frequencies ** (1 - b)",
    )
    expressing_fraction: tuple[float, float] = Field(
        (0.25, 0.9), description="range of the fraction of an image's cells that express each image class"
    )
    intensity_range: tuple[float, float] = Field(
        (0.35, 1.0), description="range of a cell's expression intensity (relative brightness of its pattern)"
    )
    noise: float = Field(1.0, ge=0.0, description="multiplies shot/read noise; 0 = clean")
    blur: float = Field(1.0, ge=0.0, description="multiplies the optical blur (PSF) sigma; 0 = sharp")
    illumination: float = Field(1.0, ge=0.0, description="multiplies uneven-illumination amplitude")
    mitotic_fraction: float = Field(
        0.04,
        ge=0.0,
        le=1.0,
        description="fraction of cells in mitosis; they carry the spindle label only where the image shows it",
    )
    seed: int = Field(2021, description="seed of the generator (the same seed draws the same images)")
    workers: int = Field(0, ge=0, description="processes; 0 = one per core")

    @field_validator("cells_per_image", "expressing_fraction", "intensity_range")
    @classmethod
    def _ordered_range(cls, value: tuple[float, float], info: ValidationInfo) -> tuple[float, float]:
        low, high = value
        upper = 1.0 if info.field_name == "expressing_fraction" else float("inf")
        if not 0 <= low <= high <= upper:
            raise ValueError(f"expected [low, high] with 0 <= low <= high{' <= 1' if upper == 1.0 else ''}")
        return value


class FoldsConfig(Section):
    """Multilabel-stratified K-fold at image level (``make folds``), optionally grouped (near-duplicates,
    external sets). Each setting has its own file (see ``file``), so folds of other settings never replace
    a committed one."""

    n_splits: int = Field(5, ge=2, description="folds (K)")
    seed: int = Field(42, description="seed of the stratified split")
    group_column: str | None = Field(
        None, description="column of the label file whose equal values must share a fold"
    )
    file: str | None = Field(
        None,
        description="defaults to {paths.folds}/{data.dataset}.csv at the default settings (5 folds, seed "
        "42, no groups; the committed real-data folds), else {paths.folds}/{data.dataset}-<n_splits>x<seed>"
        "[-by-<group_column>][-dups][-ext[-folded|-mixed]].csv",
    )
    # -- grouped folds (weakcell.folds.fold_groups): near-duplicates and external sets (issue 23) --
    duplicates: str | None = Field(
        None,
        description="near-duplicates JSON of `weakcell duplicates`: each cluster shares a fold; null = no "
        "duplicate groups (the folds stay those of plain multilabel stratification)",
    )
    external: list[str] = Field(
        default_factory=list,
        description="external data sets (folders of `make external`: train.csv, sources.csv) whose images "
        "join the folds file; images of one antibody share a fold",
    )
    external_mode: Literal["train_only", "folded"] = Field(
        "train_only",
        description="train_only = external images get fold -1 (always trained on, never validated) unless "
        "a near-duplicate ties them to a competition image, whose fold they take; folded = stratified too",
    )
    external_modes: dict[str, Literal["train_only", "folded"]] = Field(
        default_factory=dict,
        description="external set (as in folds.external) -> its own mode where it differs from "
        "external_mode; data.sources' `folds` fill it",
    )
    report: str | None = Field(
        None, description="folds report (markdown); defaults to {paths.reports}/folds-{data.dataset}.md"
    )

    def own_name(self) -> str:
        """What names these settings' folds file after the data set: '' at the defaults, else
        ``-<n_splits>x<seed>`` plus ``-by-<group_column>``, ``-dups`` with near-duplicate groups and
        ``-ext`` with external sets (``-ext-folded`` when they are folded, ``-ext-mixed`` when their modes
        differ). Which duplicates file or external sets is not in the name: it is recorded beside the file
        (``weakcell.folds_record``), which refuses a file of other settings."""
        defaults = FoldsConfig()
        plain = (self.n_splits, self.seed, self.group_column) == (
            defaults.n_splits,
            defaults.seed,
            defaults.group_column,
        )
        if plain and self.duplicates is None and not self.external:
            return ""
        name = f"-{self.n_splits}x{self.seed}"
        if self.group_column is not None:
            name += "-by-" + "".join(c if c.isalnum() or c in "-_" else "_" for c in self.group_column)
        if self.duplicates is not None:
            name += "-dups"
        if self.external:
            modes = {self.mode_of(folder) for folder in self.external}
            name += "-ext-mixed" if len(modes) > 1 else "-ext" if modes == {"train_only"} else "-ext-folded"
        return name

    def mode_of(self, folder: str) -> str:
        """How the external set ``folder`` (an entry of ``external``) is folded."""
        return self.external_modes.get(folder, self.external_mode)


class ClassicalSegmentConfig(Section):
    """The CPU default backend: nucleus seeds from blue, watershed of cell bodies over red/yellow/green."""

    working_scale: float = Field(
        0.125, gt=0, le=1, description="segment at this fraction of full resolution (0.125: 2048 -> 256 px)"
    )
    nucleus_diameter: float = Field(
        180.0, gt=0, description="typical nucleus diameter, pixels at full resolution (HPA 2048 px: 160-200)"
    )
    nucleus_smoothing: float = Field(0.03, ge=0, description="Gaussian sigma on blue, in nucleus diameters")
    nucleus_threshold_scale: float = Field(1.0, gt=0, description="multiplies the Otsu threshold of log blue")
    nucleus_split_depth: float = Field(
        0.3, ge=0, description="split touching nuclei only at necks this deep (fraction of the radius)"
    )
    nucleus_intensity_weight: float = Field(
        1.0, ge=0, description="split touching nuclei on intensity dips too: weight of brightness vs distance"
    )
    nucleus_local_contrast: float = Field(
        0.4,
        ge=0,
        lt=1,
        description="a nucleus pixel must also rise this fraction of the way from the background to the "
        "brightest blue within one radius (0 = log-Otsu threshold only)",
    )
    min_nucleus_area_fraction: float = Field(
        0.05, ge=0, description="blue objects under this fraction of a nucleus-sized disc are noise"
    )
    red_weight: float = Field(1.0, ge=0, description="weight of microtubules in the cytoplasm signal")
    yellow_weight: float = Field(1.0, ge=0, description="weight of ER in the cytoplasm signal")
    green_weight: float = Field(
        0.5, ge=0, description="weight of the protein channel in the cytoplasm signal"
    )
    cell_smoothing: float = Field(
        0.03, ge=0, description="Gaussian sigma on the cytoplasm, in nucleus diameters"
    )
    cell_threshold_scale: float = Field(
        1.0, gt=0, description="multiplies the Otsu threshold of the log cytoplasm signal"
    )
    cell_border_smoothing: float = Field(
        0.1,
        ge=0,
        description="straighten cell borders: Gaussian sigma of the per-label majority vote, in nucleus "
        "diameters (0 = raw watershed borders)",
    )
    distance_weight: float = Field(
        0.25,
        ge=0,
        description="watershed elevation: weight of distance-to-nucleus vs inverted log cytoplasm "
        "(small, so borders follow dim gaps between cells)",
    )


class CellposeSegmentConfig(Section):
    """Cellpose 4 (Cellpose-SAM) from a local weights file; never downloads (``weakcell.segment.cellpose_backend``)."""

    weights: str | None = Field(
        None,
        description="weights file or folder (e.g. /kaggle/input/cellpose-sam/cpsam); else "
        "$CELLPOSE_LOCAL_MODELS_PATH, then /kaggle/input/* are searched for cpsam",
    )
    backbone: str = Field(
        "vit_l",
        description="SAM image-encoder size inside the network (a segment_anything registry name); the "
        "official cpsam weights need vit_l, vit_b fits smaller fine-tuned models",
    )
    diameter: float | None = Field(
        None, gt=0, description="cell diameter in pixels at full resolution; None = the network's own scale"
    )
    working_scale: float = Field(0.25, gt=0, le=1, description="segment at this fraction of full resolution")
    cytoplasm_channels: list[Literal["red", "green", "yellow"]] = Field(
        ["red", "yellow"],  # pydantic copies mutable defaults per instance
        description="averaged into the cell-body input; blue is the nuclear input",
    )
    flow_threshold: float = Field(0.4, ge=0, description="cellpose: max flow error of a kept mask")
    cellprob_threshold: float = Field(0.0, description="cellpose: logit above which a pixel is in a cell")
    min_size: int = Field(15, ge=0, description="smallest mask kept, pixels at working scale")
    batch_size: int = Field(8, ge=1, description="256-px tiles per forward pass")
    device: str = Field(
        "auto", description="auto (a GPU this torch has kernels for, else cpu) | cpu | cuda | cuda:N"
    )


class SamRefineConfig(Section):
    """Segment Anything refinement of first-pass cells with box prompts (``segment.backend=cellpose+sam``)."""

    weights: str | None = Field(
        None, description="SAM checkpoint file or folder; else $WEAKCELL_SAM_WEIGHTS, then /kaggle/input/*"
    )
    model_type: str = Field("vit_b", description="vit_b | vit_l | vit_h, must match the checkpoint")
    working_scale: float = Field(
        0.5, gt=0, le=1, description="fraction of full resolution SAM's masks are made at (0.5: 2048 -> 1024)"
    )
    min_iou: float = Field(
        0.5,
        ge=0,
        le=1,
        description="keep the first-pass mask when SAM's mask overlaps it less (IoU) than this",
    )
    box_batch_size: int = Field(16, ge=1, description="box prompts decoded per batch (bounds memory)")
    device: str = Field(
        "auto", description="auto (a GPU this torch has kernels for, else cpu) | cpu | cuda | cuda:N"
    )


class HpaCellSegConfig(Section):
    """HPA-Cell-Segmentation (the organisers' DPN-92 U-Nets, ``weakcell.segment.hpacellseg``) from local
    weights only. Scales are fractions of full resolution, as in every backend (``segment.reference_size``
    turns them into fractions of the reference image)."""

    weights: str | None = Field(
        None,
        description="folder holding dpn_unet_nuclei_v1 and the cell model (.safetensors from make weights, "
        "or the published .pth); else $WEAKCELL_HPACELLSEG_WEIGHTS, then /kaggle/input/*",
    )
    cell_model: Literal["3ch", "2ch"] = Field(
        "3ch",
        description="3ch = dpn_unet_cell_3ch_v1 (red, yellow, blue); 2ch = dpn_unet_cell_v2 (red, blue)",
    )
    network_scale: float = Field(
        0.25, gt=0, le=1, description="the U-Nets read the image at this scale (upstream: 0.25, 2048 -> 512)"
    )
    label_scale: float = Field(
        1.0,
        gt=0,
        le=1,
        description="label_cell runs at this scale with its sizes scaled (1 = upstream's full resolution)",
    )
    padding: bool = Field(True, description="upstream's 32-px reflected border around the network input")
    batch_size: int = Field(8, ge=1, description="images per forward pass of each U-Net")
    device: str = Field(
        "auto", description="auto (a GPU this torch has kernels for, else cpu) | cpu | cuda | cuda:N"
    )


class PostprocessConfig(Section):
    """Rules applied after any backend, as the top 2021 teams did; each one a switch."""

    drop_cells_without_nucleus: bool = Field(True, description="drop cells that hold no nucleus pixel")
    drop_border_cells_with_small_nucleus: bool = Field(
        False, description="drop border-touching cells whose nucleus is < border_nucleus_fraction x median"
    )
    border_nucleus_fraction: float = Field(
        0.5, ge=0, description="a border cell's nucleus area under this fraction of the median is dropped"
    )
    fill_holes: bool = Field(True, description="fill holes inside each cell's mask")
    min_cell_area: int = Field(0, ge=0, description="pixels at full resolution; 0 = no limit")


class SegmentConfig(Section):
    """Cell segmentation (``make cache``). ``backend`` is a registry name, optionally ``+``-joined with
    refiners, e.g. ``classical``, ``cellpose``, ``cellpose+sam``."""

    backend: str = Field(
        "classical",
        description="segmenter (classical | cellpose), optionally + refiners (cellpose+sam); names: "
        "weakcell.segment.SEGMENTERS, REFINERS",
    )
    classical: ClassicalSegmentConfig = Field(default_factory=ClassicalSegmentConfig)
    cellpose: CellposeSegmentConfig = Field(default_factory=CellposeSegmentConfig)
    sam: SamRefineConfig = Field(default_factory=SamRefineConfig)
    postprocess: PostprocessConfig = Field(default_factory=PostprocessConfig)
    hpacellseg: HpaCellSegConfig = Field(default_factory=HpaCellSegConfig)
    reference_size: int | None = Field(
        None,
        gt=0,
        description="image side (px) at which pixel sizes and scales hold; an image of side S scales "
        "them by S / reference_size, so every size segments the same cells (None = absolute pixels)",
    )


class CacheConfig(Section):
    """The cell-crop cache: instance masks, ``cells.parquet``, uint8 crop shards (``make cache``)."""

    crop_size: int = Field(64, ge=16, description="side of the square crops, pixels")
    splits: list[str] = Field(
        default_factory=lambda: ["train", "test"], description="splits of the dataset to cache (train, test)"
    )
    dir: str | None = Field(None, description="defaults to {paths.cache}/{data.dataset}/{segment.backend}")
    workers: int = Field(0, ge=0, description="processes; 0 = one per core")
    on_error: Literal["raise", "skip"] = Field("skip", description="skip = report by ID in skipped.csv")
    shard_index: int = Field(0, ge=0, description="this machine's part when caching is split")
    num_shards: int = Field(1, ge=1, description="how many parts caching is split into")
    shard_mb: float = Field(
        256, gt=0, description="crops are flushed to a new shard file every this many MiB (bounds memory)"
    )
    batched: Literal["auto", "always", "never"] = Field(
        "auto",
        description="learned backends: always = one process runs the network on batches while the workers "
        "decode and finish; never = each worker runs the whole backend with its own model; auto = batched "
        "when the network runs on a GPU (one model there, never one per worker), per worker on a CPU",
    )
    queue_images: int = Field(
        0,
        ge=0,
        description="batched: images between the decoding workers and the one process that runs the network "
        "(bounds memory); 0 = two batches plus one per worker",
    )


class ModelConfig(Section):
    """Backbone + heads (``weakcell.models``). ``backbone`` is any timm model name, built with ``in_chans=4``
    and no classifier; weights come from ``pretrained_file`` only (nothing is downloaded)."""

    backbone: str = Field(
        "resnet18", description="a timm model name (timm.list_models), built with 4 input channels"
    )
    pretrained_file: str | None = Field(
        None,
        description="local weights (file, or a folder holding one, e.g. a Kaggle dataset); a 3-channel "
        "ImageNet checkpoint is adapted to the 4-channel stem; None = random init",
    )
    backbone_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="extra timm.create_model arguments, e.g. {drop_path_rate: 0.1} or {img_size: 64} for a ViT",
    )
    drop_rate: float = Field(0.0, ge=0, lt=1, description="dropout before the heads (timm drop_rate)")
    embedding_dim: int | None = Field(
        None, ge=1, description="project backbone features to this size; None = keep"
    )
    # Masked cell crops are mostly black background, so ImageNet statistics do not fit them. Defaults:
    # 101 masked 64-px crops of the 5 real 2021 training images in ../shared/data (HPA-Cell-Segmentation
    # masks); refit them on a full cache for the best fit.
    channel_mean: tuple[float, float, float, float] = Field(
        (0.047, 0.022, 0.053, 0.045), description="R, G, B, Y mean of crops scaled to [0, 1]"
    )
    channel_std: tuple[float, float, float, float] = Field(
        (0.095, 0.050, 0.137, 0.085), description="R, G, B, Y std of crops scaled to [0, 1]"
    )


class MilConfig(Section):
    """Attention MIL head (Ilse et al. 2018, one attention map per class) over each image's cells."""

    hidden: int = Field(128, ge=1, description="width of the attention network")
    # gated by default, as published: gated and plain heads are level on the bench (benchmarks/mil-gate.md)
    gated: bool = Field(True, description="gated attention (tanh * sigmoid) instead of plain tanh")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the attention network's hidden layer")
    cells_per_bag: int = Field(16, ge=1, description="cells sampled per image when training end to end")
    cell_loss_weight: float = Field(
        0.5, ge=0, description="lambda of image BCE + lambda * cell BCE (cells inherit the image labels)"
    )
    mode: Literal["frozen", "end_to_end"] = Field(
        "frozen",
        description="train the MIL head on frozen stage-1 embeddings, or end to end with the backbone",
    )
    epochs: int = Field(
        30, ge=1, description="stage-2 epochs (frozen: seconds on CPU; end_to_end: like stage 1)"
    )
    batch_size: int = Field(16, ge=1, description="images (bags) per optimizer step")
    lr: float = Field(2e-3, gt=0, description="peak learning rate of the MIL head")


class TrainConfig(Section):
    """The one training engine's settings, shared by every stage (``weakcell.engine.fit``)."""

    epochs: int = Field(4, ge=1, description="stage-1 (cell model) epochs per fold")
    batch_size: int = Field(
        256,
        ge=1,
        description="samples per optimizer step over all processes; each process runs "
        "batch_size / (grad_accum x world size) per forward, so results do not depend on the hardware",
    )
    lr: float = Field(1e-3, gt=0, description="peak AdamW learning rate, reached after the warm-up")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW decay of weight matrices (not biases, norms)")
    warmup_epochs: float = Field(0.5, ge=0, description="linear warm-up, then cosine decay to 0")
    grad_accum: int = Field(1, ge=1, description="forwards per optimizer step (a memory knob only)")
    grad_clip: float | None = Field(None, gt=0, description="max global gradient norm; None = no clipping")
    amp: Literal["auto", "bf16", "fp16", "off"] = Field(
        "auto",
        description="auto = bf16 on CUDA that supports it, fp16 + GradScaler on older GPUs, off on CPU",
    )
    channels_last: bool = Field(True, description="NHWC memory layout (faster convolutions on GPUs)")
    ema: float | None = Field(
        None, gt=0, lt=1, description="EMA decay, e.g. 0.999; validation and model.pt use the EMA; None = off"
    )
    checkpoint_every: int = Field(
        50,
        ge=0,
        description="optimizer steps between resumable checkpoints (and at each epoch end); 0 = epoch ends only",
    )
    loss: Literal["bce", "focal"] = Field("bce", description="cell loss: binary cross-entropy or focal")
    focal_gamma: float = Field(2.0, ge=0, description="focusing exponent of train.loss=focal")
    workers: int = Field(0, ge=0, description="DataLoader worker processes")
    prefetch: bool = Field(
        True,
        description="with workers 0: read and augment the next batch in a background thread while the model "
        "computes (datasets that seed their augmentations per batch; results do not change)",
    )
    validate_every: int = Field(
        1,
        ge=1,
        description="validate (the epoch log's val columns) every this many epochs, and after the last",
    )
    augment: list[dict[str, Any]] = Field(
        default_factory=lambda: list[dict[str, Any]](
            [{"name": "symmetries"}, {"name": "gain", "limit": 0.2}]
        ),
        description="training augmentations in order (weakcell.cache.augment): batched symmetries / gain "
        "(limit), then albumentations transforms by class name with their arguments, per_channel: true "
        "for independent draws per channel, e.g. {name: Affine, rotate: [-15, 15], p: 0.5}; [] = none",
    )
    folds: list[int] | None = Field(None, description="train only these folds; None = all")
    class_weights: Literal["none", "sqrt_inverse"] = Field(
        "none", description="BCE pos_weight per class: sqrt(negatives / positives) of the fold's cells, 1..50"
    )
    sampler: Literal["uniform", "balanced"] = Field(
        "uniform",
        description="balanced = draw cells in proportion to sqrt(1 / frequency) of their rarest class "
        "(classes 11, 15, 18 are 0.2-0.4% of images)",
    )
    targets: Literal["inherit", "truth"] = Field(
        "inherit",
        description="cell targets: the image's labels (weak), or the true cell labels (oracle, synthetic)",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto (a GPU this torch has kernels for, else cpu) | cpu | cuda"
    )
    compile: bool = Field(False, description="torch.compile the model (CUDA only)")


class ImageModelConfig(Section):
    """The whole-image model (``make image-model``, ``weakcell.image_model``): a 4-channel timm backbone on
    the whole field of view downscaled to ``size``, K fold models on the image labels with the run's folds,
    trained through the one engine (``train.amp``, ``train.channels_last``, ``train.ema`` and the optimiser
    settings of ``train`` apply). ``make infer`` uses it when ``enabled``: its rule
    (``infer.image_model_rule``) and the image-level source (``infer.image_level``)."""

    enabled: bool = Field(
        False,
        description="the run has a whole-image model: make image-model trains it, make infer uses it",
    )
    backbone: str = Field(
        "mobilenetv3_small_100", description="a timm model name, built with 4 input channels"
    )
    pretrained_file: str | None = Field(
        None,
        description="local weights (file, or a folder holding one); a 3-channel checkpoint is adapted to "
        "the 4-channel stem; None = random init",
    )
    size: int = Field(
        256,
        ge=32,
        description="side the whole image is downscaled to (area interpolation), pixels; cached once in "
        "{cache}/../images_<size>/",
    )
    epochs: int = Field(12, ge=1, description="epochs per fold model")
    batch_size: int = Field(16, ge=1, description="images per optimizer step")
    lr: float = Field(1e-3, gt=0, description="peak AdamW learning rate")
    drop_rate: float = Field(0.0, ge=0, lt=1, description="dropout before the head (timm drop_rate)")
    augment: list[dict[str, Any]] = Field(
        default_factory=lambda: list[dict[str, Any]](
            [{"name": "symmetries"}, {"name": "gain", "limit": 0.1}]
        ),
        description="training augmentations, as train.augment (symmetries = the D4 flips and transposes)",
    )
    # Whole fields of view are not masked crops: more background than cell, brighter than crops' means.
    # Defaults: the 5 real 2021 training images in ../shared/data, area-downscaled to 512².
    channel_mean: tuple[float, float, float, float] = Field(
        (0.068, 0.025, 0.056, 0.058), description="R, G, B, Y mean of whole images scaled to [0, 1]"
    )
    channel_std: tuple[float, float, float, float] = Field(
        (0.119, 0.056, 0.144, 0.099), description="R, G, B, Y std of whole images scaled to [0, 1]"
    )


class ThresholdsConfig(Section):
    """Per-class thresholds tuned on out-of-fold image predictions only (``make thresholds``). Why each
    class's threshold is shrunk toward the pooled one: benchmarks/thresholds.md (``make bench-thresholds``).
    """

    step: float = Field(0.01, gt=0, lt=1, description="grid step of the candidate thresholds")
    min_positives: int = Field(
        5,
        ge=1,
        description="classes with fewer OOF positives take the pooled threshold, or the fallback when "
        "shrinkage is 0 (tuning on 2 images overfits)",
    )
    fallback: float = Field(
        0.5, gt=0, lt=1, description="threshold of classes too rare to tune when shrinkage is 0"
    )
    shrinkage: float = Field(
        20.0,
        ge=0,
        description="each class's threshold moves toward the one best for macro-F1 over all classes, with "
        "weight positives / (positives + shrinkage) on its own (0 = each class's own, rare ones the fallback)",
    )
    sources: Literal["competition", "all"] = Field(
        "competition",
        description="whose out-of-fold images tune the thresholds: competition = the data set's own (the "
        "images inference predicts), all = those of folded external sources (data.sources) too",
    )


class InferConfig(Section):
    """Test-time prediction (``make infer``): TTA x folds, then the two Kaggle CSVs."""

    tta: list[TtaCode] = Field(
        default_factory=lambda: list[TtaCode]([0, 1, 2, 4]),
        min_length=1,
        description="square symmetries averaged per cell (at least one): 0 = identity, 1 = flip lr, "
        "2 = flip ud, 4 = transpose (codes 0..7 combine them)",
    )
    image_power: float = Field(
        0.0,
        ge=0,
        description="cell confidence = cell probability x image term ** image_power; 0 = the cell "
        "probability alone, best under the organisers' reading of the metric (benchmarks/confidence.md); "
        "3 was best when every class was judged in every image (evaluate.verified=all)",
    )
    image_best_cell: float = Field(
        0.25,
        ge=0,
        le=1,
        description="image term = (1 - this) x the MIL image probability + this x the image's best cell "
        "probability (weakcell.scoring.cell_confidence); no effect at image_power 0",
    )
    image_model_rule: Literal["none", "product", "mean", "replace"] = Field(
        "none",
        description="how the whole-image model (image_model.enabled) enters the cell confidence "
        "(weakcell.combine.IMAGE_MODEL_RULES): none | product (the confidence x image model ** "
        "image_model_power) | mean (image term = mean of MIL and image model) | replace (image term = the "
        "image model)",
    )
    image_model_power: float = Field(
        1.0, ge=0, description="power of the image model's term in the product, mean and replace rules"
    )
    image_level: Literal["mil", "image_model", "mean"] = Field(
        "mil",
        description="image probabilities of image_level.csv (weakcell.combine.IMAGE_LEVELS): mil | "
        "image_model | mean (of the two); make thresholds tunes them on the same source out of fold",
    )
    min_score: float = Field(0.0, ge=0, le=1, description="drop cell predictions below this confidence")
    split: str = Field(
        "test",
        description="test = the sample submission's IDs; another cached split (e.g. train) = its images, "
        "sizes from the cache (a submission for images that have no sample submission)",
    )
    models: str | None = Field(
        None, description="name of the run whose models predict; None = this run (name)"
    )
    folds: list[int] | None = Field(None, description="blend only these folds' models; None = every fold")
    blend: dict[str, float] | None = Field(
        None,
        description="run or run/round<r> -> weight: several runs' predictions as weighted means on the keys "
        "(image thresholds from the first); None = infer.models or this run",
    )
    output: str | None = Field(
        None,
        description="submission folder: a name goes under paths.submissions, a path (submissions/x, /abs/x) "
        "is used as given; None = name",
    )


class RefineConfig(Section):
    """Pseudo-label refinement (``make refine``): each round relabels each fold model's training cells from
    the predictions of inner models that never saw that fold (nested, ``weakcell.refine``), retrains the
    backbone on the selected cells, then the MIL head.

    The rule, per cell i of an image labelled Y and per class c, with ``s_c(i)`` the cell score named by
    ``score`` (``weakcell.scoring.CELL_SCORES``): keep c when c is in Y and
    ``s_c(i) >= relative * max_j s_c(j)`` over the image's cells j (or, with ``negative_quantile`` q,
    ``s_c(i)`` is at least the q-quantile of ``s_c`` over the cells of images without c: known negatives),
    ``s_c(i) >= threshold_scale * t_c`` (t_c: the class's image threshold tuned on the same inner models'
    predictions) and the cell's MIL attention for c is at least ``min_attention`` (1 = an average
    share). A cell keeping no class becomes
    Negative (``unlabelled=negative``) or leaves the training set (``drop``). ``targets=soft`` trains on
    ``s_c(i) / max_j s_c(j)`` for the kept classes instead of 1. An image label a cell does not keep is a
    0 target (``uncertain=negative``) or left out of the loss (``ignore``: the rule's misses are not
    taught as absent).

    Why these defaults (the relative rule on the cell's own probability; no absolute floor or attention,
    which cost recall; the negative floor, since the relative rule alone keeps ever fewer cells as rounds
    make the best cells peaky): the README's refinement section and benchmarks/refine-negative-floor.md.
    """

    rounds: int = Field(1, ge=0, description="refinement rounds; 0 = the inheritance + MIL run alone")
    score: CellScore = Field("stage1", description="cell score the rule reads (weakcell.scoring.CELL_SCORES)")
    relative: float | list[float] = Field(
        0.3,
        description="keep c for cells scoring at least this fraction of the image's best cell; a list gives "
        "round r the r-th value (the last one for later rounds)",
    )
    threshold_scale: float = Field(
        0.0, ge=0, description="and at least this x the class's tuned image threshold (0 = no absolute floor)"
    )
    min_attention: float = Field(
        0.0, ge=0, description="and MIL attention for c at least this (1 = an average share; 0 = any)"
    )
    negative_quantile: float | None = Field(
        0.9,
        ge=0,
        le=1,
        description="or keep c for cells at least this quantile of c's scores over the cells of images "
        "without c (null = the relative rule alone)",
    )
    unlabelled: Literal["negative", "drop"] = Field(
        "negative", description="cells that keep no class: learn Negative, or leave the training set"
    )
    # ignore: +0.0016 test mAP [+0.0011, +0.0022] over "negative" at three seeds (benchmarks/leaderboard.md)
    uncertain: Literal["negative", "ignore"] = Field(
        "ignore",
        description="an image label a cell does not keep: train it as 0, or leave the pair out of the loss",
    )
    targets: Literal["hard", "soft"] = Field(
        "hard", description="a kept class is a target of 1 (hard) or the cell's relative score (soft)"
    )
    epochs: int = Field(6, ge=1, description="backbone epochs per round")
    init: Literal["previous", "scratch"] = Field(
        "previous", description="previous = fine-tune the previous round's fold model; scratch = start anew"
    )
    inner_epochs: int | None = Field(
        None,
        ge=1,
        description="backbone epochs of the inner models that label each fold's training cells (refine.py: "
        "round 0's inner models train like the run, later ones like their round); null = as many as the "
        "outer models; fewer makes refinement cheaper (the demo)",
    )

    @field_validator("relative")
    @classmethod
    def _fractions(cls, value: float | list[float]) -> float | list[float]:
        values = value if isinstance(value, list) else [value]
        if not values or any(not 0 <= v <= 1 for v in values):
            raise ValueError(
                f"refine.relative must be a fraction in [0, 1] or a non-empty list of them, not {value}"
            )
        return value

    @property
    def keeps_inherited(self) -> bool:
        """Whether the rule keeps every inherited label as a hard 1 whatever the scores (the ablation's
        control): every score passes ``relative=0``, no floor or attention limit, hard targets."""
        relatives = self.relative if isinstance(self.relative, list) else [self.relative]
        return (
            all(r == 0 for r in relatives)
            and self.threshold_scale == 0
            and self.min_attention == 0
            and self.targets == "hard"
        )

    @property
    def reads_stage2(self) -> bool:
        """Whether the rule reads anything beyond each cell's own stage-1 probability (the MIL head's
        image probabilities, attention, thresholds tuned on them): else the inner models skip stage 2."""
        return self.score != "stage1" or self.threshold_scale > 0 or self.min_attention > 0

    def for_round(self, round_: int) -> RefineConfig:
        """The rule round ``round_`` (1-based) applies: ``relative`` resolved to one number."""
        if not isinstance(self.relative, list):
            return self
        return self.model_copy(update={"relative": self.relative[min(round_, len(self.relative)) - 1]})


FetchItem = Literal["backbone", "cellpose", "sam", "hpacellseg"]


class WeightsConfig(Section):
    """Pretrained weights fetched by ``make weights`` (``weakcell.pretrained``) into ``dir``, each recorded
    with its sha256 and source in ``dir/MANIFEST.json``; ``make pretrained-datasets`` packs them for Kaggle.
    The only stage that downloads: every other stage reads local files."""

    dir: str = Field(
        "weights", description="where the weights and MANIFEST.json live (relative to paths.root)"
    )
    fetch: list[FetchItem] = Field(
        default_factory=lambda: list[FetchItem](["backbone"]),
        description="backbone = model.backbone through timm's own pretrained source (saved as safetensors); "
        "cellpose = the official Cellpose-SAM cpsam; sam = the official SAM ViT-B checkpoint; hpacellseg = "
        "HPA-Cell-Segmentation's nuclei model and segment.hpacellseg.cell_model",
    )
    mirror: str | None = Field(
        None,
        description="a folder URL (http://, https://, file://) holding the official file names (cpsam, "
        "sam_vit_b_01ec64.pth), used instead of the official URLs; the pinned sha256 still applies",
    )
    backbone_url: str | None = Field(
        None, description="a checkpoint URL used instead of timm's own source for model.backbone (a mirror)"
    )
    timeout_s: float = Field(60.0, gt=0, description="network timeout per connection attempt, seconds")


class EvaluateConfig(Section):
    """Scores, per-class plots and attention maps of a finished run (``make evaluate``)."""

    round: int | None = Field(
        None, ge=0, description="refinement round to evaluate (0 = inheritance + MIL); None = the final one"
    )
    attention_images: int = Field(
        4, ge=0, description="attention maps of this many best and worst OOF images (by image-level BCE)"
    )
    verified: Literal["image", "all"] = Field(
        "image",
        description="reading of the 2021 metric for every cell score printed (evaluate, ablate, training "
        "logs): image = the organisers' (class c judged only in images with a true cell of c), all = every "
        "class judged in every image; the evaluation report shows both",
    )


class KaggleConfig(Section):
    """Kaggle integration (``weakcell.kagglekit``): ``make download``, ``make wheels``,
    ``make weights-dataset``, ``make kernels``, ``make submit``. Dataset and kernel slugs may hold
    ``{name}`` (the run) and ``{variant}``; ids are ``owner/slug``."""

    competitions: dict[str, str] = Field(
        default_factory=lambda: {
            "hpa2021": "hpa-single-cell-image-classification",
            "hpa2018": "human-protein-atlas-image-classification",
        },
        description="weakcell dataset layout -> Kaggle competition slug",
    )
    competition: Literal["hpa2021", "hpa2018"] | None = Field(
        None, description="what kernels and submit target; None = data.dataset when it is one, else hpa2021"
    )
    download: list[str] = Field(
        default_factory=lambda: ["hpa2021"],
        description="competitions `make download` fetches into {paths.data}/<dataset>/ (add hpa2018)",
    )
    keep_zip: bool = Field(False, description="keep the downloaded archive once it is fully unzipped")
    owner: str | None = Field(
        None,
        description="Kaggle username owning the datasets and kernels; None = $KAGGLE_USERNAME, kaggle.json",
    )
    wheels_dataset: str = Field("weakcell-wheels", description="slug of the wheels dataset")
    weights_dataset: str = Field("weakcell-weights-{name}", description="slug of a run's weights dataset")
    kernel: str = Field("weakcell-{variant}", description="kernel slug (its title is the slug with spaces)")
    variants: list[str] = Field(
        default_factory=lambda: ["inference", "cellpose", "cellpose-sam", "hpacellseg", "train"],
        description="kernels `make kernels` writes (weakcell.kagglekit.kernels.VARIANTS)",
    )
    submit_variant: str = Field("inference", description="the kernel `make submit` pushes (code competition)")
    cellpose_dataset: str = Field(
        "cellpose-sam", description="dataset (slug or owner/slug) holding the Cellpose-SAM weights"
    )
    sam_dataset: str = Field(
        "segment-anything", description="dataset (slug or owner/slug) holding the SAM checkpoint"
    )
    hpacellseg_dataset: str = Field(
        "hpa-cell-segmentation",
        description="dataset (slug or owner/slug) holding HPA-Cell-Segmentation's nuclei and cell models",
    )
    extra_datasets: list[str] = Field(
        default_factory=list, description="more owner/slug datasets attached to every kernel"
    )
    wheels: list[str] = Field(
        default_factory=lambda: [
            "iterative-stratification",
            "cellpose",
            "segment-anything",
            "fastremap",
            "fill-voids",
            "roifile",
            "natsort",
            "imagecodecs",
        ],
        description="packages the Kaggle image lacks: their wheels (versions pinned to this environment) "
        "join weakcell's in the wheels dataset",
    )
    python_version: list[str] = Field(
        default_factory=lambda: ["3.12", "3.13"],
        description="target Pythons of the wheels dataset (Kaggle's image runs 3.12, 3.13 announced): every "
        "compiled wheel is fetched for each; numbers are read as versions (3.12 -> '3.12')",
    )
    platforms: list[str] = Field(
        default_factory=lambda: ["manylinux_2_28_x86_64"],
        description="platform tags of the Kaggle image for compiled wheels; manylinux_2_N stands for every "
        "glibc up to 2.N (PEP 600), so manylinux2014 wheels fit too",
    )
    datasets_dir: str = Field("dist/kaggle", description="where the dataset folders are written")
    kernel_overrides: list[str] = Field(
        default_factory=list,
        description="key=value overrides added to every weakcell command a kernel runs; <variant>:key=value "
        "only to that variant's",
    )
    gpu: bool = Field(True, description="kernel-metadata enable_gpu")
    machine_shape: str | None = Field(
        "NvidiaTeslaT4",
        description="kernel-metadata machine_shape when gpu: the accelerator asked for (enable_gpu alone "
        "has been seen to give a P100, which Kaggle's torch cannot run); None = Kaggle's default",
    )
    backbone_dataset: str = Field(
        "weakcell-backbone-{name}",
        description="slug (or owner/slug) of the dataset holding model.pretrained_file for the train "
        "kernel (`make backbone-dataset`); attached only when model.pretrained_file is set",
    )
    private: bool = Field(
        True,
        description="kernels are private (datasets are, unless created with kaggle datasets create --public)",
    )
    message: str = Field("weakcell {name}", description="submission / version message")
    file: str | None = Field(
        None, description="file to submit (hpa2018); None = {paths.submissions}/{name}/image_level.csv"
    )
    dry_run: bool = Field(False, description="print what download / submit would do; no network")
    kernel_version: int | None = Field(
        None,
        ge=1,
        description="version of the pushed kernel whose submission.csv `make submit-kernel` submits",
    )

    @field_validator("python_version", mode="before")
    @classmethod
    def _versions_as_text(cls, value: Any) -> Any:
        """``3.12`` (a YAML float), ``[3.12, 3.13]`` or ``"3.12"``: each becomes ``"3.12"``. A float cannot
        say 3.10 (it reads 3.1), so that one must be quoted."""
        values = value if isinstance(value, list) else [value]
        versions = []
        for item in values:
            text = str(item).strip()
            if isinstance(item, float) and text in ("3.1", "3.2"):
                raise ValueError(f"{item} reads as the number {text}; quote the version, e.g. '3.10'")
            if not (isinstance(item, (str, int, float)) and all(p.isdigit() for p in text.split("."))):
                raise ValueError(f"{item!r} is not a Python version such as 3.12")
            versions.append(text)
        return versions


class AblateConfig(Section):
    """The ablation grid (``make ablate``): every variant on the same folds and seed, one table."""

    rounds: int = Field(2, ge=0, description="refinement rounds compared (1..rounds)")
    control: bool = Field(True, description="also refine with labels kept: the extra epochs alone")
    oracle: bool = Field(True, description="also train on the true cell labels (synthetic only): the ceiling")
    subset: bool = Field(False, description="the quick grid: 1 refinement round, no control run")
    seeds: list[int] | None = Field(
        None,
        min_length=1,
        description="training seeds: every run of the grid is trained once per seed (same folds and data) and "
        "each row reported as mean +- sd over them; null = the config's seed alone",
    )
    bootstrap: int = Field(
        500,
        ge=0,
        description="resamples of the test images for each row's 95% interval of test mAP (0 = none)",
    )
    variants: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="refinement rule variants, each a row judged against the full weak row by its paired "
        "difference: label -> refine.* settings that differ (e.g. {soft targets: {targets: soft}}); each "
        "trains its refinement rounds only, from the weak run's round 0 and inner models",
    )

    @field_validator("variants")
    @classmethod
    def _refine_settings(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for label, settings in value.items():
            unknown = sorted(set(settings) - set(RefineConfig.model_fields))
            if unknown:
                raise ValueError(f"ablate.variants[{label!r}]: {unknown} are not refine.* settings")
            if "rounds" in settings:
                raise ValueError(f"ablate.variants[{label!r}]: rounds is ablate.rounds for every row")
        return value


class ChecksConfig(Section):
    """Refusals that guard against losing work silently (``weakcell.outputs``, ``weakcell.cache.coverage``).
    They change whether a stage runs, never what it computes, so finished work stays reusable."""

    max_missing_share: float = Field(
        0.01,
        ge=0,
        le=1,
        description="train and refine refuse when the cache lacks more than this share of the labelled "
        "training images (no cells, failed to read, not cached); 1 = never refuse",
    )
    lock_wait_s: float = Field(
        0.0,
        ge=0,
        description="seconds a stage waits for another run to release its output folder before it "
        "refuses; 0 = refuse at once",
    )
    allow_empty_rows: bool = Field(
        False,
        description="infer refuses when an image to predict gives no cells (none found, unreadable, not "
        "cached): its row would be an empty placeholder, on Kaggle a lost image; true = write those rows "
        "empty and count them in the summary",
    )


class ExternalConfig(Section):
    """Public HPA images as an extra training set (``make external``, ``weakcell.external``): a list of the
    hosts' form or the 2018 one, fetched politely, converted and labelled into the competition's layout."""

    image_list: str | None = Field(
        None, description="the public list: the hosts' kaggle_2021.tsv or the 2018 HPAv18RBGY_wodpl.csv"
    )
    list_format: Literal["auto", "hpa2021", "hpav18"] = Field(
        "auto", description="the list's form; auto = from its columns"
    )
    base_url: str | None = Field(
        None,
        description="where the images live, replacing the list's host (a mirror); null = the list's URLs "
        "(hpav18: http://v18.proteinatlas.org/images)",
    )
    dir: str | None = Field(
        None, description="output data set; defaults to {paths.data}/{data.dataset}-external"
    )
    dry_run: bool = Field(
        False, description="print counts, bytes, disk and time at the chosen rate; fetch nothing (--dry-run)"
    )
    drop_in_trainset: bool = Field(True, description="drop images already in the competition's train set")
    cell_lines: list[str] | None = Field(
        default_factory=lambda: list(HPA2021_CELL_LINES),
        description="keep these cell lines (default: the competition's 17); null = every cell line",
    )
    keep_classes: list[int] = Field(
        default_factory=list,
        description="classes kept from any cell line (one 2021 team kept 11 Mitotic spindle and 15 Aggresome)",
    )
    max_images: int | None = Field(None, ge=1, description="fetch only the first this many selected images")
    size: int | None = Field(
        None, ge=64, description="store images at this side (area resampling); null = native size"
    )
    png_compression: int = Field(1, ge=0, le=9, description="zlib level of the stored PNGs")
    workers: int = Field(4, ge=1, description="images fetched at once (threads)")
    rate: float = Field(8.0, gt=0, description="requests per second at most, over all workers")
    timeout_s: float = Field(30.0, gt=0, description="connect and read timeout of one request, seconds")
    retries: int = Field(5, ge=0, description="retries of a request on timeouts, broken bodies, 429 and 5xx")
    backoff_s: float = Field(
        1.0, ge=0, description="exponential backoff factor between retries: backoff_s * 2**(n-1) seconds"
    )
    check_disk: bool = Field(
        True, description="refuse when the estimated storage exceeds the free disk space"
    )


class Config(Section):
    """The whole pipeline's settings. Each stage reads its own section."""

    name: str = Field("demo", description="the run: runs/<name>/, submissions/<name>/, Kaggle slugs")
    seed: int = Field(42, description="training seed (model init, data order, augmentations)")
    force: bool = Field(False, description="redo finished work (make ... FORCE=1)")
    paths: PathsConfig = Field(default_factory=PathsConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    folds: FoldsConfig = Field(default_factory=FoldsConfig)
    segment: SegmentConfig = Field(default_factory=SegmentConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    mil: MilConfig = Field(default_factory=MilConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    image_model: ImageModelConfig = Field(default_factory=ImageModelConfig)
    thresholds: ThresholdsConfig = Field(default_factory=ThresholdsConfig)
    refine: RefineConfig = Field(default_factory=RefineConfig)
    ablate: AblateConfig = Field(default_factory=AblateConfig)
    infer: InferConfig = Field(default_factory=InferConfig)
    kaggle: KaggleConfig = Field(default_factory=KaggleConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    weights: WeightsConfig = Field(default_factory=WeightsConfig)
    checks: ChecksConfig = Field(default_factory=ChecksConfig)
    external: ExternalConfig = Field(default_factory=ExternalConfig)

    @model_validator(mode="after")
    def _sources_join_folds(self) -> Config:
        """Every source of ``data.sources`` joins ``folds.external`` (the folds file covers the images a
        run trains on), with its own ``folds`` mode in ``folds.external_modes``. Idempotent."""
        if not self.data.sources:
            return self
        external, modes = list(self.folds.external), dict(self.folds.external_modes)
        for source in self.data.sources:
            if source.dir not in external:
                external.append(source.dir)
            if source.folds is not None and source.folds != self.folds.external_mode:
                modes[source.dir] = source.folds
        if external != self.folds.external:
            self.folds.external = external
        if modes != self.folds.external_modes:
            self.folds.external_modes = modes
        return self

    # -- derived locations -------------------------------------------------------------------------
    def path(self, relative: str | os.PathLike[str]) -> Path:
        """Resolve a configured path against ``paths.root``."""
        candidate = Path(relative)
        return candidate if candidate.is_absolute() else Path(self.paths.root) / candidate

    def rooted_weights(self) -> Config:
        """This config with its weight-file settings (``model.pretrained_file``,
        ``image_model.pretrained_file``, ``segment.cellpose.weights``, ``segment.sam.weights``) resolved
        against ``paths.root`` like every other path, so a project whose outputs live elsewhere finds the
        ``weights/`` that ``make weights`` wrote there."""

        def rooted(value: str | None) -> str | None:
            return None if value is None else str(self.path(Path(value).expanduser()))

        segment = self.segment.model_copy(
            update={
                "cellpose": self.segment.cellpose.model_copy(
                    update={"weights": rooted(self.segment.cellpose.weights)}
                ),
                "sam": self.segment.sam.model_copy(update={"weights": rooted(self.segment.sam.weights)}),
            }
        )
        model = self.model.model_copy(update={"pretrained_file": rooted(self.model.pretrained_file)})
        image_model = self.image_model.model_copy(
            update={"pretrained_file": rooted(self.image_model.pretrained_file)}
        )
        return self.model_copy(update={"segment": segment, "model": model, "image_model": image_model})

    @property
    def data_dir(self) -> Path:
        """Root of the dataset layout (``train/``, ``train.csv``, ...)."""
        return self.path(self.data.dir) if self.data.dir else self.path(self.paths.data) / self.data.dataset

    @property
    def cache_dir(self) -> Path:
        """``cache/<dataset>/<segment backend>/`` unless ``cache.dir`` is set."""
        if self.cache.dir:
            return self.path(self.cache.dir)
        return self.path(self.paths.cache) / self.data.dataset / self.segment.backend

    @property
    def image_cache_dir(self) -> Path:
        """``images_<image_model.size>/`` beside the cell cache (``cache/<dataset>/``): the whole images
        downscaled for the whole-image model, independent of the segmentation."""
        return self.cache_dir.parent / f"images_{self.image_model.size}"

    @property
    def image_model_dir(self) -> Path:
        """``runs/<name>/image_model/``: the whole-image model's folds, OOF table and thresholds."""
        return self.run_dir / "image_model"

    @property
    def run_dir(self) -> Path:
        """``runs/<name>/``: round 0 (inheritance + MIL) of a run; refinement rounds live inside it."""
        return self.path(self.paths.runs) / self.name

    def round_dir(self, round_: int) -> Path:
        """Where refinement round ``round_`` keeps its folds, OOF tables and thresholds (0 = the run)."""
        return self.run_dir if round_ == 0 else self.run_dir / f"round{round_}"

    @property
    def model_dir(self) -> Path:
        """The final round's folder: what thresholds, inference, evaluation and Kaggle datasets read."""
        return self.round_dir(self.refine.rounds)

    @property
    def submission_dir(self) -> Path:
        """Where ``make infer`` publishes: ``infer.output`` (or ``name``) under ``paths.submissions`` when it
        is a bare name, as given (against ``paths.root``) when it is a path such as ``submissions/x``."""
        output = self.infer.output or self.name
        if Path(output).is_absolute() or len(Path(output).parts) > 1:
            return self.path(output)
        return self.path(self.paths.submissions) / output

    @property
    def weights_dir(self) -> Path:
        """``weights/``: what ``make weights`` fetched, with its MANIFEST.json."""
        return self.path(self.weights.dir)

    @property
    def folds_file(self) -> Path:
        """``folds.file``, else the folds file of these fold settings (``FoldsConfig.own_name``)."""
        if self.folds.file:
            return self.path(self.folds.file)
        return self.path(self.paths.folds) / f"{self.data.dataset}{self.folds.own_name()}.csv"
