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

Its parts: ``weakcell.runtime`` (device, precision), ``weakcell.batches`` (the data order),
``weakcell.checkpoints`` (``last.pt``, RNG states, what may resume), ``weakcell.epoch_log`` (``epochs.csv``,
``curves.png``). Here: the optimisation, ``predict`` and ``fit``, whose steps (``_set_up``,
``_start_or_resume``, ``_train_epoch``, ``_end_epoch``, ``_log_epoch``, ``_finish``) share one ``_Fit``
state. Over 400 lines on purpose: those steps are one loop read top to bottom, and ``predict`` is the
same loop's forward pass (validation runs it every ``validate_every`` epochs); splitting them apart would
scatter the loop.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from weakcell.batches import Collate, EpochBatches, batch_loader, dataset_size, overlaps, prefetched
from weakcell.checkpoints import (
    CHECKPOINT_FORMAT,
    atomic_save,
    check_resumable,
    load_checkpoint,
    rng_state,
    seed_everything,
    set_rng_state,
)
from weakcell.config import TrainConfig
from weakcell.distributed import World, all_gather, all_reduce_sum, barrier
from weakcell.epoch_log import TIMING_COLUMNS, format_duration, plot_curves, write_epoch_log
from weakcell.errors import StageError
from weakcell.runtime import Batch, Runtime, prepare, resolve_runtime, to_device

log = logging.getLogger(__name__)

# Optimizer steps between progress-bar loss updates; reading the loss is a CPU-GPU sync point.
POSTFIX_EVERY = 25
# curves.png is redrawn at most this often during a fit (and always after its last epoch): a matplotlib
# save costs ~0.25 s on a laptop core, twice a MIL epoch, so drawing it every epoch was ~15 % of a fold.
PLOT_EVERY_S = 30.0
Evaluate = Callable[[dict[str, np.ndarray]], Mapping[str, float]]


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


# -- inference ----------------------------------------------------------------------------------------


def _to_numpy(value: torch.Tensor) -> np.ndarray:
    value = value.detach()
    return (value.float() if value.is_floating_point() else value).cpu().numpy()  # bf16 has no numpy dtype


