"""geoalign_kernels: fused Triton kernels for GeoAlign's routed feature bank (forward and backward).

Modules (one per op, each with its kernels, launcher and autograd wiring / torch.library custom ops):
  routing  router fc2 + Top-K + masked softmax; backward dS -> router fc2 grads    (geoalign::triton_route*)
  bank     gathered GEMM1 with on-the-fly LayerNorm, GELU, alpha-weighted accumulation into h_bar; backward
                                                                                  (geoalign::triton_bank_*; h_bar mutated in place)
  output   projector.fc2 + out_proj + residual (and the folded W_out.W2 inference path)  (geoalign::triton_output*)
  gemm     shared strided GEMM kernel;  configs: per-device tile configs;  backend: TritonBackend
Set TRITON_INTERPRET=1 before importing to run on CPU.
"""
from .backend import TritonBackend
from .bank import BankAccumulate, bank_accumulate
from .output import fold_output_weights, output
from .routing import route_op

__all__ = ["TritonBackend", "BankAccumulate", "bank_accumulate", "fold_output_weights", "output", "route_op"]
