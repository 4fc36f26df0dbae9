"""Shared helpers: dtype mapping, exact-GELU device functions, output allocation (with a poisoning test hook)."""
from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl

from . import runtime
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


#: whether the one-time warning about fp32 launches on the exact "ieee" path has been given in this process
_IEEE_WARNED = False


def dot_precision(dtype: torch.dtype, device=None):
    """tl.dot input_precision for parameters of ``dtype`` launched on ``device``: None (the default) for 16-bit
    operands; "ieee" for fp64, and for fp32 unless runtime.TF32 is on (env GEOALIGN_TF32=1): tl.dot's own default
    would be TF32 for fp32 on a GPU, unlike torch's default matmul. With TF32 on, fp32 on a GPU gets "tf32"; the
    interpreter keeps "ieee" (it has no TF32). The first fp32 launch on the "ieee" path on a CUDA device warns once
    per process (UserWarning naming GEOALIGN_TF32): that path is several times slower than the tensor cores."""
    global _IEEE_WARNED
    operands = dot_dtype(dtype)
    if operands not in (tl.float32, tl.float64):
        return None
    if operands == tl.float32 and dtype == torch.float32 and not INTERPRET:
        if runtime.TF32:
            return "tf32"
        if not _IEEE_WARNED and device is not None and torch.device(device).type == "cuda":
            _IEEE_WARNED = True
            warnings.warn("geoalign_kernels: fp32 parameters run tl.dot on the exact 'ieee' path (fp32 FMAs, not "
                          "the tensor cores); set GEOALIGN_TF32=1 (or geoalign_kernels.runtime.TF32 = True) to "
                          "allow TF32, as torch.backends.cuda.matmul.allow_tf32 does for torch", stacklevel=3)
    return "ieee"


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
