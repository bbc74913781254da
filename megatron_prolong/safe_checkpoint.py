"""Refuse a distributed checkpoint whose pickles would run code, before PyTorch unpickles them.

Megatron-Core's ``dist_checkpointing.load`` reads a checkpoint through PyTorch's
``torch.distributed.checkpoint``, which unpickles two things with no restriction:

- ``.metadata`` (``FileSystemReader.read_metadata``: ``pickle.load``), on every load, and
- each non-tensor item in the ``*.distcp`` files (Megatron's common state: step, scheduler, optimizer
  parameter groups; Transformer Engine ``_extra_state``), through
  ``DefaultLoadPlanner.load_bytes``: ``torch.load(weights_only=False)``.

A crafted file can name any callable there (``os.system`` through ``__reduce__``). :func:`verify`
parses all of them first with a restricted unpickler (the C ``pickle.Unpickler`` PyTorch uses
too, so both read the same opcodes) that admits only the globals real checkpoints contain, found
by reading checkpoints that Megatron-Core 0.19.2 saved for this project (model only, with the
optimizer, distributed optimizer, TP/PP/CP layouts, conversions, NeMo 2): PyTorch's
checkpoint-metadata dataclasses, ``torch.Size``, dtypes, layouts, tensor rebuilding and storage
types, ``OrderedDict`` and ``BytesIO``. The items are only parsed, nothing in them is built, so
the check runs no code of the checkpoint's; PyTorch's own load then calls only those globals.
"""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import torch

_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING",
    )
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
     # Megatron-Core 0.14 (the NeMo 2.5 checkpoints) pickles its save plan into .metadata: the
     # marker class MCoreSavePlan (empty) and torch's plain planner dataclasses and enum
     ("megatron.core.dist_checkpointing.strategies.torch", "MCoreSavePlan")} | {
    ("torch.distributed.checkpoint.planner", n) for n in (
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData")}
_ITEM_GLOBALS = {
    ("torch", "Size"), ("torch", "device"), ("collections", "OrderedDict"), ("_io", "BytesIO"), ("io", "BytesIO"),
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    ("torch.serialization", "_get_layout"),
}
_SAFE_BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "bool", "str", "bytes",
                  "bytearray", "slice"}


_PY2_NAMES = {"__builtin__": "builtins"}  # what pickle protocol 2 (torch.save's) calls the builtins


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is (trained on, loaded, converted); the message names
    it, what is wrong and what to do. The one error type of the package's checkpoint readers and
    writers, defined here, in the module they all import."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file names code outside the allow-list (or cannot be checked)."""


def _is_plain_torch_value(module: str, name: str) -> bool:
    """torch.float32, torch.strided, torch.FloatStorage: dtypes, layouts and storage types."""
    if module != "torch":
        return False
    obj = getattr(torch, name, None)
    return isinstance(obj, (torch.dtype, torch.layout)) or (
        isinstance(obj, type) and name.endswith("Storage") and issubclass(obj, torch.storage._LegacyStorage))


def _refuse(where: Path, module: str, name: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{where} would call {module}.{name} when unpickled, which a checkpoint never needs: the file was "
        "crafted or damaged and is not loaded (nothing in it was run). Get the checkpoint from its author "
        "again, or re-save trusted weights with this project's tools"
    )


class _MetadataUnpickler(pickle.Unpickler):
    """Builds the real metadata object, from the allow-listed classes only."""

    def __init__(self, file, where: Path) -> None:
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str):
        module = _PY2_NAMES.get(module, module)
        allowed = ((module, name) in _METADATA_CLASSES or _is_plain_torch_value(module, name)
                   or (module == "builtins" and name in _SAFE_BUILTINS))
        if not allowed:
            raise _refuse(self.where, module, name)
        return super().find_class(module, name)

    def persistent_load(self, pid):
        raise UnsafeCheckpointError(f"{self.where}: unexpected persistent id in checkpoint metadata")


class _Inert:
    """Stands for every object of a parsed item: accepts what the pickle does to it, builds nothing."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __call__(self, *args, **kwargs) -> _Inert:
        return _Inert()

    def __setstate__(self, state) -> None:
        pass

    def __setitem__(self, key, value) -> None:
        pass

    def append(self, value) -> None:
        pass

    def extend(self, values) -> None:
        pass


class _ItemChecker(pickle.Unpickler):
    def __init__(self, file, where: Path) -> None:
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str):
        module = _PY2_NAMES.get(module, module)
        ok = ((module, name) in _ITEM_GLOBALS or _is_plain_torch_value(module, name)
              or (module == "builtins" and name in _SAFE_BUILTINS))
        if not ok:
            raise _refuse(self.where, module, name)
        return _Inert

    def persistent_load(self, pid) -> _Inert:
        return _Inert()  # a tensor storage (torch.save's zip members); its type went through find_class


def read_metadata(path: str | Path, name: str = ".metadata"):
    """The checkpoint's ``.metadata`` (a torch.distributed.checkpoint Metadata), or another metadata
    file ``name`` of it, read safely."""
    f = Path(path) / name
    with open(f, "rb") as fh:
        try:
            return _MetadataUnpickler(fh, f).load()
        except UnsafeCheckpointError:
            raise
        except Exception as err:
            raise UnsafeCheckpointError(f"{f} is not a readable checkpoint metadata file: {err}") from err


def check_torch_save(data: bytes, where: Path) -> None:
    """Refuse ``torch.save`` output (zip format) whose pickles name code outside the allow-list."""
    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise UnsafeCheckpointError(f"{where} is not in torch.save's zip format; it cannot be checked and is not loaded")
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        for member in z.namelist():
            if member.endswith(".pkl"):
                try:
                    _ItemChecker(io.BytesIO(z.read(member)), where).load()
                except UnsafeCheckpointError:
                    raise
                except Exception as err:
                    raise UnsafeCheckpointError(f"{where}: {member} is not a readable pickle: {err}") from err


def verify(path: str | Path) -> None:
    """Raise :class:`UnsafeCheckpointError` unless every pickle that loading ``path`` unpickles is safe."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    path = Path(path)
    meta_json = path / "metadata.json"
    if meta_json.is_file():
        backend = json.loads(meta_json.read_text()).get("sharded_backend")
        if backend != "torch_dist":
            raise UnsafeCheckpointError(f"{path}: sharded_backend {backend!r} is not checked; only torch_dist loads")
    for extra in sorted(path.glob("__*.metadata")):  # per-rank metadata, read by some PyTorch paths
        read_metadata(path, extra.name)
    if (path / "common.pt").is_file():  # Megatron's legacy layout
        check_torch_save((path / "common.pt").read_bytes(), path / "common.pt")
    md = read_metadata(path)
    objects = {k for k, v in md.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)}
    for index, info in (md.storage_data or {}).items():
        if index.fqn not in objects:
            continue
        where = path / info.relative_path
        if info.transform_descriptors:
            raise UnsafeCheckpointError(f"{where}: {index.fqn} is stored transformed "
                                        f"({info.transform_descriptors}) and cannot be checked")
        if not where.resolve().is_relative_to(path.resolve()):
            raise UnsafeCheckpointError(f"{path}/.metadata points outside the checkpoint ({info.relative_path})")
        with open(where, "rb") as fh:
            fh.seek(info.offset)
            check_torch_save(fh.read(info.length), Path(f"{where}[{index.fqn}]"))
