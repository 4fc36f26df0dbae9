"""Routing: the router's second GEMM with Top-K and the masked softmax in the epilogue (docs/architecture.md, "Routing").

Forward  (`route`): logits S = hid @ V2^T + c2 ([L, M], rounded to the parameter dtype as nn.Linear would), then per
row the K largest logits in descending order (ties -> lower bank index, as geoalign.routing.topk_lower_index) and
alpha = softmax over those K. Writes topk_idx [L, K] int64 and alpha [L, K] fp32 (fp64 for fp64 parameters).
hid = GELU(V1 q + c1) [L, R] is the router's first layer, left to torch (and its autograd).

Backward (`route_backward`): dS [L, M] = alpha * (d_alpha - sum_k alpha d_alpha) at the K kept columns, 0 elsewhere
(one kernel), then d_hid = dS @ V2, dV2 = dS^T @ hid (shared GEMM kernel), dc2 = sum_l dS.
Saved for backward: hid [L, R] (parameter dtype), topk_idx, alpha. The logits are not saved.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import FLOAT_DTYPES, INDEX_DTYPES, check_int, check_tensor
from .configs import get_config
from .gemm import matmul
from .guard import guarded
from .library import custom_op
from .runtime import acc_dtype
from .utils import alloc, dot_dtype, dot_precision, tl_dtype


@triton.jit
def _route_kernel(
        hid_ptr, w2_ptr, b2_ptr,  # router hidden [L, R], fc2 weight [M, R], fc2 bias [M] (parameter dtype)
        topk_idx_ptr, alpha_ptr,  # outputs: topk_idx [L, K] int64, alpha [L, K] (accumulation dtype), row-major
        L, R, M,  # tokens, router width, bank layers
        stride_hid_l, stride_hid_r, stride_w2_m, stride_w2_r,  # element strides
        K: tl.constexpr, K_POW2: tl.constexpr,  # Top-K, and K rounded up to a power of two (the slot block)
        PARAM_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_SIZE_L: tl.constexpr, BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_R: tl.constexpr):  # tokens, layers, K-dim
    pid = tl.program_id(0)
    offs_l = (pid * BLOCK_SIZE_L + tl.arange(0, BLOCK_SIZE_L)).to(tl.int64)
    mask_l = offs_l < L
    offs_m = tl.arange(0, BLOCK_SIZE_M)
    mask_m = offs_m < M
    offs_r = tl.arange(0, BLOCK_SIZE_R).to(tl.int64)
    hid_ptrs = hid_ptr + offs_l[:, None] * stride_hid_l + offs_r[None, :] * stride_hid_r
    w2_ptrs = w2_ptr + offs_m[None, :].to(tl.int64) * stride_w2_m + offs_r[:, None] * stride_w2_r
    acc = tl.zeros((BLOCK_SIZE_L, BLOCK_SIZE_M), dtype=ACC_DTYPE)
    for r0 in range(0, R, BLOCK_SIZE_R):
        mask_r = offs_r < R - r0
        hid = tl.load(hid_ptrs, mask=mask_l[:, None] & mask_r[None, :], other=0.0)
        w2 = tl.load(w2_ptrs, mask=mask_r[:, None] & mask_m[None, :], other=0.0)
        acc = tl.dot(hid.to(DOT_DTYPE), w2.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION,
                     out_dtype=ACC_DTYPE)
        hid_ptrs += BLOCK_SIZE_R * stride_hid_r
        w2_ptrs += BLOCK_SIZE_R * stride_w2_r
    s = acc + tl.load(b2_ptr + offs_m, mask=mask_m, other=0.0).to(ACC_DTYPE)[None, :]
    s = s.to(PARAM_DTYPE).to(ACC_DTYPE)  # the logits nn.Linear would produce in the parameter dtype (ties included)
    # Top-K policy (geoalign.routing.topk_lower_index): descending, NaN above every number (as torch.sort), ties and
    # -inf -> lower index. A taken-mask, not a value comparison, removes each winner, so the K ids are distinct
    # and < M even when the remaining logits are all -inf or NaN.
    is_nan = s != s
    taken = offs_m[None, :] >= M  # padding columns are never candidates
    offs_slot = tl.arange(0, K_POW2)
    selected = tl.full((BLOCK_SIZE_L, K_POW2), float("-inf"), ACC_DTYPE)
    ids = tl.zeros((BLOCK_SIZE_L, K_POW2), dtype=tl.int32)
    for k in tl.static_range(K):
        free_nan = is_nan & ~taken
        has_nan = tl.max(free_nan.to(tl.int32), axis=1) > 0
        free_num = ~is_nan & ~taken
        best = tl.max(tl.where(free_num, s, float("-inf")), axis=1)  # -inf when every free number is -inf
        candidate = tl.where(has_nan[:, None], free_nan, free_num & (s == best[:, None]))
        winner = tl.min(tl.where(candidate, offs_m[None, :], BLOCK_SIZE_M), axis=1)  # the lowest candidate column
        value = tl.where(has_nan, float("nan"), best)
        selected = tl.where(offs_slot[None, :] == k, value[:, None], selected)
        ids = tl.where(offs_slot[None, :] == k, winner[:, None], ids)
        taken = taken | (offs_m[None, :] == winner[:, None])
    kept = offs_slot[None, :] < K
    # softmax over the K kept logits, as torch.softmax: selection 0 is the largest (a NaN there, or all K -inf,
    # makes the whole row NaN)
    top = tl.sum(tl.where(offs_slot[None, :] == 0, selected, 0.0), axis=1)
    e = tl.where(kept, tl.exp(selected - top[:, None]), 0.0)
    alpha = e / tl.sum(e, axis=1)[:, None]
    offs_out = offs_l[:, None] * K + offs_slot[None, :]
    tl.store(topk_idx_ptr + offs_out, ids, mask=mask_l[:, None] & kept)
    tl.store(alpha_ptr + offs_out, alpha, mask=mask_l[:, None] & kept)


@triton.jit
def _route_backward_kernel(
        d_alpha_ptr, alpha_ptr, topk_idx_ptr,  # [L, K] each, row-major
        d_logits_ptr, stride_d_logits_l,  # output: dS [L, M] (parameter dtype), unit column stride; zero off the K kept
        L, M,  # tokens, bank layers
        K: tl.constexpr, K_POW2: tl.constexpr, ACC_DTYPE: tl.constexpr,
        BLOCK_SIZE_L: tl.constexpr, BLOCK_SIZE_M: tl.constexpr):
    pid = tl.program_id(0)
    offs_l = (pid * BLOCK_SIZE_L + tl.arange(0, BLOCK_SIZE_L)).to(tl.int64)
    mask_l = offs_l < L
    offs_slot = tl.arange(0, K_POW2)
    mask_slot = mask_l[:, None] & (offs_slot[None, :] < K)
    offs_in = offs_l[:, None] * K + offs_slot[None, :]
    alpha = tl.load(alpha_ptr + offs_in, mask=mask_slot, other=0.0).to(ACC_DTYPE)
    d_alpha = tl.load(d_alpha_ptr + offs_in, mask=mask_slot, other=0.0).to(ACC_DTYPE)
    ids = tl.load(topk_idx_ptr + offs_in, mask=mask_slot, other=-1)
    offs_m = tl.arange(0, BLOCK_SIZE_M)
    d_logits = tl.zeros((BLOCK_SIZE_L, BLOCK_SIZE_M), dtype=ACC_DTYPE)
    for k in tl.static_range(K):
        # softmax backward over the K kept: dS_k = alpha_k * sum_j alpha_j (d_alpha_k - d_alpha_j) (no cancellation
        # when alpha_k ~ 1; geoalign.routing.kept_softmax_backward); slots past K hold alpha 0
        alpha_k = tl.sum(tl.where(offs_slot[None, :] == k, alpha, 0.0), axis=1)
        d_alpha_k = tl.sum(tl.where(offs_slot[None, :] == k, d_alpha, 0.0), axis=1)
        d_k = alpha_k * tl.sum(alpha * (d_alpha_k[:, None] - d_alpha), axis=1)
        id_k = tl.sum(tl.where(offs_slot[None, :] == k, ids, 0), axis=1)
        d_logits = tl.where(offs_m[None, :] == id_k[:, None], d_k[:, None], d_logits)
    d_logits_ptrs = d_logits_ptr + offs_l[:, None] * stride_d_logits_l + offs_m[None, :]
    tl.store(d_logits_ptrs, d_logits.to(d_logits_ptr.dtype.element_ty), mask=mask_l[:, None] & (offs_m[None, :] < M))


def _block_m(M: int) -> int:
    """The bank-layer block of the routing kernels: all M logits of a token in one tile (at least 16 for tl.dot)."""
    return max(16, triton.next_power_of_2(M))


def _block_l(cfg: dict) -> int:
    """Tokens per routing program: the row kernels' block, within [16, 64]."""
    return max(16, min(cfg["BLOCK_SIZE_M"], 64))


