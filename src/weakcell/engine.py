"""The one training engine: every stage (cell model, MIL head, end-to-end dual head, refinement rounds)
trains through ``fit`` and predicts through ``predict``. Stage differences live in the model's output dict
and in a small ``evaluate`` callback, never in copied loops.

Contracts
---------
* Model: ``forward(batch: dict[str, Tensor]) -> dict[str, Tensor]`` with a scalar ``loss`` (a *mean* over
  the batch, so that gradient accumulation and DDP average exactly) plus anything else (``logits``,
  ``attention``, ``embeddings``...).
* Data: any map-style ``torch.utils.data.Dataset`` indexed by sample position (a cell, or an image =
  a bag). The engine draws positions and hands each batch's list of positions to the dataset:

  - a dataset with ``__getitems__(positions) -> dict`` (``weakcell.cache.loader.CellCrops``) reads the whole
    batch at once from memmaps; this is the fast path and needs no collate;
  - any other dataset returns one sample per ``__getitem__`` and is collated by ``collate``
    (default ``torch.utils.data.default_collate``; pass one that pads variable-size bags).

  Batches are dicts; the engine moves their tensors to the device (``non_blocking``) and makes every 4-D
  tensor (images, ``(B, C, H, W)``) channels_last when ``cfg.channels_last``.
* Batch size: ``cfg.batch_size`` samples per optimizer step over all processes. Each process runs
  ``batch_size / (grad_accum x world size)`` samples per forward, so one config trains the same weights on
  a laptop, with accumulation, or on 8 GPUs. The last incomplete batch of an epoch is dropped.
* Data order: epoch ``e`` visits the permutation ``default_rng((seed, e))`` of the positions: a pure
  function of (seed, epoch), which makes mid-epoch resume exact (the done batches are skipped).

Run folder (``out_dir``, written by rank 0 only)::

    last.pt      resumable checkpoint (weights-only loadable: tensors and plain containers)
    model.pt     final weights, a flat state dict of tensors (the EMA copy when cfg.ema is set)
    epochs.csv   epoch, step, lr, train_loss, val metrics, seconds, samples_per_s
    curves.png   losses, val metrics and learning rate per epoch

Exact resume holds for ``cfg.workers == 0``; with worker processes the data order is still exact, but
random augmentations drawn inside the workers restart from the workers' seeds.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from tqdm import tqdm

from weakcell.config import OUTPUT_INPUTS, TrainConfig
from weakcell.devices import auto_device
from weakcell.distributed import World, all_gather, all_reduce_sum, barrier, setup
from weakcell.errors import StageError
from weakcell.weights import WeightsError, load_weights_only

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
# Optimizer steps between progress-bar loss updates; reading the loss is a CPU-GPU sync point.
POSTFIX_EVERY = 25
# curves.png is redrawn at most this often during a fit (and always after its last epoch): a matplotlib
# save costs ~0.25 s on a laptop core, twice a MIL epoch, so drawing it every epoch was ~15 % of a fold.
PLOT_EVERY_S = 30.0
# Columns of epochs.csv that measure the machine, not the training (they differ between identical runs).
TIMING_COLUMNS = ("seconds", "samples_per_s")

Batch = dict[str, Any]
Evaluate = Callable[[dict[str, np.ndarray]], Mapping[str, float]]
Collate = Callable[[Any], Batch]


# -- device, precision --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Runtime:
    """Where and how tensors are computed: device, autocast dtype (None = fp32), memory format, world."""

    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    world: World

    def autocast(self) -> torch.autocast:
        return torch.autocast(
            self.device.type, dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp_dtype is not None
        )


def resolve_runtime(cfg: TrainConfig) -> Runtime:
    """Resolve ``cfg.device`` and ``cfg.amp`` on this machine and join the torchrun group if launched by it.

    ``amp=auto`` is bf16 on CUDA that supports it (Ampere+), fp16 with loss scaling on older GPUs, and fp32
    on CPU, where bf16 autocast is slower than fp32 without AMX and costs bitwise reproducibility.
    """
    # auto: a GPU only when this torch has kernels for it (weakcell.devices), else one warning and CPU
    kind = auto_device().type if cfg.device == "auto" else cfg.device
    if kind == "cuda" and not torch.cuda.is_available():
        raise StageError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    world = setup(kind)
    if kind == "cuda":
        device = torch.device("cuda", world.local_rank if world.size > 1 else torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    amp = cfg.amp
    if amp == "auto":
        amp = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if kind == "cuda" else "off"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]
    return Runtime(device, dtype, cfg.channels_last, world)


def to_device(batch: Batch, runtime: Runtime) -> Batch:
    """Move a batch's tensors to the device (asynchronously from pinned memory); 4-D tensors become
    channels_last when asked. Other values (lists of IDs...) pass through."""
    moved = {}
    for name, value in batch.items():
        if isinstance(value, torch.Tensor):
            layout = (
                torch.channels_last if runtime.channels_last and value.ndim == 4 else torch.preserve_format
            )
            value = value.to(runtime.device, non_blocking=True, memory_format=layout)
        moved[name] = value
    return moved


def _prepare(model: nn.Module, runtime: Runtime) -> nn.Module:
    model.to(runtime.device)
    if runtime.channels_last:
        model.to(memory_format=torch.channels_last)  # only 4-D weights (convolutions) change layout
    return model


# -- data order ---------------------------------------------------------------------------------------


def epoch_order(
    n_samples: int, batch_size: int, seed: int, epoch: int, weights: np.ndarray | None = None
) -> np.ndarray:
    """The global batches of one epoch: ``(steps, batch_size)`` positions, a pure function of
    (seed, epoch); the last incomplete batch is dropped. With ``weights`` (one per sample) positions are
    drawn with replacement in proportion to them (oversampling rare classes), still a pure function."""
    steps = n_samples // batch_size
    rng = np.random.default_rng((seed, epoch))
    if weights is None:
        drawn = rng.permutation(n_samples)[: steps * batch_size]
    else:
        drawn = rng.choice(n_samples, size=steps * batch_size, replace=True, p=weights / weights.sum())
    return drawn.reshape(steps, batch_size)


class EpochBatches(Sampler[list[int]]):
    """Batch sampler of this process's micro-batches, from step ``start_step`` of epoch ``epoch``.

    Each global batch of ``epoch_order`` is cut into ``grad_accum`` micro-batches, and each micro-batch
    into ``world.size`` equal shards; rank r takes shard r. So the samples of one optimizer step are the
    same whatever the number of processes or accumulation steps (DistributedSampler shards an epoch instead,
    which changes the batches with the world size).
    """

    def __init__(
        self,
        n_samples: int,
        batch_size: int,
        grad_accum: int,
        world: World,
        seed: int,
        weights: np.ndarray | None = None,
    ) -> None:
        if batch_size % (grad_accum * world.size):
            raise StageError(
                f"train.batch_size={batch_size} must be a multiple of train.grad_accum x processes "
                f"= {grad_accum} x {world.size}"
            )
        self.n_samples, self.batch_size, self.grad_accum = n_samples, batch_size, grad_accum
        self.world, self.seed, self.weights = world, seed, weights
        self.epoch, self.start_step = 0, 0

    @property
    def steps(self) -> int:
        """Optimizer steps per epoch."""
        return self.n_samples // self.batch_size

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Iterate epoch ``epoch`` from optimizer step ``start_step`` (a resume skips the steps done)."""
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.grad_accum

    def __iter__(self) -> Iterator[list[int]]:
        order = epoch_order(self.n_samples, self.batch_size, self.seed, self.epoch, self.weights)
        micro = self.batch_size // (self.grad_accum * self.world.size)
        for batch in order[self.start_step :]:
            # (grad_accum, world, micro): micro-batch j of rank r is shards[j, r]
            shards = batch.reshape(self.grad_accum, self.world.size, micro)
            for positions in shards[:, self.world.rank]:
                yield positions.tolist()


