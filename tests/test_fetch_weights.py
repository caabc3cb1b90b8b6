"""``make weights`` / ``make pretrained-datasets`` against a fake source: a local HTTP server on 127.0.0.1
serving checkpoints made here, so the real download, checksum and conversion code runs without the internet."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from weakcell import pretrained
from weakcell.cli import main
from weakcell.config import Config, load_config
from weakcell.kagglekit.datasets import pretrained_datasets
from weakcell.models import create_backbone
from weakcell.pretrained import FetchError, Official, fetch


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(base URL, folder it serves)."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(QuietHandler, directory=str(served))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", served
    httpd.shutdown()
    httpd.server_close()


def dead_url() -> str:
    """A 127.0.0.1 URL nothing listens on: what an offline machine sees."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def config(tmp_path: Path, *overrides: str) -> Config:
    return load_config(None, [f"paths.root={tmp_path}", "model.backbone=test_efficientnet", *overrides])


def fake_official(monkeypatch: pytest.MonkeyPatch, served: Path) -> dict[str, torch.Tensor]:
    """A small checkpoint published as ``cpsam`` (extension-less, like the real one), its sha256 pinned."""
    state = {"encoder.weight": torch.arange(6.0).reshape(2, 3), "head.bias": torch.tensor([0.5, -1.0])}
    torch.save(state, served / "cpsam")
    official = Official(
        "cpsam", "https://example.invalid/cpsam", sha256(served / "cpsam"), 1, "cpsam.safetensors", "BSD"
    )
    monkeypatch.setitem(pretrained.OFFICIAL, "cellpose", official)
    return state


def test_backbone_comes_through_timm_and_loads_through_model_pretrained_file(tmp_path, server) -> None:
    url, served = server
    release = timm.create_model(
        "test_efficientnet", pretrained=False
    ).state_dict()  # 3 channels, 1000 classes
    torch.save(release, served / "release.pth")
    cfg = config(tmp_path, f"weights.backbone_url={url}/release.pth")

    manifest = fetch(cfg)

    stored = tmp_path / "weights" / "test_efficientnet.safetensors"
    entry = manifest["backbone:test_efficientnet"]
    assert entry["file"] == stored.name and entry["sha256"] == sha256(stored)
    assert entry["source"] == f"timm:test_efficientnet from {url}/release.pth"
    assert json.loads((tmp_path / "weights" / "MANIFEST.json").read_text()) == manifest
    saved = load_file(stored)
    assert saved.keys() == release.keys()
    for key, value in release.items():
        torch.testing.assert_close(saved[key], value, msg=key)
    assert not (tmp_path / "weights" / ".cache").exists()
    # model.pretrained_file=weights (the folder) finds it; the 3 RGB filters carry over (x 3/4, 4 channels)
    backbone = create_backbone("test_efficientnet", pretrained_file=tmp_path / "weights")
    torch.testing.assert_close(backbone.conv_stem.weight[:, :3], release["conv_stem.weight"] * 0.75)


def test_official_file_is_checked_and_converted_to_safetensors(tmp_path, server, monkeypatch) -> None:
    url, served = server
    state = fake_official(monkeypatch, served)
    cfg = config(tmp_path, "weights.fetch=[cellpose]", f"weights.mirror={url}")

    entry = fetch(cfg)["cellpose"]

    folder = tmp_path / "weights"
    assert sorted(p.name for p in folder.iterdir()) == ["MANIFEST.json", "cpsam.safetensors"]
    assert entry["upstream_sha256"] == sha256(served / "cpsam") and entry["sha256"] == sha256(
        folder / entry["file"]
    )
    assert entry["source"] == f"{url}/cpsam" and entry["tensors"] == 2
    for key, value in load_file(folder / "cpsam.safetensors").items():
        torch.testing.assert_close(value, state[key])
    # a second run verifies instead of downloading: the server may be gone
    again = fetch(config(tmp_path, "weights.fetch=[cellpose]", f"weights.mirror={dead_url()}"))
    assert again["cellpose"] == entry