def _check_router(op: str, hid: torch.Tensor, w2: torch.Tensor):
    """hid [L, R] (a float dtype) and w2 [M, R] of the same dtype and device -> (L, R, M, dtype, device)."""
    check_tensor(op, "hid", hid, shape=(None, None), dtype=FLOAT_DTYPES)
    L, R = hid.shape
    check_tensor(op, "w2", w2, shape=(None, R), dtype=hid.dtype, device=hid.device)
    return L, R, w2.shape[0], hid.dtype, hid.device


def route_forward(hid: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, k: int):
    """hid [L, R], w2 [M, R], b2 [M] (parameter dtype) -> (topk_idx [L, K] int64, alpha [L, K] fp32/fp64)."""
    op = "route_forward"
    L, R, M, dtype, dev = _check_router(op, hid, w2)
    check_tensor(op, "b2", b2, shape=(M,), dtype=dtype, device=dev)
    check_int(op, "k", k, 1, M)
    idx = alloc((L, k), torch.int64, dev)
    alpha = alloc((L, k), acc_dtype(dtype), dev)
    if L == 0:
        return idx, alpha
    cfg = get_config("rows", L, dev, dtype)
    block_l = _block_l(cfg)
    with guarded(op, idx=idx, alpha=alpha) as out:
        _route_kernel[(triton.cdiv(L, block_l),)](
            hid, w2, b2, out.idx, out.alpha, L, R, M, hid.stride(0), hid.stride(1), w2.stride(0), w2.stride(1),
            K=k, K_POW2=triton.next_power_of_2(k), PARAM_DTYPE=tl_dtype(dtype), DOT_DTYPE=dot_dtype(dtype),
            ACC_DTYPE=tl_dtype(acc_dtype(dtype)), DOT_PRECISION=dot_precision(dtype, dev), BLOCK_SIZE_L=block_l,
            BLOCK_SIZE_M=_block_m(M), BLOCK_SIZE_R=max(16, cfg["BLOCK_SIZE_K"]), num_warps=cfg["num_warps"],
        )
    return idx, alpha


