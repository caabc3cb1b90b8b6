"""Read the tensors of HPA-Cell-Segmentation's published whole-model pickles without running pickled code.

The Zenodo files (``dpn_unet_nuclei_v1.pth``, ``dpn_unet_cell_3ch_v1.pth``, ``dpn_unet_cell_v2.pth``) are
``torch.save(model)`` of a ``pytorch_zoo.unet.DPNUnet`` (possibly inside ``DataParallel``): a weights-only
load refuses them, and a plain ``torch.load`` would import ``pytorch_zoo`` and run whatever the file says.
Here a restricted unpickler reads them instead:

- a global is looked up only in ``ALLOWED``, the classes such a file holds (upstream's modules, the
  ``torch.nn`` modules they are made of, ``OrderedDict``, the tensor rebuild functions, storage types);
  each resolves to an inert stand-in of this module, never to the class itself: a module becomes a
  ``PickledModule`` that only keeps its attribute dict, a tensor is rebuilt from the file's bytes by
  ``_rebuild_tensor`` (numpy, bounds-checked). Any other global (``os.system``, ``builtins.eval``, a class
  of another package) stops the load with one line naming it: a ``__reduce__`` that calls a function
  cannot run;
- storages come from the file's own records, through ``persistent_load`` (zip format: ``<archive>/data/<key>``;
  the legacy format of PyTorch < 1.6: the raw blocks after the pickle).

``load_whole_model(path)`` returns the model's ``name -> tensor`` state dict (a ``DataParallel``'s
``module.`` prefix removed), the same names ``model.state_dict()`` would give.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from weakcell.weights import WeightsError

# Classes of the published files (upstream's model and the torch.nn modules it is made of; the test
# fixture's ``module_classes`` lists those of upstream's DPNUnet), and what a DataParallel wrapper adds.
MODULE_CLASSES = frozenset(
    {
        "pytorch_zoo.unet.DPNUnet",
        "pytorch_zoo.abstract_model.ConvBottleneck",
        "pytorch_zoo.abstract_model.UnetDecoderBlock",
        "pytorch_zoo.dpn.DualPathBlock",
        "pytorch_zoo.dpn.BnActConv2d",
        "pytorch_zoo.dpn.CatBnAct",
        "torch.nn.modules.container.ModuleList",
        "torch.nn.modules.container.Sequential",
        "torch.nn.modules.conv.Conv2d",
        "torch.nn.modules.batchnorm.BatchNorm2d",
        "torch.nn.modules.activation.ReLU",
        "torch.nn.modules.pooling.MaxPool2d",
        "torch.nn.modules.upsampling.Upsample",
        "torch.nn.parallel.data_parallel.DataParallel",
    }
)
# Storage classes by the dtype of their elements (the legacy names ``torch.save`` still writes).
STORAGE_TYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER


class PickledModule:
    """Stand-in for a pickled ``nn.Module``: its attribute dict, nothing run."""

    qualified_name = "module"

    def __init__(self) -> None:  # NEWOBJ calls __new__ only; a REDUCE with arguments fails here
        self.state: dict[str, Any] = {}

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"{self.qualified_name} carries a {type(state).__name__} state")
        self.state = state


class Storage:
    """A storage record: element dtype and the raw little-endian bytes."""

    def __init__(self, dtype: np.dtype, data: bytes) -> None:
        self.dtype, self.data = dtype, data

    @property
    def numel(self) -> int:
        return len(self.data) // self.dtype.itemsize


class PendingTensor:
    """A tensor record: storage, offset, size, stride. Materialised by ``tensor()`` once the file is read
    (the legacy format stores the bytes after the pickle)."""

    def __init__(self, storage: Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def tensor(self) -> torch.Tensor:
        """A new contiguous tensor, every index checked to lie inside the storage."""
        storage, offset, size, stride = self.storage, self.offset, self.size, self.stride
        last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset - 1
        if last >= storage.numel:
            raise pickle.UnpicklingError(f"a tensor reaches element {last} of a storage of {storage.numel}")
        elements = np.frombuffer(storage.data, dtype=storage.dtype)
        if not size:  # a scalar (as_strided reads an empty shape as "keep the shape")
            view = elements[offset : offset + 1].reshape(())
        else:
            strides = [step * storage.dtype.itemsize for step in stride]
            view = np.lib.stride_tricks.as_strided(
                elements[offset:], shape=size, strides=strides, writeable=False
            )
        # a C-ordered copy in native byte order (ascontiguousarray would turn a scalar into shape (1,))
        return torch.from_numpy(np.array(view, dtype=storage.dtype.newbyteorder("="), order="C", copy=True))


def _rebuild_tensor(
    storage: object,
    offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool = False,
    hooks: object = None,
    metadata: object = None,
) -> PendingTensor:
    """``torch._utils._rebuild_tensor_v2``: the record of a tensor in ``storage`` (checked for shape)."""
    if not isinstance(storage, Storage):
        raise pickle.UnpicklingError(f"a tensor is rebuilt from a {type(storage).__name__}, not a storage")
    if not all(isinstance(v, int) and v >= 0 for v in (offset, *size, *stride)) or len(size) != len(stride):
        raise pickle.UnpicklingError(
            f"invalid tensor geometry: offset {offset}, size {size}, stride {stride}"
        )
    return PendingTensor(storage, offset, tuple(size), tuple(stride))


def _rebuild_parameter(
    data: object, requires_grad: bool = False, hooks: object = None, state: object = None
) -> PendingTensor:
    """``torch._utils._rebuild_parameter(_with_state)``: the parameter's tensor."""
    if not isinstance(data, PendingTensor):
        raise pickle.UnpicklingError(f"a parameter wraps a {type(data).__name__}, not a tensor")
    return data


