"""Rules every GeoAlign backend shares, kept in one place (torch only; importable without Triton).

INTERPRET   True when Triton kernels run under the Triton interpreter (TRITON_INTERPRET=1, set before import).
TF32        the switch for fp32 parameters' tl.dot on a GPU: False (the default) keeps the exact "ieee" path, as
            torch's default fp32 matmul; True (env GEOALIGN_TF32=1 at import, or set this attribute; read at each
            launch) lets the kernels use TF32 tensor cores (10-bit mantissa operands, fp32 accumulation), as
            torch.backends.cuda.matmul.allow_tf32 does for torch. Never under the interpreter.
acc_dtype   the accumulation dtype: h_bar, alpha, LayerNorm statistics and partial sums are fp32 for fp16 / bf16 /
            fp32 parameters and fp64 for fp64 parameters.
"""
from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
TF32 = os.environ.get("GEOALIGN_TF32", "0") == "1"


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulator dtype for parameters of ``dtype``: fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
