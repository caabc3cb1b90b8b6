"""Find and load model weights from local files only: Kaggle kernels run with the internet off, and a
weights file is untrusted input, so nothing here downloads and nothing here runs pickled code.

* ``find_weights`` resolves a config value, an environment variable and the folders where Kaggle mounts
  attached datasets (``/kaggle/input/<dataset>/...``); when nothing is found it lists every place it
  looked and how to attach the weights.
* ``load_state_dict`` reads ``.safetensors`` with safetensors and every other file (``.pt``, ``.pth``,
  ``.bin``, ``.ckpt``, extension-less files such as Cellpose's ``cpsam``) with ``torch.load(weights_only=True)``,
  then unwraps the usual checkpoint wrappers so that the caller gets a flat ``name -> tensor`` dict.
"""

from __future__ import annotations

import glob
import os
import pickle
import pickletools
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from weakcell.errors import WeakcellError

# Where Kaggle mounts attached datasets and models: /kaggle/input/<dataset>/ for datasets,
# /kaggle/input/<model>/<framework>/<variation>/<version>/ for Kaggle Models. Globs, searched in order.
KAGGLE_DIRS: tuple[str, ...] = (
    "/kaggle/input/*",
    "/kaggle/input/*/*",
    "/kaggle/input/*/*/*/*",
)

# Checkpoint wrappers seen in the wild: {"state_dict": ...} (Lightning, timm train.py), {"model": ...}
# (DeiT, SAM fine-tunes, many competition repos), {"model_state_dict": ...} (PyTorch tutorials).
WRAPPER_KEYS: tuple[str, ...] = ("state_dict", "model_state_dict", "model")
RESAVE_HINT = "re-save it with torch.save(model.state_dict(), path)"
# How torch's weights-only unpickler names an object it refuses to build (a class, a function) in a
# checkpoint: the file holds pickled code. It says "Unsupported operand" both for random bytes and for a
# plain pickle of objects, which ``_pickles_objects`` tells apart.
REFUSED_OBJECT = re.compile(r"unsupported (global|class)|not an allowed global", re.IGNORECASE)
# Pickle opcodes that import or build an object (run code on loading), as pickletools names them.
OBJECT_OPCODES = frozenset(
    {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "BUILD"}
)


class WeightsError(WeakcellError, ValueError):
    """A weights file that cannot be loaded safely; the message names the file and the fix."""


def _matches(folder: Path, patterns: Sequence[str]) -> list[Path]:
    """Files in ``folder`` matching ``patterns``, pattern order first, then sorted names."""
    found: list[Path] = []
    for pattern in patterns:
        found.extend(sorted(p for p in folder.glob(pattern) if p.is_file() and p not in found))
    return found


def find_weights(
    explicit: str | os.PathLike[str] | None,
    env_var: str | None,
    patterns: Sequence[str],
    *,
    config_key: str = "the weights config key",
    example: str = "/path/to/file",
    search_dirs: Sequence[str] = KAGGLE_DIRS,
) -> Path:
    """The weights file to use, looked for in this order:

    1. ``explicit`` (the config value): a file is used as is, a folder is searched for ``patterns``;
       a path that does not exist is an error at once (a typo must not silently pick other weights).
    2. The folder (or file) named by the environment variable ``env_var``.
    3. Each folder matching a glob in ``search_dirs`` (by default where Kaggle mounts attached datasets).

    ``patterns`` are file-name globs such as ``["cpsam", "cpsam*.pth"]``; earlier patterns win.
    Raises FileNotFoundError listing every place searched and how to attach the weights (``config_key`` and
    ``example``, a typical value of it, make that hint concrete).
    """
    looked: list[str] = []
    if explicit is not None and str(explicit) != "":
        path = Path(explicit).expanduser()
        if path.is_file():
            return path
        if not path.is_dir():
            raise FileNotFoundError(
                f"weights not found: {config_key}={path} does not exist. "
                + _how_to_attach(config_key, example, env_var)
            )
        found = _matches(path, patterns)
        if found:
            return found[0]
        raise FileNotFoundError(
            f"weights not found: {config_key}={path} is a folder without a file matching {list(patterns)}. "
            + _how_to_attach(config_key, example, env_var)
        )
    if env_var:
        value = os.environ.get(env_var)
        if value:
            path = Path(value).expanduser()
            if path.is_file():
                return path
            if path.is_dir():
                found = _matches(path, patterns)
                if found:
                    return found[0]
            looked.append(f"${env_var}={path}")
        else:
            looked.append(f"${env_var} (not set)")
    for pattern in search_dirs:
        folders = sorted(Path(p) for p in glob.glob(pattern) if os.path.isdir(p))
        for folder in folders:
            found = _matches(folder, patterns)
            if found:
                return found[0]
        looked.append(pattern)
    raise FileNotFoundError(
        f"no weights file matching {list(patterns)} found; looked in: {'; '.join(looked)}. "
        + _how_to_attach(config_key, example, env_var)
    )