def _loader(
    data: Dataset,
    batches: Sampler[list[int]] | list[list[int]],
    collate: Collate | None,
    cfg: TrainConfig,
    runtime: Runtime,
    seed: int,
) -> DataLoader:
    """A DataLoader over explicit batches of positions; ``__getitems__`` datasets are already collated."""
    if collate is None:
        collate = _keep if hasattr(data, "__getitems__") else default_collate
    return DataLoader(
        data,
        batch_sampler=batches,
        collate_fn=collate,
        num_workers=cfg.workers,
        pin_memory=runtime.device.type == "cuda",
        persistent_workers=cfg.workers > 0,
        # The workers' base seed comes from this generator, not from the global RNG, so starting an
        # epoch consumes no global randomness (needed for exact resume).
        generator=torch.Generator().manual_seed(seed),
    )


def _keep(batch: Any) -> Any:
    return batch


def prefetched(loader: DataLoader, runtime: Runtime) -> Iterator[Batch]:
    """The batches of ``loader``, each read (and on the CPU moved to ``channels_last``) one step ahead in
    a background thread: reading, augmenting and copying batch k+1 overlaps the model's work on batch k.
    Numpy and torch release the GIL in their bulk work, so on 2 cores the loader fills the gaps the model's
    threads leave (Python, the optimizer step) instead of adding its time to every step.

    Only for datasets that draw no randomness from the global RNGs (``thread_safe``: ``CellCrops`` seeds
    each batch's augmentations from the batch itself), so two threads never interleave their draws and a
    resumed run still sees the batches it would have seen."""
    from concurrent.futures import ThreadPoolExecutor

    batches = iter(loader)
    on_cpu = runtime.device.type == "cpu"  # a CUDA copy stays on the main thread's stream

    def read() -> Batch | None:
        batch = next(batches, None)
        return to_device(batch, runtime) if batch is not None and on_cpu else batch

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="weakcell-prefetch") as pool:
        pending = pool.submit(read)
        while (batch := pending.result()) is not None:
            pending = pool.submit(read)
            yield batch


