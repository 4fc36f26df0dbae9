"""geoalign_kernels: fused Triton kernels for GeoAlign's routed feature bank (forward and backward).

Modules (one per op, each with its kernels, launcher and autograd wiring / torch.library custom ops):
  routing  router fc2 + Top-K + masked softmax; backward dS -> router fc2 grads    (geoalign::triton_route*)
  bank     the pairs grouped by layer; per bank layer: gather + normalise (writing GEMM1's operand with the LN
           affine applied); GEMM1, a plain GEMM (per layer into h_bar at inference, once for every layer in
           training); one grouped backward
                                                                        (geoalign::triton_bank_*; h_bar in place)
  output   projector.fc2 + out_proj + residual (and the folded W_out.W2 inference path)  (geoalign::triton_output*)
  gemm     shared strided GEMM kernel (TMA descriptors on sm_90, persistent grid);  configs: per-device, per-site
           tile configs and autotune;  utils: dtypes, GELU, allocation;  precompile: record a workload's kernel
           variants and build them ahead in a process pool
  checks   host-side argument checks of every launcher;  guard: GEOALIGN_GUARD=1 canary-padded output buffers
  library  idempotent torch.library.custom_op registration
This package imports torch and triton only (the GeoAlign backend built on it is geoalign.backends.triton_backend);
``library``, ``checks`` and ``guard`` import torch only. The op modules are imported on first attribute access, so
``import geoalign_kernels.library`` does not need Triton. Set TRITON_INTERPRET=1 before importing to run on CPU.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "bank_rows_op": "bank", "bank_layer_forward_op": "bank", "bank_tape_forward_op": "bank", "bank_backward_op": "bank",
    "fold_output_weights": "output", "output": "output",
    "route_op": "routing",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'geoalign_kernels' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