def _prediction_plan(
    data: Dataset, runtime: Runtime, cfg: TrainConfig, collate: Collate | None
) -> tuple[list[list[int]], DataLoader]:
    """This process's batches of ``data`` in order, and a loader over them (iterable again and again)."""
    world = runtime.world
    shard = np.array_split(np.arange(dataset_size(data)), world.size)[world.rank]
    # No activations are kept for a backward pass, so evaluation runs the process's whole share of a batch.
    size = max(1, cfg.batch_size // world.size)
    batches = [shard[i : i + size].tolist() for i in range(0, len(shard), size)]
    return batches, batch_loader(data, batches, collate, cfg, runtime, seed=0)


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
    return _predict(prepare(model, runtime), data, runtime, cfg, collate, batch_keys)


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
    """Train ``model`` on ``train_data`` for ``cfg.epochs`` epochs; validate on ``val_data`` every
    ``cfg.validate_every`` epochs and after the last.

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
    last_path, weights_path = out_dir / "last.pt", out_dir / "model.pt"
    state = None
    if last_path.exists() and not force:
        state = load_checkpoint(last_path)
        check_resumable(state, last_path, cfg, seed, runtime.world)
        if state["epoch"] >= cfg.epochs and weights_path.exists():
            if runtime.world.is_main:
                print(f"fit: {out_dir} is finished ({cfg.epochs} epochs), skipping (force to redo)")
            return FitResult(weights_path, state["history"], skipped=True)
    if runtime.world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)

    run = _set_up(model, train_data, val_data, cfg, runtime, seed, collate, config, last_path)
    _start_or_resume(run, state)
    validation = _Validation(val_data, evaluate, batch_keys, collate)
    global_step = run.start_epoch * run.steps_per_epoch + run.done_steps
    step = _Progress(
        global_step, cosine_lr(max(global_step - 1, 0), run.total_steps, run.warmup_steps, cfg.lr)
    )
    started = last_plot = time.perf_counter()
    for epoch in range(run.start_epoch, cfg.epochs):
        epoch_started, train_seconds = _train_epoch(run, epoch, step, on_step)
        row = _end_epoch(run, epoch, step, validation, epoch_started, train_seconds)
        last_plot = _log_epoch(run, row, epoch, last_plot)
    return _finish(run, weights_path, started, resumed=state is not None)


@dataclass
class _Fit:
    """Everything the steps of one ``fit`` share: what trains, on which batches, and where it stands.

    ``loss_sum``, ``history``, ``done_steps`` and ``epoch_seconds`` are the resumable position (last.pt)."""

    cfg: TrainConfig
    runtime: Runtime
    seed: int
    config: Mapping[str, Any] | None
    last_path: Path
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: ModelEma | None
    sampler: EpochBatches
    loader: DataLoader
    val_plan: tuple[list[list[int]], DataLoader] | None  # one loader over the val set for every epoch
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    loss_sum: torch.Tensor  # sum of micro-batch mean losses, this process, on the device
    trained: Callable[[Batch], dict[str, torch.Tensor]]  # what the training forward calls
    ddp: DistributedDataParallel | None = None
    start_epoch: int = 0
    done_steps: int = 0  # optimizer steps of the current epoch done before a resume
    epoch_seconds: float = 0.0  # time spent on the current epoch before a resume
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def world(self) -> World:
        return self.runtime.world

    @property
    def evaluated(self) -> nn.Module:
        """The weights validation and ``model.pt`` use: the EMA copy when on."""
        return self.ema.module if self.ema else self.model

    def save(self, epoch: int, done_steps: int, seconds: float) -> None:
        """Write last.pt; a collective (every process sends its RNG state), rank 0 writes."""
        processes = all_gather({"rng": rng_state(), "loss_sum": self.loss_sum.detach().cpu()}, self.world)
        if not self.world.is_main:
            return
        payload = {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema else None,
            "epoch": epoch,
            "step_in_epoch": done_steps,
            "epoch_seconds": seconds,
            "history": self.history,
            "processes": processes,
            "data_seed": self.seed,
            "world_size": self.world.size,
            "train": self.cfg.model_dump(mode="json"),
            "config": dict(self.config) if self.config is not None else None,
        }
        atomic_save(payload, self.last_path)


@dataclass
class _Progress:
    """Where the optimizer stands: its global step and the last learning rate it used."""

    global_step: int
    lr: float


@dataclass(frozen=True)
class _Validation:
    """What validating after an epoch needs: the data, the scorer and the batch entries it reads."""

    data: Dataset | None
    evaluate: Evaluate | None
    batch_keys: Sequence[str]
    collate: Collate | None


def _set_up(
    model: nn.Module,
    train_data: Dataset,
    val_data: Dataset | None,
    cfg: TrainConfig,
    runtime: Runtime,
    seed: int,
    collate: Collate | None,
    config: Mapping[str, Any] | None,
    last_path: Path,
) -> _Fit:
    """The epoch's global batches cut into this process's micro-batches, the model on its device, the
    optimizer, the loss scaler (fp16 only: bf16 has fp32's exponent range) and the EMA copy."""
    # A dataset may carry ``sample_weights`` (one per sample) to be drawn in proportion to them.
    weights = getattr(train_data, "sample_weights", None)
    sampler = EpochBatches(
        dataset_size(train_data), cfg.batch_size, cfg.grad_accum, runtime.world, seed, weights
    )
    steps_per_epoch = sampler.steps
    if steps_per_epoch == 0:
        raise StageError(
            f"{dataset_size(train_data)} training samples make no full batch of train.batch_size={cfg.batch_size}"
        )
    loader = batch_loader(train_data, sampler, collate, cfg, runtime, seed)
    val_plan = _prediction_plan(val_data, runtime, cfg, collate) if val_data is not None else None
    model = prepare(model, runtime)
    optimizer = make_optimizer(model, cfg, runtime.device)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.amp_dtype == torch.float16)
    ema = ModelEma(model, cfg.ema) if cfg.ema else None
    return _Fit(
        cfg=cfg,
        runtime=runtime,
        seed=seed,
        config=config,
        last_path=last_path,
        model=model,
        optimizer=optimizer,
        scaler=scaler,
        ema=ema,
        sampler=sampler,
        loader=loader,
        val_plan=val_plan,
        steps_per_epoch=steps_per_epoch,
        total_steps=cfg.epochs * steps_per_epoch,
        warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
        loss_sum=torch.zeros((), device=runtime.device),
        trained=model,  # compiled or wrapped for DDP once the weights are in place (_start_or_resume)
    )


def _start_or_resume(run: _Fit, state: dict[str, Any] | None) -> None:
    """Seed a fresh run, or restore a checkpoint's weights, optimizer, position and RNG states exactly;
    then wrap the model for the training forward (compiled on CUDA when asked, DDP under torchrun)."""
    world = run.world
    if state is None:
        seed_everything(run.seed + world.rank)
    else:
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.scaler.load_state_dict(state["scaler"])
        if run.ema is not None:
            run.ema.module.load_state_dict(state["ema"])
        run.start_epoch, run.done_steps, run.history = (
            state["epoch"],
            state["step_in_epoch"],
            state["history"],
        )
        run.epoch_seconds = state["epoch_seconds"]
        mine = state["processes"][world.rank]
        run.loss_sum += mine["loss_sum"].to(run.runtime.device)
        set_rng_state(mine["rng"])
        if world.is_main:
            print(
                f"fit: resuming {run.last_path.parent} at epoch {run.start_epoch + 1}, "
                f"step {run.done_steps}/{run.steps_per_epoch}"
            )
    if run.cfg.compile and run.runtime.device.type == "cuda":
        run.trained = torch.compile(run.model)
    if world.size > 1:
        device_ids = [run.runtime.device.index] if run.runtime.device.type == "cuda" else None
        run.trained = run.ddp = DistributedDataParallel(run.trained, device_ids=device_ids)


def _train_epoch(
    run: _Fit, epoch: int, step: _Progress, on_step: Callable[[int], None] | None
) -> tuple[float, float]:
    """The optimizer steps of epoch ``epoch`` from ``run.done_steps`` on (a resume skips the steps done),
    checkpointing every ``cfg.checkpoint_every`` steps. Returns when the epoch's batches started
    (``perf_counter``) and the epoch's training seconds (with the time before a resume)."""
    cfg, model, optimizer, scaler = run.cfg, run.model, run.optimizer, run.scaler
    model.train()
    run.sampler.set_epoch(epoch, start_step=run.done_steps)
    # with no worker processes, the next batch is read in a thread while the model computes this one
    overlap = overlaps(run.loader.dataset, cfg)
    micro_batches = prefetched(run.loader, run.runtime) if overlap else iter(run.loader)
    epoch_started = time.perf_counter()
    progress = tqdm(
        total=run.steps_per_epoch,
        initial=run.done_steps,
        desc=f"epoch {epoch + 1}/{cfg.epochs}",
        leave=False,
        dynamic_ncols=True,
        disable=not run.world.is_main or not sys.stderr.isatty(),
    )
    for step_in_epoch in range(run.done_steps, run.steps_per_epoch):
        step.lr = cosine_lr(step.global_step, run.total_steps, run.warmup_steps, cfg.lr)
        for group in optimizer.param_groups:
            group["lr"] = step.lr
        for micro in range(cfg.grad_accum):
            batch = to_device(next(micro_batches), run.runtime)  # a no-op for a batch already moved
            # DDP all-reduces gradients only on the step's last micro-batch
            last_micro = micro == cfg.grad_accum - 1
            with run.ddp.no_sync() if run.ddp is not None and not last_micro else nullcontext():
                with run.runtime.autocast():
                    loss = run.trained(batch)["loss"]
                # loss is a batch mean: / grad_accum makes the sum of micro-steps the global-batch mean
                scaler.scale(loss / cfg.grad_accum).backward()
            run.loss_sum += loss.detach().float()  # stays on the device: no sync per step
        if cfg.grad_clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if run.ema is not None:
            run.ema.update(model, step.global_step)
        step.global_step += 1
        progress.update()
        if not progress.disable and step.global_step % POSTFIX_EVERY == 0:
            progress.set_postfix(loss=f"{loss.item():.4f}")  # a CPU-GPU sync point
        if (
            cfg.checkpoint_every
            and step.global_step % cfg.checkpoint_every == 0
            and step_in_epoch + 1 < run.steps_per_epoch
        ):
            run.save(epoch, step_in_epoch + 1, run.epoch_seconds + time.perf_counter() - epoch_started)
        if on_step is not None:
            on_step(step.global_step)
    progress.close()
    return epoch_started, run.epoch_seconds + time.perf_counter() - epoch_started


def _end_epoch(
    run: _Fit,
    epoch: int,
    step: _Progress,
    validation: _Validation,
    epoch_started: float,
    train_seconds: float,
) -> dict[str, float]:
    """Reduce the train loss over processes, validate, append the epoch's row to the history and
    checkpoint the epoch's end; the row."""
    cfg = run.cfg
    micro_steps = run.steps_per_epoch * cfg.grad_accum * run.world.size
    train_loss = all_reduce_sum(run.loss_sum.clone(), run.world).item() / micro_steps
    row: dict[str, float] = {
        "epoch": epoch + 1,
        "step": step.global_step,
        "lr": step.lr,
        "train_loss": train_loss,
    }
    # validation only shows the curves: every train.validate_every epochs, and always after the last
    if validation.data is not None and ((epoch + 1) % cfg.validate_every == 0 or epoch + 1 == cfg.epochs):
        outputs = _predict(
            run.evaluated,
            validation.data,
            run.runtime,
            cfg,
            validation.collate,
            validation.batch_keys,
            run.val_plan,
        )
        if "loss" in outputs:
            row["val_loss"] = float(outputs["loss"])
        if validation.evaluate is not None:
            row.update({name: float(value) for name, value in validation.evaluate(outputs).items()})
    row["seconds"] = round(run.epoch_seconds + time.perf_counter() - epoch_started, 3)  # with validation
    # training alone: validation is not in samples_per_s
    row["samples_per_s"] = round(run.steps_per_epoch * cfg.batch_size / max(train_seconds, 1e-9), 1)
    run.history.append(row)
    run.loss_sum.zero_()
    run.done_steps, run.epoch_seconds = 0, 0.0
    run.save(epoch + 1, 0, 0.0)
    return row


def _log_epoch(run: _Fit, row: dict[str, float], epoch: int, last_plot: float) -> float:
    """Rewrite ``epochs.csv``, redraw ``curves.png`` (at most every ``PLOT_EVERY_S`` and after the last
    epoch), log the row and, after the first epoch of this call, print an estimate of the time left
    (rank 0); when the curves were last drawn."""
    if not run.world.is_main:
        return last_plot
    out_dir = run.last_path.parent
    write_epoch_log(run.history, out_dir)
    if epoch + 1 == run.cfg.epochs or time.perf_counter() - last_plot >= PLOT_EVERY_S:
        plot_curves(run.history, out_dir)
        last_plot = time.perf_counter()
    log.info("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    if epoch == run.start_epoch and epoch + 1 < run.cfg.epochs:  # the first epoch of this call: an estimate
        left = row["seconds"] * (run.cfg.epochs - epoch - 1)
        print(
            f"fit: epoch {epoch + 1} of {run.cfg.epochs} took {row['seconds']:.0f} s "
            f"({row['samples_per_s']:.0f} samples/s); about {format_duration(left)} left for {out_dir}",
            flush=True,
        )
    return last_plot


def _finish(run: _Fit, weights_path: Path, started: float, resumed: bool) -> FitResult:
    """Write ``model.pt`` (the EMA copy when on) and the one-line summary (rank 0); every process waits
    for it."""
    if run.world.is_main:
        atomic_save(run.evaluated.state_dict(), weights_path)
        scores = "  ".join(
            f"{k} {v:.4g}"
            for k, v in run.history[-1].items()
            if k not in ("epoch", "step", "lr", *TIMING_COLUMNS)
        )
        print(
            f"fit: {run.cfg.epochs} epochs ({run.total_steps} steps) in {time.perf_counter() - started:.1f} s, "
            f"{scores} -> {weights_path}, epochs.csv, curves.png"
        )
    barrier(run.world)  # rank 0 has written model.pt: every process may read it from here on
    return FitResult(weights_path, run.history, resumed=resumed)