def test_a_corrupted_download_fails_and_leaves_nothing(tmp_path, server, monkeypatch) -> None:
    url, served = server
    fake_official(monkeypatch, served)
    data = bytearray((served / "cpsam").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in transit
    (served / "cpsam").write_bytes(bytes(data))
    cfg = config(tmp_path, "weights.fetch=[cellpose]", f"weights.mirror={url}")
    with pytest.raises(FetchError, match=r"has sha256 \w+, expected .*nothing was kept.*Offline: place"):
        fetch(cfg)
    assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == []


def test_offline_fails_in_one_line_naming_the_file_and_where(tmp_path, capsys) -> None:
    argv = ["weights", f"paths.root={tmp_path}", "weights.fetch=[sam]", f"weights.mirror={dead_url()}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: cannot download")
    assert "place the official file sam_vit_b_01ec64.pth (375,042,383 bytes" in err
    assert f"at {tmp_path / 'weights' / 'sam_vit_b_01ec64.pth'} and rerun `make weights`" in err


def test_a_file_placed_by_hand_is_verified_without_the_network(tmp_path, server, monkeypatch) -> None:
    _, served = server
    fake_official(monkeypatch, served)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "cpsam").write_bytes((served / "cpsam").read_bytes())
    entry = fetch(config(tmp_path, "weights.fetch=[cellpose]", f"weights.mirror={dead_url()}"))["cellpose"]
    assert entry["source"] == "https://example.invalid/cpsam (placed by hand)"
    (tmp_path / "weights" / "cpsam").write_bytes(b"not the release")  # a wrong file placed by hand
    (tmp_path / "weights" / "MANIFEST.json").unlink()
    with pytest.raises(FetchError, match="not the official"):
        fetch(config(tmp_path, "weights.fetch=[cellpose]"))


def test_a_stored_file_that_changed_since_the_manifest_fails(tmp_path, server, monkeypatch) -> None:
    url, served = server
    fake_official(monkeypatch, served)
    cfg = config(tmp_path, "weights.fetch=[cellpose]", f"weights.mirror={url}")
    fetch(cfg)
    stored = tmp_path / "weights" / "cpsam.safetensors"
    stored.write_bytes(stored.read_bytes()[:-10])  # truncated
    with pytest.raises(FetchError, match="changed since `make weights` wrote it"):
        fetch(cfg)
    with pytest.raises(FetchError, match="changed since"):
        pretrained_datasets(cfg)


def test_pretrained_datasets_pack_each_fetched_file_with_its_manifest(tmp_path, server, monkeypatch) -> None:
    url, served = server
    fake_official(monkeypatch, served)
    torch.save(timm.create_model("test_efficientnet").state_dict(), served / "release.pth")
    cfg = config(
        tmp_path,
        "weights.fetch=[backbone,cellpose]",
        f"weights.mirror={url}",
        f"weights.backbone_url={url}/release.pth",
        "kaggle.owner=someone",
    )
    with pytest.raises(FileNotFoundError, match="run `make weights` first"):
        pretrained_datasets(cfg)
    manifest = fetch(cfg)

    folders = pretrained_datasets(cfg)

    root = tmp_path / "dist" / "kaggle"
    assert folders == [root / "weakcell-backbone-demo", root / "cellpose-sam"]
    cellpose = json.loads((root / "cellpose-sam" / "MANIFEST.json").read_text())
    assert cellpose == {"cellpose": manifest["cellpose"]}
    assert sha256(root / "cellpose-sam" / "cpsam.safetensors") == manifest["cellpose"]["sha256"]
    metadata = json.loads((root / "cellpose-sam" / "dataset-metadata.json").read_text())
    assert metadata["id"] == "someone/cellpose-sam"
    backbone = root / "weakcell-backbone-demo"
    assert sorted(p.name for p in backbone.iterdir()) == [
        "MANIFEST.json",
        "dataset-metadata.json",
        "test_efficientnet.safetensors",
    ]


