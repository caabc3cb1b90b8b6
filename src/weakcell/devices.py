"""What ``device: auto`` means everywhere (training, inference, Cellpose, SAM): the first CUDA GPU when the
installed torch has kernels for it, else the CPU.

A visible GPU is not enough. Kaggle's torch 2.10 (cu128) is built for compute capability 7.5 and newer;
a kernel that lands on a P100 (6.0) sees ``torch.cuda.is_available()`` true and dies at the first real
CUDA op ("no kernel image is available for execution on the device"). ``auto`` then runs on the CPU after
one warning that names the GPU and the torch build; an explicit ``cuda`` is left to fail as asked.
"""

from __future__ import annotations

import functools
import platform
import re
import subprocess
import warnings

import torch


def has_kernels(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """True when a torch built for ``arch_list`` (``torch.cuda.get_arch_list()``, e.g. ``['sm_75',
    'sm_80', 'compute_90']``) runs on a GPU of compute ``capability`` (major, minor).

    CUDA's rules: a cubin ``sm_XY`` runs on X.Z for Z >= Y (same major); an arch-specific ``sm_XYa`` only
    on X.Y; PTX ``compute_XY`` is compiled at load time for any X.Y or newer."""
    for arch in arch_list:
        match = re.fullmatch(r"(sm|compute)_(\d+)(\d)([af]?)", arch)
        if not match:
            continue
        kind, major, minor, suffix = match.group(1), int(match.group(2)), int(match.group(3)), match.group(4)
        if kind == "compute" and (major, minor) <= capability:
            return True
        if kind == "sm" and suffix == "a" and (major, minor) == capability:
            return True
        if kind == "sm" and suffix != "a" and major == capability[0] and minor <= capability[1]:
            return True
    return False


def auto_device() -> torch.device:
    """``cuda`` (the current device) when a GPU is visible and this torch has kernels for it, else ``cpu``;
    the reason is warned once per process."""
    return torch.device(_auto_device_kind())


@functools.lru_cache(maxsize=1)
def _auto_device_kind() -> str:
    if not torch.cuda.is_available():
        return "cpu"
    capability = torch.cuda.get_device_capability()
    arch_list = torch.cuda.get_arch_list()
    if has_kernels(capability, arch_list):
        return "cuda"
    name = torch.cuda.get_device_name()
    built = ", ".join(arch_list) or "no CUDA architecture"
    warnings.warn(
        f"device=auto: the GPU {name} (compute capability {capability[0]}.{capability[1]}) has no kernels in "
        f"torch {torch.__version__} (built for {built}), so this runs on the CPU. On Kaggle ask for a T4 "
        f"(kaggle.machine_shape=NvidiaTeslaT4, `make kernels`); elsewhere install a torch built for "
        f"sm_{capability[0]}{capability[1]}.",
        RuntimeWarning,
        stacklevel=3,
    )
    return "cpu"


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``auto_device()``; anything else (``cpu``, ``cuda``, ``cuda:1``) as torch reads it."""
    return auto_device() if name == "auto" else torch.device(name)


def cpu_model() -> str:
    """``lscpu``'s model name: every timing a benchmark reports names it (CPUs here differ up to 4x)."""
    try:
        listing = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        listing = ""
    for line in listing.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"
