"""Reading training checkpoints without running code from them.

A checkpoint directory may come from someone else, so nothing here unpickles its data with arbitrary globals:

  * accelerate's files (optimizer.bin, scheduler.bin, random_states_*.pkl) are read by accelerate with torch's
    ``weights_only=True`` loader (tensors, numbers, strings, containers only); :func:`check_accelerate_files` reads
    each one first the same way so that a refused or damaged file is one error naming it (accelerate itself would
    skip an unreadable RNG file silently and resume inexactly);
  * FSDP2's sharded states (torch.distributed.checkpoint): DCP unpickles its ``.metadata`` with plain ``pickle`` and
    its non-tensor items with ``weights_only=False``; :class:`SafeDCPReader` reads the metadata with an unpickler that
    admits DCP's own metadata classes only, and :class:`SafeDCPLoadPlanner` the items with ``weights_only=True``;
  * DeepSpeed's engine files: DeepSpeed calls ``torch.load(weights_only=False)``; :func:`deepspeed_weights_only`
    makes it ``weights_only=True`` for the duration of a load.
The scheduler of an FSDP2 run is stored as JSON by the trainer (accelerate would pickle it as a custom object).
"""
from __future__ import annotations

import contextlib
import io
import os
import pickle

import torch


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds something a safe loader refuses (code, or a class it does not know), or is damaged."""


def refused(path: str, error: BaseException) -> UnsafeCheckpointError:
    text = str(error).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    why = [ln for ln in lines if "unsupported" in ln.lower()]      # torch's weights_only reason, e.g. which GLOBAL
    first = (why or lines or [type(error).__name__])[0]
    return UnsafeCheckpointError(f"cannot read checkpoint file {path} safely: {first} (only tensors, numbers, "
                                 "strings and containers are read from a checkpoint; a file that holds anything else "
                                 "was not written by geoalign, or was changed)")


def load_tensors_only(path: str):
    """``torch.load(path, weights_only=True)`` on the CPU, its failure as one UnsafeCheckpointError naming the file."""
    from accelerate.utils import load

    try:
        return load(path, map_location="cpu", weights_only=True)
    except Exception as e:                            # UnpicklingError, RuntimeError (truncated zip), EOFError, ...
        raise refused(path, e) from None


def check_accelerate_files(directory: str, process_index: int) -> None:
    """Read every pickle-format file accelerate's load_state will read for this process with the weights_only
    loader first: a refused or damaged one is an error naming it, before anything is restored."""
    custom = [n for n in sorted(os.listdir(directory)) if n.startswith("custom_checkpoint_")]
    if custom:
        raise UnsafeCheckpointError(f"checkpoint {directory} holds {custom[0]}, a pickle geoalign never writes "
                                    "(accelerate would unpickle it with weights_only=False, running any code in it): "
                                    "not resuming from it")
    names = [n for n in sorted(os.listdir(directory)) if n.endswith(".bin")]
    rng = f"random_states_{process_index}.pkl"
    if os.path.isfile(os.path.join(directory, rng)):
        names.append(rng)
    for name in names:
        load_tensors_only(os.path.join(directory, name))


# ------------------------------------------------------------------------------------------------ DCP (FSDP2)
_DCP_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "MetadataIndex",
        "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class _DCPMetadataUnpickler(pickle.Unpickler):
    """Admits DCP's metadata classes, torch.Size, torch dtypes and layouts, paths; refuses every other global."""

    def find_class(self, module: str, name: str):
        if (module, name) in _DCP_METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in DCP metadata")


def _safe_reader_class():
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeDCPReader(FileSystemReader):
        """FileSystemReader whose metadata is read by an unpickler that admits DCP's own classes only."""

        def read_metadata(self, *args, **kwargs):
            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as f:
                data = f.read()
            try:
                metadata = _DCPMetadataUnpickler(io.BytesIO(data)).load()
            except Exception as e:
                raise refused(os.fspath(path), e) from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeDCPReader


def _safe_planner_class():
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class SafeDCPLoadPlanner(DefaultLoadPlanner):
        """DefaultLoadPlanner whose non-tensor items are read with torch's weights_only loader."""

        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            try:
                obj = torch.load(value, weights_only=True)
            except Exception as e:
                raise refused(f"{read_item.dest_index.fqn} (a DCP item)", e) from None
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafeDCPLoadPlanner


def safe_dcp_load(state: dict, path: str) -> None:
    """``torch.distributed.checkpoint.load(state, path)`` with the safe reader and planner (collective). A refused
    file is an UnsafeCheckpointError naming it (DCP would wrap it in its per-rank CheckpointException)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    reader = _safe_reader_class()(path)
    reader.read_metadata()                  # the metadata's verdict first, unwrapped
    try:
        dcp.load(state, storage_reader=reader, planner=_safe_planner_class()())
    except CheckpointException as e:
        for exc, _trace in e.failures.values():
            if isinstance(exc, UnsafeCheckpointError):
                raise exc from None
        raise


# ------------------------------------------------------------------------------------------------ DeepSpeed
def _deepspeed_classes() -> list:
    """The plain data classes DeepSpeed's ZeRO optimizer states hold (found by loading its checkpoints with
    weights_only=True): the loss scalers (attributes only), the ZeRO stage enum, the fragment address tuple."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def deepspeed_weights_only():
    """DeepSpeed's checkpoint engine loads with ``torch.load(weights_only=False)``; inside this context it loads
    with ``weights_only=True`` (a refused file is an UnsafeCheckpointError naming it)."""
    try:
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    except ImportError:
        yield
        return
    original = TorchCheckpointEngine.load
    allowed = _deepspeed_classes()

    def load(self, path, map_location=None):
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:
            raise refused(os.fspath(path), e) from None

    TorchCheckpointEngine.load = load
    try:
        yield
    finally:
        TorchCheckpointEngine.load = original