def _device(*args: object) -> str:
    """``torch.device(...)`` of a DataParallel's attributes: kept as text."""
    return ":".join(str(arg) for arg in args)


def _module_class(path: str) -> type[PickledModule]:
    return type(path.rpartition(".")[2], (PickledModule,), {"qualified_name": path})


ALLOWED: dict[str, object] = {
    **{path: _module_class(path) for path in MODULE_CLASSES},
    "collections.OrderedDict": OrderedDict,
    "builtins.set": set,  # a module's _non_persistent_buffers_set under pickle protocol 2
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch.device": _device,
    **{f"torch.{name}": dtype for name, dtype in STORAGE_TYPES.items()},
}


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only ``ALLOWED`` globals; storages through ``fetch(key, dtype, numel)``."""

    def __init__(self, stream: io.BufferedIOBase, fetch: Callable[[str, np.dtype, int], Storage]) -> None:
        super().__init__(stream)
        self.fetch = fetch
        self.storages: dict[str, Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__builtin__":  # Python 2 names, which pickle protocol 2 writes
            module = "builtins"
        path = f"{module}.{name}"
        if path not in ALLOWED:
            raise pickle.UnpicklingError(f"global {path} is not one of the classes such a file holds")
        return ALLOWED[path]

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "module":
            # The legacy format names each module class with its source text: the class (a stand-in) only.
            if not (isinstance(pid[1], type) and issubclass(pid[1], PickledModule)):
                raise pickle.UnpicklingError(f"a module record names {pid[1]!r}")
            return pid[1]
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent record {str(pid)[:80]}")
        dtype, key, numel = pid[1], str(pid[2]), pid[4]
        if not isinstance(dtype, np.dtype) or not isinstance(numel, int):
            raise pickle.UnpicklingError(f"storage record {key} names no known storage type")
        if key not in self.storages:
            self.storages[key] = self.fetch(key, dtype, numel)
        return self.storages[key]


def _walk(module: object, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """``state_dict()`` of a tree of ``PickledModule``: parameters, then buffers, then children, in order
    (non-persistent buffers left out, as ``state_dict`` does)."""
    if not isinstance(module, PickledModule):
        raise pickle.UnpicklingError(f"{prefix or 'the file'} holds a {type(module).__name__}, not a module")
    state = module.state
    skipped = state.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        for name, tensor in (state.get(group) or {}).items():
            if tensor is None or (group == "_buffers" and name in skipped):
                continue
            if not isinstance(tensor, PendingTensor):
                raise pickle.UnpicklingError(f"{prefix}{name} is a {type(tensor).__name__}, not a tensor")
            yield prefix + name, tensor.tensor()
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            yield from _walk(child, f"{prefix}{name}.")


def _zip_storages(archive: zipfile.ZipFile) -> tuple[bytes, Callable[[str, np.dtype, int], Storage]]:
    """The pickle and a storage reader of a zip-format file (``<prefix>/data.pkl``, ``<prefix>/data/<key>``)."""
    pickles = [name for name in archive.namelist() if name.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise pickle.UnpicklingError("a zip without exactly one data.pkl")
    prefix = pickles[0][: -len("data.pkl")]

    def fetch(key: str, dtype: np.dtype, numel: int) -> Storage:
        data = archive.read(f"{prefix}data/{key}")
        if len(data) < numel * dtype.itemsize:
            raise pickle.UnpicklingError(f"storage {key} holds {len(data)} bytes, {numel} elements expected")
        return Storage(dtype, data[: numel * dtype.itemsize])

    return archive.read(pickles[0]), fetch


def _legacy_state(stream: io.BufferedIOBase) -> object:
    """Unpickle a legacy-format file: magic number, protocol, system info, the pickle, its storage keys,
    then each storage as an int64 element count and the raw elements."""
    header = RestrictedUnpickler(stream, _no_storage)
    if header.load() != LEGACY_MAGIC:
        raise pickle.UnpicklingError("not a PyTorch file (no magic number)")
    RestrictedUnpickler(stream, _no_storage).load()  # protocol version
    RestrictedUnpickler(stream, _no_storage).load()  # system info
    pending: dict[str, Storage] = {}

    def fetch(key: str, dtype: np.dtype, numel: int) -> Storage:
        pending[key] = Storage(dtype, b"")  # filled from the blocks after the pickle
        return pending[key]

    result = RestrictedUnpickler(stream, fetch).load()
    keys = RestrictedUnpickler(stream, _no_storage).load()
    if not isinstance(keys, list):
        raise pickle.UnpicklingError("the storage key list is missing")
    for key in keys:
        storage = pending.get(str(key))
        if storage is None:
            raise pickle.UnpicklingError(f"storage {key} was never referenced")
        (count,) = struct.unpack("<q", stream.read(8))
        storage.data = stream.read(count * storage.dtype.itemsize)
        if count < 0 or len(storage.data) != count * storage.dtype.itemsize:
            raise pickle.UnpicklingError(f"storage {key} is truncated")
    return result


def _no_storage(key: str, dtype: np.dtype, numel: int) -> Storage:
    raise pickle.UnpicklingError("a storage where none may be")


def load_whole_model(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a whole-model pickle of HPA-Cell-Segmentation (see the module doc). Raises
    ``WeightsError`` in one line for anything else, without running any of it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                data, fetch = _zip_storages(archive)
                model = RestrictedUnpickler(io.BytesIO(data), fetch).load()
        else:
            with path.open("rb") as stream:
                model = _legacy_state(stream)
        if isinstance(model, PickledModule) and model.qualified_name.endswith("DataParallel"):
            model = (model.state.get("_modules") or {}).get("module")
        state = dict(_walk(model))
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        KeyError,
        struct.error,
        zipfile.BadZipFile,
    ) as err:
        raise WeightsError(
            f"{path} is not an HPA-Cell-Segmentation model file that loads without running code: {err}; use "
            "the published dpn_unet_*.pth files (Zenodo record 4665863) or their safetensors conversion "
            "(make weights)"
        ) from err
    if not state:
        raise WeightsError(f"{path} holds a model without tensors; use the published dpn_unet_*.pth files")
    return state
