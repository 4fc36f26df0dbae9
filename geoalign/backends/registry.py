"""The one list of GeoAlign's backends (imports nothing of the package: the backends and the package read it)."""
from __future__ import annotations

import importlib

#: the one list of backends: name -> (submodule, class, sparse): every backend has routes(fusion, q) and
#: open_stream(fusion, q, gather_index); the sparse ones are SparseBackends (exact sparse streaming), the reference
#: computes eqs. 1-8 literally. The command line's choices, get_backend, the availability checks and the bank's
#: autograd node (which finds its backward by name) all read this.
REGISTRY: dict[str, tuple[str, str, bool]] = {
    "reference": ("reference", "ReferenceBackend", False),
    "torch": ("torch_sparse", "TorchBackend", True),
    "triton": ("triton_backend", "TritonBackend", True),
    "cuda": ("cuda_backend", "CudaBackend", True),
}
ALL_BACKENDS = tuple(REGISTRY)
SPARSE_BACKENDS = tuple(name for name, (_module, _cls, sparse) in REGISTRY.items() if sparse)

#: the classes backend_class has loaded, by name (a plain dict: the bank's backward reads it under torch.compile)
LOADED: dict[str, type] = {}


def backend_class(name: str) -> type:
    """The backend class registered under ``name`` (its module is imported on first use)."""
    if name not in LOADED:
        if name not in REGISTRY:
            raise ValueError(f"unknown backend {name!r}; expected one of {ALL_BACKENDS}")
        module, cls, _sparse = REGISTRY[name]
        LOADED[name] = getattr(importlib.import_module(f".{module}", __package__), cls)
    return LOADED[name]