def _how_to_attach(config_key: str, example: str, env_var: str | None) -> str:
    variable = f" or the environment variable {env_var} to the folder holding it" if env_var else ""
    return (
        f"Attach the weights to the kernel as a Kaggle dataset (it appears under /kaggle/input/<dataset>/), "
        f"or set {config_key}={example}{variable}. Nothing is downloaded: Kaggle kernels run without "
        f"internet."
    )


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Peel checkpoint wrappers and a DataParallel ``module.`` prefix off a loaded object."""
    while isinstance(obj, dict):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not obj:
        raise WeightsError(f"{path} does not hold a state dict (got {type(obj).__name__}); {RESAVE_HINT}")
    others = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if others:
        raise WeightsError(
            f"{path} is not a plain state dict: entries {others[:5]} are not tensors; {RESAVE_HINT}"
        )
    state: dict[str, torch.Tensor] = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_state_dict(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Load a ``name -> tensor`` dict from ``path`` without executing any pickled code.

    ``.safetensors`` files go through safetensors; anything else through ``torch.load(weights_only=True)``,
    which refuses pickled objects other than tensors and plain containers. Wrappers (``state_dict``,
    ``model``, ``model_state_dict``) and a ``module.`` prefix are removed. Raises FileNotFoundError for a
    missing file and WeightsError for a file that is not a weights file or that holds pickled objects.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return _unwrap(load_file(path, device=str(map_location)), path)
        except SafetensorError as err:
            raise WeightsError(f"{path} is not a valid safetensors file: {err}") from err
    return _unwrap(load_weights_only(path, map_location, RESAVE_HINT), path)


def _first_line(err: BaseException) -> str:
    """The error's first line, without PyTorch's advice to load with ``weights_only=False`` (running the
    file's pickled code is never the fix for a file that does not load)."""
    lines = [line for line in str(err).splitlines() if line.strip() and "weights_only" not in line]
    return lines[0].strip()[:200] if lines else type(err).__name__


def _pickles_objects(path: Path) -> bool:
    """Whether ``path`` starts with a well-formed pickle that imports or builds objects. Only reads its
    opcodes (``pickletools.genops`` executes nothing); bytes that are no pickle at all stop it at once."""
    try:
        with open(path, "rb") as handle:  # read to its STOP opcode first: random bytes may start like one
            names = {opcode.name for opcode, _, _ in pickletools.genops(handle)}
        return bool(names & OBJECT_OPCODES)
    except Exception:  # not a pickle: genops raises ValueError, EOFError, ... on the first bad byte
        return False


def load_weights_only(path: Path, map_location: str | torch.device, fix: str) -> object:
    """``torch.load(weights_only=True)``; any failure becomes one ``WeightsError`` line naming ``path``, why
    and ``fix``."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if REFUSED_OBJECT.search(str(err)) or _pickles_objects(path):
            raise WeightsError(
                f"{path} contains pickled Python objects that a weights-only load refuses (loading them "
                f"would run arbitrary code); {fix}"
            ) from err
        raise WeightsError(
            f"{path} is not a PyTorch weights file: its bytes do not decode as one (corrupt, cut short or "
            f"another format); {fix}"
        ) from err
    except Exception as err:  # torch.load raises many types on non-checkpoint bytes (KeyError, EOFError, ...)
        raise WeightsError(
            f"{path} is not a PyTorch weights file or it is truncated ({type(err).__name__}: "
            f"{_first_line(err)}); {fix}"
        ) from err
