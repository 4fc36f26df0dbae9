"""The one list of GeoAlign's backends (imports nothing of the package: the backends and the package read it)."""
from __future__ import annotations

import importlib
from typing import NamedTuple


class BackendEntry(NamedTuple):
    module: str    # submodule of geoalign.backends
    cls: str       # its backend class
    sparse: bool   # a SparseBackend (exact sparse streaming); the reference computes eqs. 1-8 literally
    needs: str     # what it needs to run, for error messages ("" where it runs anywhere)


#: the one list of backends: every backend has routes(fusion, q) and open_stream(fusion, q, gather_index). The
#: command line's choices, get_backend, the availability checks and their messages, the benchmarks and the bank's
#: autograd node (which finds its backward by name) all read this.
REGISTRY: dict[str, BackendEntry] = {
    "reference": BackendEntry("reference", "ReferenceBackend", False, ""),
    "torch": BackendEntry("torch_sparse", "TorchBackend", True, ""),
    "triton": BackendEntry("triton_backend", "TritonBackend", True,
                           "Triton runs on a CUDA device, or on the CPU under TRITON_INTERPRET=1 (slow; for tests)"),
    "cuda": BackendEntry("cuda_backend", "CudaBackend", True, "the cuda backend needs a CUDA device and its extension"),
}
ALL_BACKENDS = tuple(REGISTRY)
SPARSE_BACKENDS = tuple(name for name, entry in REGISTRY.items() if entry.sparse)

#: the classes backend_class has loaded, by name (a plain dict: the bank's backward reads it under torch.compile)
LOADED: dict[str, type] = {}


def backend_class(name: str) -> type:
    """The backend class registered under ``name`` (its module is imported on first use)."""
    if name not in LOADED:
        if name not in REGISTRY:
            raise ValueError(f"unknown backend {name!r}; expected one of {ALL_BACKENDS}")
        entry = REGISTRY[name]
        LOADED[name] = getattr(importlib.import_module(f".{entry.module}", __package__), entry.cls)
    return LOADED[name]
