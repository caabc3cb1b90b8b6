"""device=auto picks a GPU only when the installed torch has kernels for it: torch.cuda is monkeypatched
to show the GPUs Kaggle hands out (a T4, a P100) under the arch list of Kaggle's cu128 torch."""

from __future__ import annotations

import warnings

import pytest
import torch

from weakcell import devices
from weakcell.config import TrainConfig
from weakcell.runtime import resolve_runtime

# torch 2.10.0+cu128's torch.cuda.get_arch_list() (Kaggle's image): no sm_60 / sm_70
KAGGLE_ARCHES = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]


@pytest.mark.parametrize(
    ("capability", "arches", "expected"),
    [
        ((7, 5), KAGGLE_ARCHES, True),  # T4: sm_75 cubin
        ((6, 0), KAGGLE_ARCHES, False),  # P100: nothing at or below 6.0
        ((7, 0), KAGGLE_ARCHES, False),  # V100: sm_75 needs 7.5, no PTX below 12.0
        ((8, 9), KAGGLE_ARCHES, True),  # L4: sm_86 cubin runs on 8.9 (same major, lower minor)
        ((12, 1), KAGGLE_ARCHES, True),
        ((13, 0), KAGGLE_ARCHES, True),  # newer than every cubin: PTX compute_120 is compiled at load
        ((13, 0), ["sm_75", "sm_120"], False),  # ... but not without PTX
        ((9, 0), ["sm_90a"], True),  # arch-specific cubins run on exactly their capability
        ((10, 0), ["sm_90a"], False),
        ((6, 0), ["sm_50", "sm_60", "sm_70"], True),  # a cu118 build still has Pascal
        ((7, 5), [], False),  # a CPU build
    ],
)
def test_has_kernels(capability, arches, expected):
    assert devices.has_kernels(capability, arches) is expected


@pytest.fixture
def gpu(monkeypatch):
    """A fake visible GPU: set ``name`` and ``capability``; torch's arch list is Kaggle's."""
    seen: dict[str, object] = {"name": "Tesla T4", "capability": (7, 5)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: KAGGLE_ARCHES)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: seen["capability"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: seen["name"])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a: False)
    devices._auto_device_kind.cache_clear()
    yield seen
    devices._auto_device_kind.cache_clear()


def test_auto_uses_a_t4(gpu):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runtime = resolve_runtime(TrainConfig(device="auto"))
    assert runtime.device == torch.device("cuda", 0)
    assert runtime.amp_dtype == torch.float16  # a T4 has no bf16: fp16 with loss scaling


def test_auto_falls_back_to_cpu_on_a_p100_with_one_warning(gpu):
    gpu.update(name="Tesla P100-PCIE-16GB", capability=(6, 0))
    with pytest.warns(RuntimeWarning) as caught:
        first = resolve_runtime(TrainConfig(device="auto"))
        second = devices.resolve_device("auto")  # Cellpose and SAM ask the same question
    assert first.device == second == torch.device("cpu") and first.amp_dtype is None
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "Tesla P100-PCIE-16GB" in message and "6.0" in message
    assert torch.__version__ in message and "sm_75" in message and "kaggle.machine_shape" in message


def test_explicit_device_is_not_second_guessed(gpu):
    gpu.update(capability=(6, 0))
    assert devices.resolve_device("cpu") == torch.device("cpu")
    assert devices.resolve_device("cuda:1") == torch.device("cuda", 1)


def test_no_gpu_is_cpu_without_a_warning(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    devices._auto_device_kind.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert devices.auto_device() == torch.device("cpu")
    devices._auto_device_kind.cache_clear()
