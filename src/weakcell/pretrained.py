"""``make weights``: fetch the pretrained weights a competition run starts from into ``weights/``, each
checked and recorded in ``weights/MANIFEST.json`` (file, sha256, bytes, source). The only stage that touches
the network; everything else reads local files (``weakcell.weights``).

* ``backbone``: ``model.backbone`` through timm's own pretrained mechanism (Hugging Face hub or the URL in
  timm's pretrained config, cached under ``weights/.cache``), saved as ``weights/<backbone>.safetensors``,
  the name ``model.pretrained_file=weights`` resolves to (``weakcell.models.backbone.resolve_weights_file``).
* ``cellpose``: the official Cellpose-SAM ``cpsam``; ``sam``: the official SAM ViT-B checkpoint. Both are
  streamed to a ``.part`` file, their sha256 checked against the published one (a corrupted or changed
  download fails and leaves nothing behind), then converted to safetensors (``cpsam.safetensors``,
  ``sam_vit_b_01ec64.safetensors``, which ``segment.cellpose.weights=weights`` / ``segment.sam.weights=weights``
  find) through a weights-only load, so no pickled code is ever kept or run.

Offline, each item fails in one line naming the file to place and where: an official file placed at
``weights/<official name>`` is verified and converted like a download. A file already listed in the manifest
is verified against it (sha256) and kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weakcell.config import Config
from weakcell.errors import WeakcellError

MANIFEST = "MANIFEST.json"
CHUNK = 1 << 20


class FetchError(WeakcellError, OSError):
    """A download that failed or did not match its checksum; the message says which file to place where."""


@dataclass(frozen=True)
class Official:
    """A file published at a fixed URL with a known sha256 (checked by many users of these releases)."""

    file: str  # the official file name: what a user places offline
    url: str
    sha256: str
    size: int
    stored: str  # its safetensors conversion in weights/
    licence: str


OFFICIAL: dict[str, Official] = {
    # Cellpose 4 (Cellpose-SAM, Pachitariu et al. 2025), MouseLand's Hugging Face release.
    "cellpose": Official(
        "cpsam",
        "https://huggingface.co/mouseland/cellpose-sam/resolve/main/cpsam",
        "e1440429eb384f95afe32bcba6510f90d518eaedc917ede549bed6804004abe2",
        1_233_587_898,
        "cpsam.safetensors",
        "BSD-3-Clause",
    ),
    # Segment Anything ViT-B (Kirillov et al. 2023), Meta's release.
    "sam": Official(
        "sam_vit_b_01ec64.pth",
        "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
        "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        375_042_383,
        "sam_vit_b_01ec64.safetensors",
        "Apache-2.0",
    ),
}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """``item -> {file, sha256, bytes, source, ...}`` of ``folder/MANIFEST.json``; empty when absent."""
    path = folder / MANIFEST
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text())
    except ValueError as err:
        raise FetchError(f"{path} is not valid JSON ({err}); delete it and rerun `make weights`") from err
    if not isinstance(manifest, dict):
        raise FetchError(f"{path} must map items to entries; delete it and rerun `make weights`")
    return manifest


def write_manifest(folder: Path, manifest: dict[str, dict[str, Any]]) -> Path:
    path = folder / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def verified(folder: Path, entry: dict[str, Any]) -> bool:
    """True when the manifest's file is there with the recorded sha256; False when it is absent. A file
    that is there with another sha256 is an error: it was corrupted or replaced since it was recorded."""
    path = folder / str(entry.get("file", ""))
    if not entry.get("file") or not path.is_file():
        return False
    actual = sha256_of(path)
    if actual != entry.get("sha256"):
        raise FetchError(
            f"{path} has sha256 {actual}, {MANIFEST} records {entry.get('sha256')}: it changed since "
            f"`make weights` wrote it; delete it and rerun `make weights`"
        )
    return True


def _entry(folder: Path, file: str, source: str, **extra: Any) -> dict[str, Any]:
    path = folder / file
    return {"file": file, "sha256": sha256_of(path), "bytes": path.stat().st_size, "source": source, **extra}


# --------------------------------------------------------------------------------------- official files


def download(url: str, target: Path, sha256: str, timeout_s: float) -> None:
    """Stream ``url`` to ``target`` through ``target.part``, hashing as it comes; ``target`` appears only
    when the sha256 matches. Raises FetchError (network or checksum), leaving no partial file."""
    part = target.with_name(target.name + ".part")
    digest = hashlib.sha256()
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "weakcell"})
        with urllib.request.urlopen(request, timeout=timeout_s) as response, part.open("wb") as out:
            while chunk := response.read(CHUNK):
                digest.update(chunk)
                out.write(chunk)
    except (urllib.error.URLError, OSError) as err:
        part.unlink(missing_ok=True)
        reason = getattr(err, "reason", None) or err
        raise FetchError(f"cannot download {url} ({type(err).__name__}: {reason})") from err
    if digest.hexdigest() != sha256:
        part.unlink()
        raise FetchError(
            f"download of {url} has sha256 {digest.hexdigest()}, expected {sha256}: corrupted in transit "
            "or changed upstream; nothing was kept"
        )
    part.replace(target)


def to_safetensors(source: Path, target: Path) -> int:
    """Convert a PyTorch checkpoint to safetensors through a weights-only load; returns the tensor count."""
    from safetensors.torch import save_file

    from weakcell.weights import load_state_dict

    state = load_state_dict(source)
    tmp = target.with_name(target.name + ".tmp")
    # clone: safetensors refuses tensors that share storage, which some checkpoints hold
    save_file({key: value.detach().clone().contiguous() for key, value in state.items()}, tmp)
    tmp.replace(target)
    return len(state)


def fetch_official(cfg: Config, item: str, folder: Path) -> dict[str, Any]:
    """One official file: an official file placed in ``folder`` by hand is verified, else it is downloaded
    (from ``weights.mirror`` when set); then converted to safetensors and the original removed."""
    official = OFFICIAL[item]
    placed = folder / official.file
    url = f"{cfg.weights.mirror.rstrip('/')}/{official.file}" if cfg.weights.mirror else official.url
    if placed.is_file():
        actual = sha256_of(placed)
        if actual != official.sha256:
            raise FetchError(
                f"{placed} has sha256 {actual}, not the official {official.sha256}: a truncated or other "
                f"file; replace it with {official.url}"
            )
        source = f"{official.url} (placed by hand)"
    else:
        try:
            download(url, placed, official.sha256, cfg.weights.timeout_s)
        except FetchError as err:
            raise FetchError(
                f"{err}. Offline: place the official file {official.file} ({official.size:,} bytes, sha256 "
                f"{official.sha256}, from {official.url}) at {placed} and rerun `make weights`"
            ) from err
        source = url
    tensors = to_safetensors(placed, folder / official.stored)
    placed.unlink()
    return _entry(
        folder,
        official.stored,
        source,
        upstream_file=official.file,
        upstream_sha256=official.sha256,
        licence=official.licence,
        tensors=tensors,
    )


# ------------------------------------------------------------------------------------------- backbone


def backbone_file(cfg: Config) -> str:
    """``<backbone>.safetensors``: the name ``model.pretrained_file=<weights dir>`` resolves to."""
    return f"{cfg.model.backbone}.safetensors"


def fetch_backbone(cfg: Config, folder: Path) -> dict[str, Any]:
    """``model.backbone`` with its pretrained weights through timm (``weights.backbone_url`` instead of
    timm's source when set), saved as safetensors with every tensor of the release (classifier included:
    the kit's loader drops it by name and accounts for the rest)."""
    import timm
    import torch
    from safetensors.torch import save_file

    name = cfg.model.backbone
    target = folder / backbone_file(cfg)
    for suffix in (".pth", ".pt", ".bin"):  # a checkpoint placed by hand, offline
        placed = folder / f"{name}{suffix}"
        if placed.is_file():
            tensors = to_safetensors(placed, target)
            return _entry(folder, target.name, f"{placed.name} (placed by hand)", tensors=tensors)
    overlay = {"hf_hub_id": None, "url": cfg.weights.backbone_url} if cfg.weights.backbone_url else None
    # the hub logs each failed request as a warning; the one error line below says what to do instead
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    try:
        model = timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay=overlay, cache_dir=folder / ".cache" / "timm"
        )
    except Exception as err:  # the network boundary: hub, HTTP and file errors of several libraries
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise FetchError(
            f"cannot fetch {name} through timm ({type(err).__name__}: {first}). Offline: place its "
            f"ImageNet checkpoint at {folder / (name + '.pth')} (or {target}) and rerun `make weights`"
        ) from err
    pretrained: dict[str, Any] = dict(getattr(model, "pretrained_cfg", None) or {})
    source = cfg.weights.backbone_url or (
        f"hf-hub:{pretrained['hf_hub_id']}" if pretrained.get("hf_hub_id") else str(pretrained.get("url"))
    )
    release: dict[str, torch.Tensor] = model.state_dict()
    state = {key: value.detach().clone().contiguous() for key, value in release.items()}
    tmp = target.with_name(target.name + ".tmp")
    save_file(state, tmp)
    tmp.replace(target)
    return _entry(
        folder,
        target.name,
        f"timm:{name} from {source}",
        licence=str(pretrained.get("license", "see the model card")),
        tensors=len(state),
    )


