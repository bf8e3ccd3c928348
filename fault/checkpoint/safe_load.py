"""Reading checkpoints without ever unpickling arbitrary classes.

DCP stores tensor data with `torch.save` (read back with `weights_only=True`), but two of
its read paths unpickle with no restriction: `FileSystemReader.read_metadata` calls
`pickle.load` on `.metadata`, and `DefaultLoadPlanner.load_bytes` calls
`torch.load(weights_only=False)` on non-tensor items (the optimizer's hyper-parameters).
A crafted checkpoint could run code through either. We close both:

- `SafeFileSystemReader` reads `.metadata` with `RestrictedUnpickler`, whose `find_class`
  admits only DCP's metadata dataclasses and enums, `torch.Size`, torch dtypes / layouts /
  memory formats and `pathlib` paths. Every other global (os.system, builtins.eval,
  functools.partial, ...) is refused before it is looked up, so nothing executes.
- `SafeLoadPlanner.load_bytes` uses `torch.load(weights_only=True)`.

Why a restricted unpickler and not only the manifest hashes: the SHA-256 table detects
corruption, but whoever can write a malicious `.metadata` can also write a matching
manifest (nothing is signed). Hash checks run first anyway, so a torn or corrupt file is
reported as such; the restricted unpickler is what makes a well-formed malicious file
harmless. Everything else suanli writes (train state, RNG, manifest) is JSON.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from .manifest import CheckpointError

_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_ALLOWED = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "Path"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles DCP checkpoint metadata and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        value = getattr(torch, name, None) if module == "torch" else None
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            return value
        if module == _DCP_MODULES[0]:
            # DCP's metadata module holds only plain data classes; admit those (and enums),
            # never a function or anything imported into it.
            import torch.distributed.checkpoint.metadata as md

            obj = getattr(md, name, None)
            if isinstance(obj, type) and obj.__module__ == module and (
                    dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
                return obj
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in checkpoint metadata")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed in checkpoint metadata")


def load_metadata(path: str | Path) -> Metadata:
    """Read a DCP `.metadata` file through the restricted unpickler."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            md = RestrictedUnpickler(io.BufferedReader(f)).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, IndexError) as e:
        raise CheckpointError(f"{path}: refused to load DCP metadata ({e}); the file was not written by DCP or was "
                              f"tampered with. Do not load this checkpoint; resume from another one") from None
    if not isinstance(md, Metadata):
        raise CheckpointError(f"{path}: holds a {type(md).__name__}, not DCP metadata; do not load this checkpoint")
    return md


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with the metadata read through `load_metadata`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        md = load_metadata(self._get_metadata_path(rank))
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, but non-tensor items load with `weights_only=True`."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"checkpoint item {read_item.dest_index.fqn}: refused to unpickle ({e}); "
                                  "the checkpoint was tampered with — do not load it") from None
        if self.flatten_state_dict:
            # The same helper DefaultLoadPlanner uses, taken from its module.
            from torch.distributed.checkpoint.default_planner import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


__all__ = ["RestrictedUnpickler", "load_metadata", "SafeFileSystemReader", "SafeLoadPlanner"]
