"""Shared strided GEMM: C[M, N] = A[M, K] @ B[K, N] (+ bias[N]) (GELU) (+ residual[M, N]).

Used by the output stage (projector.fc2, out_proj, the folded W_out.W2) and by backward weight/input gradients.
A and B may be any strided views (transposes cost nothing); accumulation is fp32 (fp64 for fp64 inputs).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import FLOAT_DTYPES, check_tensor
from .configs import get_config
from .guard import guarded
from .runtime import acc_dtype
from .utils import alloc, dot_dtype, gelu, dot_precision, tl_dtype


@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, res_ptr, M, N, K,
                   s_am, s_ak, s_bk, s_bn, s_cm, s_cn, s_rm, s_rn,
                   HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT_GELU: tl.constexpr,
                   OP: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    mm = rm < M
    mn = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        mk = kk < K
        a = tl.load(a_ptr + rm[:, None] * s_am + kk[None, :] * s_ak, mask=mm[:, None] & mk[None, :], other=0.0)
        b = tl.load(b_ptr + kk[:, None] * s_bk + rn[None, :] * s_bn, mask=mk[:, None] & mn[None, :], other=0.0)
        acc = tl.dot(a.to(OP), b.to(OP), acc, input_precision=DOT_PREC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=mn, other=0.0).to(ACC)[None, :]
    if ACT_GELU:
        acc = gelu(acc)
    if HAS_RES:
        acc += tl.load(res_ptr + rm[:, None] * s_rm + rn[None, :] * s_rn, mask=mm[:, None] & mn[None, :],
                       other=0.0).to(ACC)
    tl.store(c_ptr + rm[:, None] * s_cm + rn[None, :] * s_cn, acc.to(c_ptr.dtype.element_ty),
             mask=mm[:, None] & mn[None, :])


def matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
           gelu: bool = False, out_dtype: torch.dtype | None = None, op_dtype: torch.dtype | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """a [M, K] @ b [K, N] (+ bias [N]) (GELU) (+ residual [M, N]) -> [M, N] in out_dtype (default a's dtype).
    op_dtype: dtype the operands are cast to before tl.dot (default: a's dtype)."""
    op = "matmul"
    check_tensor(op, "a", a, shape=(None, None), dtype=FLOAT_DTYPES)
    M, K = a.shape
    dev = a.device
    check_tensor(op, "b", b, shape=(K, None), dtype=FLOAT_DTYPES, device=dev)
    N = b.shape[1]
    if bias is not None:
        check_tensor(op, "bias", bias, shape=(N,), dtype=FLOAT_DTYPES, device=dev)
    if residual is not None:
        check_tensor(op, "residual", residual, shape=(M, N), dtype=FLOAT_DTYPES, device=dev)
    op_dtype = op_dtype or a.dtype
    out_dtype = out_dtype or a.dtype
    if out is None:
        out = alloc((M, N), out_dtype, dev)
    else:
        check_tensor(op, "out", out, shape=(M, N), dtype=FLOAT_DTYPES, device=dev)
    if M == 0 or N == 0:
        return out
    cfg = get_config("gemm", M, a.device, op_dtype)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
    with guarded(op, out=out) as w:
        bias_t = bias if bias is not None else w.out
        res_t = residual if residual is not None else w.out
        _matmul_kernel[grid](
            a, b, w.out, bias_t, res_t, M, N, K,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
            res_t.stride(0), res_t.stride(1),
            HAS_BIAS=bias is not None, HAS_RES=residual is not None, ACT_GELU=gelu,
            OP=dot_dtype(op_dtype), ACC=tl_dtype(acc_dtype(op_dtype)), DOT_PREC=dot_precision(op_dtype),
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    return out
