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
* ``hpacellseg``: HPA-Cell-Segmentation's ``dpn_unet_nuclei_v1.pth`` and the cell model of
  ``segment.hpacellseg.cell_model`` from Zenodo record 4665863, whole pickled models converted to
  ``<name>.safetensors`` by a restricted unpickler (``weakcell.segment.hpacellseg.pickles``). Zenodo
  publishes no sha256: the first fetch records it (trust on first use), later runs verify against it.

Offline, one error names every file that could not be fetched, each with where to place it: an official
file placed at ``weights/<official name>`` is verified and converted like a download. A file already listed
in the manifest is verified against it (sha256) and kept.
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
from weakcell.outputs import atomic_write, atomic_write_text

MANIFEST = "MANIFEST.json"
CHUNK = 1 << 20


class FetchError(WeakcellError, OSError):
    """A download that failed or did not match its checksum; the message says which file to place where."""


@dataclass(frozen=True)
class Official:
    """A file published at a fixed URL, with its sha256 when it is published (checked by many users of
    these releases); without one, the first fetch records it in the manifest and later runs verify against
    that (trust on first use)."""

    file: str  # the official file name: what a user places offline
    url: str
    sha256: str | None
    size: int | None
    stored: str  # its safetensors conversion in weights/
    licence: str
    whole_model: bool = False  # a torch.save(model) pickle: read by the restricted unpickler, never run


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
    # HPA-Cell-Segmentation (CellProfiling, Apache-2.0), whole pickled models on Zenodo record 4665863.
    # Zenodo lists no sha256 (only an md5 per file, not recorded in any public source read here): the
    # first fetch records the sha256 in MANIFEST.json.
    **{
        f"hpacellseg:{stem}": Official(
            f"{stem}.pth",
            f"https://zenodo.org/record/4665863/files/{stem}.pth",
            None,
            None,
            f"{stem}.safetensors",
            "Apache-2.0",
            whole_model=True,
        )
        for stem in ("dpn_unet_nuclei_v1", "dpn_unet_cell_3ch_v1", "dpn_unet_cell_v2")
    },
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
    return atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


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


def download(url: str, target: Path, sha256: str | None, timeout_s: float) -> None:
    """Stream ``url`` to ``target`` through ``target.part``, hashing as it comes; ``target`` appears only
    when the sha256 matches (any, when none is pinned). Raises FetchError (network or checksum), leaving no
    partial file."""
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
    if sha256 is not None and digest.hexdigest() != sha256:
        part.unlink()
        raise FetchError(
            f"download of {url} has sha256 {digest.hexdigest()}, expected {sha256}: corrupted in transit "
            "or changed upstream; nothing was kept"
        )
    part.replace(target)


def to_safetensors(source: Path, target: Path, whole_model: bool = False) -> int:
    """Convert a PyTorch checkpoint to safetensors through a weights-only load (a whole-model pickle through
    the restricted unpickler of ``weakcell.segment.hpacellseg.pickles``); returns the tensor count."""
    from safetensors.torch import save_file

    from weakcell.weights import load_state_dict

    if whole_model:
        from weakcell.segment.hpacellseg.pickles import load_whole_model

        state = load_whole_model(source)
    else:
        state = load_state_dict(source)
    # clone: safetensors refuses tensors that share storage, which some checkpoints hold
    tensors = {key: value.detach().clone().contiguous() for key, value in state.items()}
    atomic_write(target, lambda tmp: save_file(tensors, str(tmp)))
    return len(state)


def _published(official: Official) -> str:
    """How to place an official file by hand: its name, size and sha256 when known, and its URL."""
    known = [
        f"{official.size:,} bytes" if official.size else "",
        f"sha256 {official.sha256}" if official.sha256 else "",
    ]
    details = ", ".join(part for part in known if part)
    return f"{official.file} ({details + ', ' if details else ''}from {official.url})"


def fetch_official(cfg: Config, item: str, folder: Path) -> dict[str, Any]:
    """One official file: an official file placed in ``folder`` by hand is verified, else it is downloaded
    (from ``weights.mirror`` when set); then converted to safetensors and the original removed."""
    official = OFFICIAL[item]
    placed = folder / official.file
    url = f"{cfg.weights.mirror.rstrip('/')}/{official.file}" if cfg.weights.mirror else official.url
    if placed.is_file():
        actual = sha256_of(placed)
        if official.sha256 is not None and actual != official.sha256:
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
                f"{err}. Offline: place the official file {_published(official)} at {placed} and rerun "
                "`make weights`"
            ) from err
        source = url
    upstream_sha256 = official.sha256 or sha256_of(placed)
    tensors = to_safetensors(placed, folder / official.stored, official.whole_model)
    placed.unlink()
    return _entry(
        folder,
        official.stored,
        source,
        upstream_file=official.file,
        upstream_sha256=upstream_sha256,
        upstream_sha256_source="published" if official.sha256 else "recorded at the first fetch",
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
    atomic_write(target, lambda tmp: save_file(state, str(tmp)))
    return _entry(
        folder,
        target.name,
        f"timm:{name} from {source}",
        licence=str(pretrained.get("license", "see the model card")),
        tensors=len(state),
    )


# ---------------------------------------------------------------------------------------------- stage


def manifest_keys(cfg: Config) -> list[str]:
    """The manifest entries ``weights.fetch`` asks for: ``backbone:<model.backbone>``, ``cellpose``, ``sam``,
    and for ``hpacellseg`` the nuclei model and ``segment.hpacellseg.cell_model``'s."""
    keys: list[str] = []
    for item in cfg.weights.fetch:
        if item == "backbone":
            keys.append(f"backbone:{cfg.model.backbone}")
        elif item == "hpacellseg":
            from weakcell.segment.hpacellseg.backend import model_files

            keys.extend(f"hpacellseg:{stem}" for stem in model_files(cfg.segment.hpacellseg))
        else:
            keys.append(item)
    return keys


def fetch(cfg: Config) -> dict[str, dict[str, Any]]:
    """``make weights``: every file of ``weights.fetch`` in ``cfg.weights_dir``; the manifest is updated
    after each file, so a failure keeps what was fetched. Files that cannot be fetched (offline) are all
    named in one error at the end, each with where to place it."""
    folder = cfg.weights_dir
    folder.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(folder)
    failures: list[FetchError] = []
    for key in manifest_keys(cfg):
        if key in manifest and verified(folder, manifest[key]):
            print(f"weights: {key} {manifest[key]['file']} verified (sha256 {manifest[key]['sha256'][:12]})")
            continue
        start = time.perf_counter()
        try:
            entry = (
                fetch_backbone(cfg, folder)
                if key.startswith("backbone:")
                else fetch_official(cfg, key, folder)
            )
        except FetchError as err:
            failures.append(err)
            continue
        manifest[key] = entry
        write_manifest(folder, manifest)
        print(
            f"weights: {key} -> {folder / entry['file']} ({entry['bytes'] / 2**20:.1f} MB, sha256 "
            f"{entry['sha256'][:12]}, {time.perf_counter() - start:.0f} s) from {entry['source']}"
        )
    shutil.rmtree(folder / ".cache", ignore_errors=True)  # timm's download cache: the safetensors is kept
    if len(failures) == 1:
        raise failures[0]
    if failures:
        raise FetchError(
            f"{len(failures)} weights files could not be fetched: " + " | ".join(map(str, failures))
        )
    return manifest


def run(cfg: Config) -> dict[str, dict[str, Any]]:
    return fetch(cfg)
