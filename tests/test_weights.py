"""Weights are found only locally and loaded without running pickled code."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from weakcell.weights import WeightsError, find_weights, load_state_dict


class Payload:
    """A custom class: pickling an instance of it stores code to run on load."""


def small_state() -> dict[str, torch.Tensor]:
    return {"conv.weight": torch.randn(4, 3, 3, 3), "conv.bias": torch.zeros(4), "step": torch.tensor(7)}


def assert_same(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert loaded.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(loaded[key], tensor), key


@pytest.mark.parametrize("name", ["model.pth", "model.pt", "model.bin", "model.ckpt", "cpsam"])
def test_torch_round_trip(tmp_path: Path, name: str) -> None:
    state = small_state()
    torch.save(state, tmp_path / name)
    assert_same(load_state_dict(tmp_path / name), state)


def test_safetensors_round_trip(tmp_path: Path) -> None:
    state = small_state()
    save_file(state, tmp_path / "model.safetensors")
    assert_same(load_state_dict(tmp_path / "model.safetensors"), state)


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "model_state_dict"])
def test_wrappers_and_module_prefix_are_removed(tmp_path: Path, wrapper: str) -> None:
    state = small_state()
    prefixed = {f"module.{key}": tensor for key, tensor in state.items()}
    # Training checkpoints hold more than tensors beside the wrapped state dict.
    torch.save({wrapper: prefixed, "epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "checkpoint.pth")
    assert_same(load_state_dict(tmp_path / "checkpoint.pth"), state)


def test_pickled_object_is_refused(tmp_path: Path) -> None:
    torch.save({"weight": torch.zeros(2), "extra": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match=r"evil\.pth.*pickled.*torch\.save\(model\.state_dict\(\), path\)"):
        load_state_dict(tmp_path / "evil.pth")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_plain_pickle_is_refused(tmp_path: Path) -> None:
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"weight": Payload()}))
    with pytest.raises(WeightsError, match=r"evil\.pkl.*pickled"):
        load_state_dict(tmp_path / "evil.pkl")


def test_non_tensor_entries_are_refused(tmp_path: Path) -> None:
    torch.save({"weight": torch.zeros(2), "note": "hello"}, tmp_path / "mixed.pth")
    with pytest.raises(WeightsError, match=r"mixed\.pth.*'note'.*not tensors"):
        load_state_dict(tmp_path / "mixed.pth")


@pytest.mark.parametrize("name", ["garbage.pth", "garbage.safetensors"])
def test_not_a_weights_file(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(WeightsError, match=re.escape(f"{name} is not a")):
        load_state_dict(tmp_path / name)


def test_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"weights file not found: .*nowhere\.pth"):
        load_state_dict(tmp_path / "nowhere.pth")


# -- find_weights --------------------------------------------------------------------------------------


def test_explicit_file_and_folder(tmp_path: Path) -> None:
    (tmp_path / "cpsam").write_bytes(b"x")
    assert find_weights(str(tmp_path / "cpsam"), None, ["other"]) == tmp_path / "cpsam"
    assert find_weights(str(tmp_path), None, ["cpsam"]) == tmp_path / "cpsam"


def test_explicit_path_that_does_not_exist_fails_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cpsam").write_bytes(b"x")
    monkeypatch.setenv("WEIGHTS_DIR", str(tmp_path))  # would match, but a typo must not fall through
    with pytest.raises(FileNotFoundError, match=r"model\.weights=.*typo does not exist"):
        find_weights(str(tmp_path / "typo"), "WEIGHTS_DIR", ["cpsam"], config_key="model.weights")


def test_env_folder_then_search_dirs_in_pattern_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_folder, dataset = tmp_path / "env", tmp_path / "input" / "cellpose-sam"
    env_folder.mkdir()
    dataset.mkdir(parents=True)
    (dataset / "cpsam").write_bytes(b"x")
    (dataset / "cpsam_v2").write_bytes(b"x")
    monkeypatch.setenv("WEIGHTS_DIR", str(env_folder))
    found = find_weights(
        None, "WEIGHTS_DIR", ["cpsam_v2", "cpsam"], search_dirs=[str(tmp_path / "input" / "*")]
    )
    assert found == dataset / "cpsam_v2"
    (env_folder / "cpsam").write_bytes(b"x")
    assert find_weights(None, "WEIGHTS_DIR", ["cpsam_v2", "cpsam"]) == env_folder / "cpsam"


def test_nothing_found_lists_every_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WEIGHTS_DIR", raising=False)
    search = str(tmp_path / "input" / "*")
    with pytest.raises(FileNotFoundError) as raised:
        find_weights(None, "WEIGHTS_DIR", ["cpsam"], config_key="model.weights", search_dirs=[search])
    message = str(raised.value)
    for expected in ("$WEIGHTS_DIR (not set)", search, "Kaggle dataset", "model.weights=/path/to/file"):
        assert expected in message
