"""No code from checkpoints: every pickle in a checkpoint is read by torch's weights-only unpickler, which builds
tensors, containers, numbers and strings, plus the few classes allow-listed here, and refuses anything else (a
``__reduce__`` that would run a command).

The libraries' own loaders unpickle freely, so they are routed through the same loader:

- DeepSpeed's ``engine.load_checkpoint`` reads through ``engine.checkpoint_engine.load``
  (``torch.load(weights_only=False)``): :func:`guard_deepspeed` replaces it on the engine.
- torch DCP's ``FileSystemReader.read_metadata`` is a plain ``pickle.load`` and ``DefaultLoadPlanner.load_bytes``
  a ``torch.load(weights_only=False)``: use :class:`SafeReader` and :class:`SafePlanner`.
- RNG states are stored as JSON (launcher/checkpoint.py), not pickled.

:func:`check_checkpoint` opens every pickle of a checkpoint this way (tensors memory-mapped, not read), so the
launcher and the merge refuse a crafted checkpoint, naming the file, before any library touches it.
"""

from __future__ import annotations

import io
import pathlib
import pickle
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, MetadataIndex, StorageMeta

from launcher.checkpoint import CheckpointError


def allowed_globals(deepspeed: bool = False) -> list[Any]:
    """The classes (beyond torch's own safe set) that this launcher's checkpoints contain. DeepSpeed's are
    imported only for DeepSpeed files (importing DeepSpeed takes seconds)."""
    m = dcp_metadata
    out = [m.Metadata, m.TensorStorageMetadata, m.BytesStorageMetadata, m.ChunkStorageMetadata,  # DCP .metadata
           m.TensorProperties, m.MetadataIndex, m.StorageMeta, m._MEM_FORMAT_ENCODING, _StorageInfo,
           pathlib.PosixPath, torch.Size, torch.serialization._get_layout]
    if deepspeed:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        out += [ZeroStageEnum, LossScaler, fragment_address]  # in DeepSpeed's optimizer states (ZeRO-2, -3)
    return out


def _refused(where: Path | str, err: Exception) -> CheckpointError:
    detail = str(err).strip().splitlines()
    why = next((line.strip() for line in detail if "GLOBAL" in line or "global" in line), detail[0] if detail else "")
    return CheckpointError(
        f"{where} holds a Python object that is not plain checkpoint data ({why[:200]}); loading it could run "
        f"code, so it is refused. This launcher's training never writes such objects: the file was crafted or "
        f"replaced. Use a checkpoint from a source you trust.")


def torch_load(f: str | Path | BinaryIO, where: Path | str | None = None, **kwargs: Any) -> Any:
    """``torch.load(weights_only=True)`` with this launcher's allow-list; refusal names the file."""
    for deepspeed in (False, True):
        try:
            with torch.serialization.safe_globals(allowed_globals(deepspeed)):
                return torch.load(f, weights_only=True, **kwargs)
        except pickle.UnpicklingError as err:
            if deepspeed or "deepspeed." not in str(err):
                raise _refused(where or f, err) from None
            if hasattr(f, "seek"):
                f.seek(0)


class _MetadataUnpickler(pickle.Unpickler):
    """DCP writes .metadata as a plain pickle (protocol 4, which torch's weights-only unpickler does not read):
    this one builds only the allow-listed classes and torch dtypes, so a ``__reduce__`` can call nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = {f"{g.__module__}.{g.__qualname__}": g for g in allowed_globals()}
        if f"{module}.{name}" in allowed:
            return allowed[f"{module}.{name}"]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")


def unpickle(f: BinaryIO, where: Path | str) -> Any:
    """A plain pickle (DCP's .metadata) through :class:`_MetadataUnpickler`."""
    try:
        return _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as err:
        raise _refused(where, err) from None


class SafeReader(FileSystemReader):
    """DCP's file reader with the metadata unpickled by :func:`unpickle`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = unpickle(f, path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafeBytes:
    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        obj = torch_load(value, where=f"the checkpoint entry {read_item.dest_index.fqn!r}")
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


class SafePlanner(_SafeBytes, DefaultLoadPlanner):
    """DCP's default load planner with byte entries (optimizer hyper-parameters) loaded weights-only."""


class SafeEmptyPlanner(_SafeBytes, _EmptyStateDictLoadPlanner):
    """DCP's planner for loading a whole checkpoint without a template, with byte entries loaded weights-only."""


def guard_deepspeed(engine: Any) -> None:
    """Make ``engine.load_checkpoint`` read every file weights-only."""
    engine.checkpoint_engine.load = lambda path, map_location=None: torch_load(path, map_location=map_location)


def _check_dcp(folder: Path) -> None:
    """Unpickle a DCP folder's .metadata and every byte entry it indexes."""
    with open(folder / ".metadata", "rb") as f:
        md = unpickle(f, folder / ".metadata")
    for fqn, item in md.state_dict_metadata.items():
        if not isinstance(item, BytesStorageMetadata):
            continue
        info = md.storage_data[MetadataIndex(fqn)]
        with open(folder / info.relative_path, "rb") as f:
            f.seek(info.offset)
            blob = io.BytesIO(f.read(info.length))
        torch_load(blob, where=f"{folder / info.relative_path} (entry {fqn!r})")


def check_checkpoint(ckpt: Path) -> None:
    """Open every pickle in ``ckpt`` weights-only (tensors are memory-mapped, not read); raise
    :class:`CheckpointError` naming the first file that holds anything else."""
    for path in sorted(ckpt.rglob("*")):
        if path.name == ".metadata":
            _check_dcp(path.parent)
        elif path.is_file() and path.suffix == ".pt":
            if zipfile.is_zipfile(path):
                torch_load(path, where=path, map_location="cpu", mmap=True)
            else:  # the legacy (non-zip) torch format cannot be memory-mapped
                torch_load(path, where=path, map_location="cpu")
