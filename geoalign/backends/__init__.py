"""Backends behind :class:`geoalign.GeoAlignFusion`'s one interface.

reference  paper eqs. 1-8 literally (dense bank); the oracle                              backends/reference.py
torch      exact sparse + streaming in plain PyTorch                                       backends/torch_sparse.py
triton     the same maths with fused Triton kernels (package ``geoalign_kernels``)        backends/triton_backend.py
cuda       CUDA kernels from csrc/ for routing, row lists and gather + LayerNorm          backends/cuda_backend.py

Every sparse backend is a :class:`geoalign.backends.base.SparseBackend`, driven by
:class:`geoalign.fusion.FusionStream`. This module imports torch only inside its functions, so the backend names can
be read (e.g. by the command line's argument parser) without importing torch.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from ..lazy_exports import deprecated_aliases
from .registry import ALL_BACKENDS, REGISTRY, SPARSE_BACKENDS, backend_class  # noqa: F401 (the package's names)

if TYPE_CHECKING:
    import torch

    from .base import SparseBackend


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when Triton imports and can run here (a CUDA device, or the interpreter with TRITON_INTERPRET=1)."""
    import torch
    from geoalign_kernels.runtime import INTERPRET

    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available() or INTERPRET


def resolve_backend_name(name: str | None, default: str, device: torch.device) -> str:
    """Map None/'auto' to a concrete backend: triton on CUDA when Triton is available, else torch."""
    name = default if name is None else name
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if name not in ALL_BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {('auto',) + ALL_BACKENDS}")
    return name


@functools.lru_cache(maxsize=None)
def get_backend(name: str, fold_output: bool = False):
    """The (cached) backend object for a backend name (routes / open_stream; fold_output: see SparseBackend). A
    backend that cannot run here is a RuntimeError saying what it needs."""
    import torch

    if name not in REGISTRY:
        raise ValueError(f"unknown backend {name!r}; expected one of {ALL_BACKENDS}")
    if name == "triton" and not triton_available():
        raise RuntimeError("backend='triton' needs Triton and a CUDA device (or TRITON_INTERPRET=1 set before import); "
                           "use backend='torch' instead")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("backend='cuda' needs a CUDA device; use backend='torch' instead")
    # (the module is imported only now: the triton backend's needs Triton) the cuda backend raises with the reason
    # if its extension cannot load
    return backend_class(name)(fold_output=fold_output)


def get_sparse_backend(name: str, fold_output: bool = False):
    """Deprecated (one release): :func:`get_backend`, for the sparse backends only, as before the reference became a
    backend object too."""
    import warnings

    warnings.warn("geoalign.backends.get_sparse_backend is deprecated; use get_backend", DeprecationWarning,
                  stacklevel=2)
    if name not in SPARSE_BACKENDS:
        raise ValueError(f"unknown sparse backend {name!r}; expected one of {SPARSE_BACKENDS}")
    return get_backend(name, fold_output)


def backend_runs_on(name: str, device: torch.device) -> bool:
    """Whether backend ``name`` can run on ``device`` here: reference and torch anywhere; triton on CUDA devices, and
    on the CPU only under the interpreter; cuda on CUDA devices with its extension (the first call may JIT-build
    csrc/, cached afterwards: only this name pays for it)."""
    from geoalign_kernels.runtime import INTERPRET

    if name not in REGISTRY:
        raise ValueError(f"unknown backend {name!r}; expected one of {ALL_BACKENDS}")
    if name == "triton":
        return triton_available() and (device.type == "cuda" or (device.type == "cpu" and INTERPRET))
    if name == "cuda":
        if device.type != "cuda":
            return False
        from geoalign_kernels.cuda.extension import cuda_backend_available

        return cuda_backend_available()
    return True                              # reference and torch run anywhere


def available_backends(device: torch.device) -> list[str]:
    """The backends that can run on ``device`` here (:func:`backend_runs_on`), in ALL_BACKENDS order."""
    return [name for name in ALL_BACKENDS if backend_runs_on(name, device)]


__getattr__ = deprecated_aliases(__name__, {"SparseBackend": "geoalign.backends.base:SparseBackend",
                                            "TorchBackend": "geoalign.backends.torch_sparse:TorchBackend"})
