"""The one list of GeoAlign's backends (imports nothing of the package: the backends and the package read it)."""
from __future__ import annotations

import importlib

#: the one list of backends: name -> (submodule, class) of its SparseBackend; reference is not a sparse backend (the
#: fusion runs it as the literal equations). The command line's choices, resolve / get_sparse_backend, the
#: availability checks and the bank's autograd node (which finds its backward by name) all read this.
REGISTRY: dict[str, tuple[str, str] | None] = {
    "reference": None,
    "torch": ("torch_sparse", "TorchBackend"),
    "triton": ("triton_backend", "TritonBackend"),
    "cuda": ("cuda_backend", "CudaBackend"),
}
ALL_BACKENDS = tuple(REGISTRY)
SPARSE_BACKENDS = tuple(name for name, where in REGISTRY.items() if where is not None)

#: the classes backend_class has loaded, by name (a plain dict: the bank's backward reads it under torch.compile)
LOADED: dict[str, type] = {}


def backend_class(name: str) -> type:
    """The SparseBackend subclass registered under ``name`` (its module is imported on first use)."""
    if name not in LOADED:
        where = REGISTRY.get(name)
        if where is None:
            raise ValueError(f"{name!r} is not a sparse backend; expected one of {SPARSE_BACKENDS}")
        LOADED[name] = getattr(importlib.import_module(f".{where[0]}", __package__), where[1])
    return LOADED[name]