# ---------------------------------------------------------------------------------------------- stage


def fetch(cfg: Config) -> dict[str, dict[str, Any]]:
    """``make weights``: every item of ``weights.fetch`` in ``cfg.weights_dir``; the manifest is updated
    after each item. An item that fails does not stop the others: every failure (offline, each file to
    place by hand) is reported together at the end, in one error."""
    folder = cfg.weights_dir
    folder.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(folder)
    failures: list[str] = []
    for item in cfg.weights.fetch:
        key = f"backbone:{cfg.model.backbone}" if item == "backbone" else item
        if key in manifest and verified(folder, manifest[key]):
            print(f"weights: {key} {manifest[key]['file']} verified (sha256 {manifest[key]['sha256'][:12]})")
            continue
        start = time.perf_counter()
        try:
            entry = fetch_backbone(cfg, folder) if item == "backbone" else fetch_official(cfg, item, folder)
        except FetchError as err:
            failures.append(f"{key}: {err}")
            continue
        manifest[key] = entry
        write_manifest(folder, manifest)
        print(
            f"weights: {key} -> {folder / entry['file']} ({entry['bytes'] / 2**20:.1f} MB, sha256 "
            f"{entry['sha256'][:12]}, {time.perf_counter() - start:.0f} s) from {entry['source']}"
        )
    shutil.rmtree(folder / ".cache", ignore_errors=True)  # timm's download cache: the safetensors is kept
    if len(failures) == 1:  # its own message: which file to place where
        raise FetchError(failures[0].split(": ", 1)[1])
    if failures:
        raise FetchError(
            f"{len(failures)} of {len(cfg.weights.fetch)} weights missing: " + " || ".join(failures)
        )
    return manifest


def run(cfg: Config) -> dict[str, dict[str, Any]]:
    return fetch(cfg)