def route_backward(d_alpha: torch.Tensor, alpha: torch.Tensor, topk_idx: torch.Tensor, hid: torch.Tensor,
                   w2: torch.Tensor):
    """-> (d_hid [L, R], d_w2 [M, R], d_b2 [M]) in the parameter dtype."""
    op = "route_backward"
    L, R, M, dtype, dev = _check_router(op, hid, w2)
    check_tensor(op, "alpha", alpha, shape=(L, None), dtype=acc_dtype(dtype), device=dev)
    K = alpha.shape[1]
    check_int(op, "K", K, 1, M)
    check_tensor(op, "d_alpha", d_alpha, shape=(L, K), dtype=FLOAT_DTYPES, device=dev)
    check_tensor(op, "topk_idx", topk_idx, shape=(L, K), dtype=INDEX_DTYPES, device=dev)
    # dS with its rows padded to 16 bytes: both router GEMMs can then read it by TMA (as dS and as dS^T)
    per_16_bytes = max(1, 16 // torch.empty((), dtype=dtype).element_size())
    ds = alloc((L, triton.cdiv(M, per_16_bytes) * per_16_bytes), dtype, dev)[:, :M]
    if L > 0:
        cfg = get_config("rows", L, dev, dtype)
        block_l = _block_l(cfg)
        with guarded(op, ds=ds) as out:
            _route_backward_kernel[(triton.cdiv(L, block_l),)](
                d_alpha.contiguous(), alpha.contiguous(), topk_idx.contiguous(), out.ds, ds.stride(0), L, M,
                K=K, K_POW2=triton.next_power_of_2(K), ACC_DTYPE=tl_dtype(acc_dtype(dtype)),
                BLOCK_SIZE_L=block_l, BLOCK_SIZE_M=_block_m(M), num_warps=cfg["num_warps"],
            )
    d_hid = matmul(ds, w2, site="router_d_hid")  # [L, M] @ [M, R]
    d_b2 = alloc((M,), dtype, dev)
    # [M, L] @ [L, R]; d_b2 = sum_l dS as its A-row sums
    d_w2 = matmul(ds.t(), hid, row_sum=d_b2, site="router_d_w2")
    return d_hid, d_w2, d_b2


# ------------------------------------------------------------------------------------------ torch.library custom ops
@custom_op("geoalign::triton_route", mutates_args=())
def route_op(hid: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_idx [L, K] int64, alpha [L, K] fp32/fp64) from hid [L, R] and router fc2 (w2 [M, R], b2 [M])."""
    return route_forward(hid, w2, b2.contiguous(), k)


@route_op.register_fake
def _route_fake(hid, w2, b2, k):
    L = hid.shape[0]
    return hid.new_empty((L, k), dtype=torch.int64), hid.new_empty((L, k), dtype=acc_dtype(w2.dtype))


@custom_op("geoalign::triton_route_backward", mutates_args=())
def route_backward_op(d_alpha: torch.Tensor, alpha: torch.Tensor, topk_idx: torch.Tensor, hid: torch.Tensor,
                      w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_hid [L, R], d_w2 [M, R], d_b2 [M])."""
    return route_backward(d_alpha, alpha, topk_idx, hid, w2)


@route_backward_op.register_fake
def _route_backward_fake(d_alpha, alpha, topk_idx, hid, w2):
    return torch.empty_like(hid), torch.empty_like(w2), w2.new_empty((w2.shape[0],))


def _route_setup_context(ctx, inputs, output):
    hid, w2, _b2, _k = inputs
    topk_idx, alpha = output
    ctx.save_for_backward(hid, w2, topk_idx, alpha)
    ctx.set_materialize_grads(False)  # topk_idx (integer) has no gradient: no zero-filled [L, K] launch for it


def _route_autograd(ctx, _d_topk_idx, d_alpha):
    if d_alpha is None:  # alpha was not used
        return None, None, None, None
    hid, w2, topk_idx, alpha = ctx.saved_tensors
    d_hid, d_w2, d_b2 = route_backward_op(d_alpha, alpha, topk_idx, hid, w2)
    return d_hid, d_w2, d_b2, None


route_op.register_autograd(_route_autograd, setup_context=_route_setup_context)
