"""Shared helpers: dtype mapping, exact-GELU device functions, output allocation (with a poisoning test hook)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .runtime import INTERPRET

_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32, torch.float64: tl.float64}

#: test hook: when True, every buffer a kernel must fully write is allocated NaN-filled (ints: -7) instead of empty
POISON = False


def alloc(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An output buffer the launching kernel writes completely (torch.empty; NaN/-7 filled when POISON)."""
    if not POISON:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else -7
    return torch.full(shape, fill, dtype=dtype, device=device)


def tl_dtype(dtype: torch.dtype):
    return _TL[dtype]


def dot_dtype(dtype: torch.dtype):
    """tl dtype of tl.dot operands for parameter dtype `dtype`. The interpreter's bf16 dot is wrong (it multiplies
    bit patterns), so bf16 operands are upcast to fp32 there; on a GPU bf16/fp16 operands go to the tensor cores."""
    if INTERPRET and dtype == torch.bfloat16:
        return tl.float32
    return _TL[dtype]


def dot_precision(dtype: torch.dtype):
    """tl.dot input_precision: "ieee" for fp32/fp64 operands (tl.dot would use TF32 for fp32 on a GPU, unlike torch's
    default matmul), None (the default) for 16-bit operands."""
    return "ieee" if dot_dtype(dtype) in (tl.float32, tl.float64) else None


def rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """`t` with unit stride in its last dim (copied once, explicitly, when it is not)."""
    return t if t.stride(-1) == 1 else t.contiguous()


@triton.jit
def gelu(z):
    """Exact (erf) GELU, elementwise, in z's dtype."""
    return 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))


@triton.jit
def gelu_grad(z):
    """d/dz GELU(z) = Phi(z) + z * phi(z)."""
    return 0.5 * (1.0 + tl.erf(z * 0.7071067811865476)) + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
