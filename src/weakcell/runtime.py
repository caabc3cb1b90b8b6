"""Where and how the engine computes: the device (``train.device``), the autocast precision
(``train.amp``), the memory format, and the torchrun world this process belongs to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from weakcell.config import TrainConfig
from weakcell.devices import auto_device
from weakcell.distributed import World, setup
from weakcell.errors import StageError

Batch = dict[str, Any]


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


def prepare(model: nn.Module, runtime: Runtime) -> nn.Module:
    """Move ``model`` to the runtime's device (and channels_last memory format when asked), in place."""
    model.to(runtime.device)
    if runtime.channels_last:
        model.to(memory_format=torch.channels_last)  # only 4-D weights (convolutions) change layout
    return model