def _size(data: Dataset) -> int:
    return len(data)  # type: ignore[arg-type]  # torch's Dataset type omits the __len__ every map-style one has


# -- optimisation -------------------------------------------------------------------------------------


def cosine_lr(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up to ``peak`` over
    ``warmup_steps`` steps, then half a cosine down to 0 at ``total_steps``."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight matrices decay, biases and norm scales (1-D) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=cfg.lr, fused=device.type == "cuda" or None
    )


class ModelEma:
    """Exponential moving average of a model's weights (``module`` is the averaged copy).

    The decay ramps up as ``min(decay, (1 + t) / (10 + t))`` over steps t, so that a short run's average is
    not dominated by the random initial weights.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        averaged, current = self.module.state_dict(), model.state_dict()
        floats = [name for name, value in averaged.items() if value.is_floating_point()]
        torch._foreach_lerp_([averaged[k] for k in floats], [current[k] for k in floats], 1.0 - decay)
        for name, value in averaged.items():
            if not value.is_floating_point():  # counters such as BatchNorm's num_batches_tracked
                value.copy_(current[name])


# -- checkpoints --------------------------------------------------------------------------------------


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path.tmp``, flushed to disk, then renamed: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint without running pickled code (``weights_only=True``), tensors on the CPU. A file
    that does not load (truncated, corrupt, holding pickled code) is one ``WeightsError`` line: delete it or
    start over with FORCE=1."""
    fix = f"delete {path} to start that training over, or rerun with FORCE=1"
    state = load_weights_only(Path(path), "cpu", fix)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise WeightsError(f"{path} is not a resumable weakcell checkpoint; {fix}")
    return state