def served_hpacellseg(served: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Whole pickled models under the Zenodo names (small trees with upstream's class paths: the format is
    under test here, tests/test_hpacellseg.py runs the real network)."""
    import warnings

    from tests.hpacellseg_models import tiny_upstream_like, upstream_classes

    states = {}
    for stem in ("dpn_unet_nuclei_v1", "dpn_unet_cell_3ch_v1"):
        with upstream_classes() as classes, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, states[stem] = tiny_upstream_like(classes, parallel=stem.startswith("dpn_unet_nuclei"))
            torch.save(model, served / f"{stem}.pth")
    return states


def test_hpacellseg_models_are_fetched_and_converted_without_running_their_pickles(tmp_path, server) -> None:
    url, served = server
    states = served_hpacellseg(served)
    cfg = config(tmp_path, "weights.fetch=[hpacellseg]", f"weights.mirror={url}", "kaggle.owner=someone")

    manifest = fetch(cfg)

    folder = tmp_path / "weights"
    assert sorted(manifest) == ["hpacellseg:dpn_unet_cell_3ch_v1", "hpacellseg:dpn_unet_nuclei_v1"]
    for stem, state in states.items():
        entry = manifest[f"hpacellseg:{stem}"]
        assert entry["file"] == f"{stem}.safetensors" and entry["upstream_file"] == f"{stem}.pth"
        assert entry["upstream_sha256"] == sha256(served / f"{stem}.pth")
        assert entry["upstream_sha256_source"] == "recorded at the first fetch"
        stored = load_file(folder / entry["file"])
        assert stored.keys() == state.keys()  # a DataParallel's "module." prefix removed
        for key, value in state.items():
            torch.testing.assert_close(stored[key], value)
    assert not list(folder.glob("*.pth"))  # the pickles are not kept
    assert fetch(config(tmp_path, "weights.fetch=[hpacellseg]", f"weights.mirror={dead_url()}")) == manifest
    # both files in one Kaggle dataset, the folder segment.hpacellseg.weights points at
    (target,) = pretrained_datasets(cfg)
    assert target.name == "hpa-cell-segmentation"
    assert sorted(p.name for p in target.glob("*.safetensors")) == [
        "dpn_unet_cell_3ch_v1.safetensors",
        "dpn_unet_nuclei_v1.safetensors",
    ]
    assert json.loads((target / "MANIFEST.json").read_text()) == manifest


def test_offline_one_line_names_every_missing_file_of_the_config(tmp_path, capsys) -> None:
    argv = [
        "weights",
        f"paths.root={tmp_path}",
        "weights.fetch=[sam,hpacellseg]",
        "segment.hpacellseg.cell_model=2ch",
        f"weights.mirror={dead_url()}",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "3 weights files could not be fetched" in err
    for name in ("sam_vit_b_01ec64.pth", "dpn_unet_nuclei_v1.pth", "dpn_unet_cell_v2.pth"):
        assert f"at {tmp_path / 'weights' / name} and rerun `make weights`" in err, name
    assert "https://zenodo.org/record/4665863/files/dpn_unet_nuclei_v1.pth" in err


def test_offline_names_every_missing_file_at_once(tmp_path, capsys) -> None:
    """Issue 26: `make weights` offline reported one missing file per run (three runs to learn of three)."""
    dead = dead_url()
    argv = [
        "weights",
        f"paths.root={tmp_path}",
        "weights.fetch=[backbone,cellpose,sam]",
        f"weights.mirror={dead}",
        f"weights.backbone_url={dead}/test_efficientnet.pth",
        "model.backbone=test_efficientnet",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: 3 weights files could not be fetched")
    for placed in ("test_efficientnet.pth", "cpsam", "sam_vit_b_01ec64.pth"):
        assert f"{tmp_path / 'weights' / placed}" in err
