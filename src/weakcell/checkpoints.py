"""The engine's checkpoints: ``last.pt`` (weights, optimizer, position in the epoch, every process's RNG
states) written atomically and read weights-only, and the rule that one resumes only the run that wrote it.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from weakcell.config import OUTPUT_INPUTS, TrainConfig
from weakcell.distributed import World
from weakcell.errors import StageError
from weakcell.outputs import atomic_write
from weakcell.weights import WeightsError, load_weights_only

CHECKPOINT_FORMAT = 1
# What a resumable checkpoint holds besides its format (``engine``'s ``save``): a resume reads every one.
CHECKPOINT_KEYS = (
    "model",
    "optimizer",
    "scaler",
    "ema",
    "epoch",
    "step_in_epoch",
    "epoch_seconds",
    "history",
    "processes",
    "data_seed",
    "world_size",
    "train",
)


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path.tmp``, flushed to disk, then renamed (``outputs.atomic_write``): a reader
    never sees half a file, a failed save leaves no temporary, and a write the machine refuses (a full
    disk) is one ``OutputError`` line naming ``path``."""

    def write(tmp: Path) -> None:
        # through a Python file handle: a failed write is then an OSError that torch's error chains
        with open(tmp, "wb") as handle:
            try:
                torch.save(obj, handle)
            except RuntimeError as err:  # torch's zip writer: "[enforce fail at inline_container.cc] ..."
                cause = _os_error_behind(err)
                if cause is None:
                    raise
                raise cause from err

    atomic_write(path, write, durable=True)


def _os_error_behind(err: BaseException) -> OSError | None:
    """The ``OSError`` (a full disk, a vanished folder) that made torch's writer fail, if one did: torch
    reports a failed write of its file handle as a ``RuntimeError`` raised while handling that error."""
    seen = err.__cause__ or err.__context__
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint without running pickled code (``weights_only=True``), tensors on the CPU. A file
    that does not load (truncated, corrupt, holding pickled code) is one ``WeightsError`` line: delete it or
    start over with FORCE=1."""
    fix = f"delete {path} to start that training over, or rerun with FORCE=1"
    state = load_weights_only(Path(path), "cpu", fix)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise WeightsError(f"{path} is not a resumable weakcell checkpoint; {fix}")
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing:
        raise WeightsError(
            f"{path} lacks {', '.join(missing)}: not a whole weakcell checkpoint (edited, or written by "
            f"another program); {fix}"
        )
    return state


def rng_state() -> dict[str, Any]:
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


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` saved."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal.tolist()), gauss))
    keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), position, has_gauss, cached))  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's global and torch's RNGs (a fresh run; a resume restores them instead)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002
    torch.manual_seed(seed)


def check_resumable(state: Mapping[str, Any], path: Path, cfg: TrainConfig, seed: int, world: World) -> None:
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