def _rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as tensors and plain values (weights-only loadable)."""
    version, internal, gauss = random.getstate()
    # the legacy global numpy RNG is the one third-party augmentations draw from
    _, keys, position, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    return {
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
        "numpy": [
            torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            int(position),
            int(has_gauss),
            float(cached),
        ],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal.tolist()), gauss))
    keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), position, has_gauss, cached))  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002
    torch.manual_seed(seed)


def _check_resumable(state: Mapping[str, Any], path: Path, cfg: TrainConfig, seed: int, world: World) -> None:
    """A checkpoint resumes only the run that wrote it: same train settings, data seed and world size."""
    # a key the checkpoint lacks was added to the schema later: the run had its default (which keeps the
    # old behaviour), so checkpoints written before a new setting still resume; the train settings may
    # change where the run executes (device, workers), not what it computes
    saved = type(cfg)().model_dump(mode="json") | dict(state["train"])
    problems = OUTPUT_INPUTS["checkpoint"].changed({"train": saved}, {"train": cfg.model_dump(mode="json")})
    if state["data_seed"] != seed:
        problems.append(f"seed: {state['data_seed']} -> {seed}")
    if state["world_size"] != world.size:
        problems.append(f"processes: {state['world_size']} -> {world.size}")
    if problems:
        raise StageError(
            f"{path} belongs to another run ({'; '.join(problems)}); restore the settings to resume it, "
            "or start over with force (FORCE=1)"
        )


# -- logs ---------------------------------------------------------------------------------------------


def format_duration(seconds: float) -> str:
    """``42 s``, ``3.5 min`` or ``1.2 h``: an estimate, to the precision it has."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def write_epoch_log(history: list[dict[str, float]], out_dir: Path) -> None:
    """``epochs.csv``, one row per epoch, rewritten whole (atomically) after each epoch."""
    target = out_dir / "epochs.csv"
    tmp = target.with_name(target.name + ".tmp")
    pd.DataFrame(history).to_csv(tmp, index=False)
    os.replace(tmp, target)


def plot_curves(history: list[dict[str, float]], out_dir: Path) -> None:
    """``curves.png``: losses, other val metrics and the learning rate against epochs."""
    frame = pd.DataFrame(history)
    losses = [c for c in frame.columns if c.endswith("loss")]
    metrics = [c for c in frame.columns if c not in {"epoch", "step", "lr", *losses, *TIMING_COLUMNS}]
    figure = Figure(figsize=(13, 3.8))  # the OO API: no pyplot, no GUI backend
    # a fixed layout: matplotlib's constrained layout costs ~0.5 s per save on a laptop core
    axes = figure.subplots(1, 3, gridspec_kw={"left": 0.05, "right": 0.98, "bottom": 0.14, "wspace": 0.25})
    for ax, columns, title in (
        (axes[0], losses, "loss"),
        (axes[1], metrics, "validation"),
        (axes[2], ["lr"], "lr"),
    ):
        for column in columns:
            measured = frame[["epoch", column]].dropna()  # validation runs every train.validate_every epochs
            ax.plot(measured["epoch"], measured[column], marker="o", label=column)
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if columns:
            ax.legend(fontsize=8)
    target = out_dir / "curves.png"
    tmp = target.with_name(target.name + ".tmp")
    figure.savefig(tmp, format="png", dpi=90)
    os.replace(tmp, target)


# -- inference ----------------------------------------------------------------------------------------


def _to_numpy(value: torch.Tensor) -> np.ndarray:
    value = value.detach()
    return (value.float() if value.is_floating_point() else value).cpu().numpy()  # bf16 has no numpy dtype


def _prediction_plan(
    data: Dataset, runtime: Runtime, cfg: TrainConfig, collate: Collate | None
) -> tuple[list[list[int]], DataLoader]:
    """This process's batches of ``data`` in order, and a loader over them (iterable again and again)."""
    world = runtime.world
    shard = np.array_split(np.arange(_size(data)), world.size)[world.rank]
    # No activations are kept for a backward pass, so evaluation runs the process's whole share of a batch.
    size = max(1, cfg.batch_size // world.size)
    batches = [shard[i : i + size].tolist() for i in range(0, len(shard), size)]
    return batches, _loader(data, batches, collate, cfg, runtime, seed=0)


@torch.inference_mode()
def _predict(
    model: nn.Module,
    data: Dataset,
    runtime: Runtime,
    cfg: TrainConfig,
    collate: Collate | None,
    batch_keys: Sequence[str],
    plan: tuple[list[list[int]], DataLoader] | None = None,
) -> dict[str, np.ndarray]:
    """Forward ``data`` in order (each process a contiguous shard, gathered back in rank order).

    ``plan`` (from ``_prediction_plan``) reuses one loader across calls, so validating every epoch does
    not start ``train.workers`` new worker processes each time."""
    world = runtime.world
    batches, loader = plan or _prediction_plan(data, runtime, cfg, collate)
    was_training = model.training
    model.eval()
    pieces: dict[str, list[np.ndarray]] = {}
    sums: dict[str, torch.Tensor] = {}  # scalar outputs x batch samples, summed on the device
    for positions, batch in zip(batches, loader):
        for name in batch_keys:
            pieces.setdefault(name, []).append(np.asarray(batch[name]))
        with runtime.autocast():
            outputs = model(to_device(batch, runtime))
        for name, value in outputs.items():
            if not isinstance(value, torch.Tensor):
                continue
            if value.ndim == 0:
                sums[name] = sums.get(name, 0) + value.detach().float() * len(positions)
            else:
                pieces.setdefault(name, []).append(_to_numpy(value))
    model.train(was_training)
    local = (
        {name: np.concatenate(parts) for name, parts in pieces.items()},
        {name: total.item() for name, total in sums.items()},  # one sync per output, at the end
        sum(len(positions) for positions in batches),
    )
    ranks = all_gather(local, world)
    names = list(dict.fromkeys(name for arrays, _, _ in ranks for name in arrays))
    result = {
        name: np.concatenate([arrays[name] for arrays, _, _ in ranks if name in arrays]) for name in names
    }
    samples = sum(count for _, _, count in ranks)
    for name in dict.fromkeys(name for _, totals, _ in ranks for name in totals):
        result[name] = np.asarray(sum(totals.get(name, 0.0) for _, totals, _ in ranks) / max(samples, 1))
    return result


def predict(
    model: nn.Module,
    data: Dataset,
    cfg: TrainConfig,
    *,
    collate: Collate | None = None,
    batch_keys: Sequence[str] = (),
) -> dict[str, np.ndarray]:
    """Run ``model`` over ``data`` in data order with the training precision and memory format.

    Returns every tensor output of the model concatenated along dim 0 (e.g. ``logits`` (N, C),
    ``embeddings`` (N, D); outputs must agree beyond dim 0), scalar outputs such as ``loss`` as their
    sample-weighted mean (0-d arrays), and the batch entries named in ``batch_keys`` (e.g. ``index``).
    Under torchrun each process predicts a shard and every process gets the whole result. Floating
    outputs are float32. The model is moved to the configured device (and memory format) in place.
    """
    runtime = resolve_runtime(cfg)
    return _predict(_prepare(model, runtime), data, runtime, cfg, collate, batch_keys)


# -- training -----------------------------------------------------------------------------------------


@dataclass
class FitResult:
    """What ``fit`` leaves behind: the weights file, the epoch log rows, and whether work was skipped."""

    weights: Path
    history: list[dict[str, float]]
    skipped: bool = False
    resumed: bool = False

    @property
    def metrics(self) -> dict[str, float]:
        """The last epoch's row of the epoch log."""
        return self.history[-1] if self.history else {}


def fit(
    model: nn.Module,
    train_data: Dataset,
    val_data: Dataset | None,
    cfg: TrainConfig,
    out_dir: str | os.PathLike[str],
    *,
    seed: int,
    evaluate: Evaluate | None = None,
    batch_keys: Sequence[str] = (),
    collate: Collate | None = None,
    config: Mapping[str, Any] | None = None,
    force: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> FitResult:
    """Train ``model`` on ``train_data`` for ``cfg.epochs`` epochs; validate on ``val_data`` after each.

    * ``seed`` fixes the data order (epoch e = permutation of (seed, e)) and seeds the RNGs of a fresh run
      (process r gets seed + r); the caller seeds model initialisation itself.
    * ``evaluate(outputs) -> {name: value}`` scores ``predict``'s outputs on ``val_data`` (model outputs
      plus the batch entries named in ``batch_keys``, whole val set on every process); the row also gets
      ``val_loss`` when the model returns a loss. Without ``val_data`` no validation runs.
    * ``config`` (the resolved pipeline config as a plain dict) is stored in every checkpoint.
    * A run folder with an unfinished ``last.pt`` resumes exactly; a finished one returns at once with
      ``skipped=True``; ``force=True`` starts over.
    * ``on_step(global_step)`` is called after every optimizer step (and its checkpoint, if any).

    Returns a ``FitResult``; ``out_dir/model.pt`` holds the final (EMA when on) weights.
    """
    out_dir = Path(out_dir)
    runtime = resolve_runtime(cfg)
    world = runtime.world
    last_path, weights_path = out_dir / "last.pt", out_dir / "model.pt"

    state = None
    if last_path.exists() and not force:
        state = load_checkpoint(last_path)
        _check_resumable(state, last_path, cfg, seed, world)
        if state["epoch"] >= cfg.epochs and weights_path.exists():
            if world.is_main:
                print(f"fit: {out_dir} is finished ({cfg.epochs} epochs), skipping (force to redo)")
            return FitResult(weights_path, state["history"], skipped=True)
    if world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)

    # -- data: the epoch's global batches, cut into this process's micro-batches
    # A dataset may carry ``sample_weights`` (one per sample) to be drawn in proportion to them.
    weights = getattr(train_data, "sample_weights", None)
    sampler = EpochBatches(_size(train_data), cfg.batch_size, cfg.grad_accum, world, seed, weights)
    steps_per_epoch = sampler.steps
    if steps_per_epoch == 0:
        raise StageError(
            f"{_size(train_data)} training samples make no full batch of train.batch_size={cfg.batch_size}"
        )
    loader = _loader(train_data, sampler, collate, cfg, runtime, seed)
    val_plan = _prediction_plan(val_data, runtime, cfg, collate) if val_data is not None else None
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)

    # -- model, optimizer, loss scaler (fp16 only: bf16 has fp32's exponent range), EMA
    model = _prepare(model, runtime)
    optimizer = make_optimizer(model, cfg, runtime.device)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.amp_dtype == torch.float16)
    ema = ModelEma(model, cfg.ema) if cfg.ema else None

    start_epoch, done_steps, history = 0, 0, []
    loss_sum = torch.zeros((), device=runtime.device)  # sum of micro-batch mean losses, this process
    epoch_seconds = 0.0  # time spent on the current epoch before a resume
    if state is None:
        _seed_everything(seed + world.rank)
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.module.load_state_dict(state["ema"])
        start_epoch, done_steps, history = state["epoch"], state["step_in_epoch"], state["history"]
        epoch_seconds = state["epoch_seconds"]
        mine = state["processes"][world.rank]
        loss_sum += mine["loss_sum"].to(runtime.device)
        _set_rng_state(mine["rng"])
        if world.is_main:
            print(f"fit: resuming {out_dir} at epoch {start_epoch + 1}, step {done_steps}/{steps_per_epoch}")

    trained: Callable[[Batch], dict[str, torch.Tensor]] = model  # what the training forward calls
    if cfg.compile and runtime.device.type == "cuda":
        trained = torch.compile(model)
    ddp = None
    if world.size > 1:
        trained = ddp = DistributedDataParallel(
            trained, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None
        )

    def save(epoch: int, done_steps: int, seconds: float) -> None:
        """Write last.pt; a collective (every process sends its RNG state), rank 0 writes."""
        processes = all_gather({"rng": _rng_state(), "loss_sum": loss_sum.detach().cpu()}, world)
        if not world.is_main:
            return
        payload = {
            "format": CHECKPOINT_FORMAT,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "ema": ema.module.state_dict() if ema else None,
            "epoch": epoch,
            "step_in_epoch": done_steps,
            "epoch_seconds": seconds,
            "history": history,
            "processes": processes,
            "data_seed": seed,
            "world_size": world.size,
            "train": cfg.model_dump(mode="json"),
            "config": dict(config) if config is not None else None,
        }
        atomic_save(payload, last_path)

    global_step = start_epoch * steps_per_epoch + done_steps
    lr = cosine_lr(max(global_step - 1, 0), total_steps, warmup_steps, cfg.lr)
    started = last_plot = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        sampler.set_epoch(epoch, start_step=done_steps)
        overlap = cfg.prefetch and cfg.workers == 0 and getattr(train_data, "thread_safe", False)
        micro_batches = prefetched(loader, runtime) if overlap else iter(loader)
        epoch_started = time.perf_counter()
        progress = tqdm(
            total=steps_per_epoch,
            initial=done_steps,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            leave=False,
            dynamic_ncols=True,
            disable=not world.is_main or not sys.stderr.isatty(),
        )
        for step in range(done_steps, steps_per_epoch):
            lr = cosine_lr(global_step, total_steps, warmup_steps, cfg.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for micro in range(cfg.grad_accum):
                batch = to_device(next(micro_batches), runtime)  # a no-op for a batch already moved
                # DDP all-reduces gradients only on the step's last micro-batch
                last_micro = micro == cfg.grad_accum - 1
                with ddp.no_sync() if ddp is not None and not last_micro else nullcontext():
                    with runtime.autocast():
                        loss = trained(batch)["loss"]
                    # loss is a batch mean: / grad_accum makes the sum of micro-steps the global-batch mean
                    scaler.scale(loss / cfg.grad_accum).backward()
                loss_sum += loss.detach().float()  # stays on the device: no sync per step
            if cfg.grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(model, global_step)
            global_step += 1
            progress.update()
            if not progress.disable and global_step % POSTFIX_EVERY == 0:
                progress.set_postfix(loss=f"{loss.item():.4f}")  # a CPU-GPU sync point
            if (
                cfg.checkpoint_every
                and global_step % cfg.checkpoint_every == 0
                and step + 1 < steps_per_epoch
            ):
                save(epoch, step + 1, epoch_seconds + time.perf_counter() - epoch_started)
            if on_step is not None:
                on_step(global_step)
        progress.close()
        train_seconds = epoch_seconds + time.perf_counter() - epoch_started

        # -- epoch end: reduce the train loss over processes, validate, log, checkpoint
        micro_steps = steps_per_epoch * cfg.grad_accum * world.size
        train_loss = all_reduce_sum(loss_sum.clone(), world).item() / micro_steps
        row: dict[str, float] = {"epoch": epoch + 1, "step": global_step, "lr": lr, "train_loss": train_loss}
        # validation only shows the curves: every train.validate_every epochs, and always after the last
        if val_data is not None and ((epoch + 1) % cfg.validate_every == 0 or epoch + 1 == cfg.epochs):
            outputs = _predict(
                ema.module if ema else model, val_data, runtime, cfg, collate, batch_keys, val_plan
            )
            if "loss" in outputs:
                row["val_loss"] = float(outputs["loss"])
            if evaluate is not None:
                row.update({name: float(value) for name, value in evaluate(outputs).items()})
        row["seconds"] = round(epoch_seconds + time.perf_counter() - epoch_started, 3)  # with validation
        row["samples_per_s"] = round(
            steps_per_epoch * cfg.batch_size / max(train_seconds, 1e-9), 1
        )  # training
        history.append(row)
        loss_sum.zero_()
        done_steps, epoch_seconds = 0, 0.0
        save(epoch + 1, 0, 0.0)
        if world.is_main:
            write_epoch_log(history, out_dir)
            if epoch + 1 == cfg.epochs or time.perf_counter() - last_plot >= PLOT_EVERY_S:
                plot_curves(history, out_dir)
                last_plot = time.perf_counter()
            log.info(
                "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
            )
            if epoch == start_epoch and epoch + 1 < cfg.epochs:  # the first epoch of this call: an estimate
                left = row["seconds"] * (cfg.epochs - epoch - 1)
                print(
                    f"fit: epoch {epoch + 1} of {cfg.epochs} took {row['seconds']:.0f} s "
                    f"({row['samples_per_s']:.0f} samples/s); about {format_duration(left)} left for {out_dir}",
                    flush=True,
                )

    if world.is_main:
        atomic_save((ema.module if ema else model).state_dict(), weights_path)
        scores = "  ".join(
            f"{k} {v:.4g}"
            for k, v in history[-1].items()
            if k not in ("epoch", "step", "lr", *TIMING_COLUMNS)
        )
        print(
            f"fit: {cfg.epochs} epochs ({total_steps} steps) in {time.perf_counter() - started:.1f} s, {scores}"
            f" -> {weights_path}, epochs.csv, curves.png"
        )
    barrier(world)  # rank 0 has written model.pt: every process may read it from here on
    return FitResult(weights_path, history, resumed=state is not None)
