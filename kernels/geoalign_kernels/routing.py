"""Routing: the router's second GEMM with Top-K and the masked softmax in the epilogue (design.md section 5.1).

Forward  (`route`): logits S = hid @ V2^T + c2 ([L, M], rounded to the parameter dtype as nn.Linear would), then per
row the K largest logits in descending order (ties -> lower bank index, as geoalign.routing.topk_lower_index) and
alpha = softmax over those K. Writes topk_idx [L, K] int32 and alpha [L, K] fp32 (fp64 for fp64 parameters).
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
def _route_kernel(hid_ptr, w2_ptr, b2_ptr, idx_ptr, alpha_ptr, L, R, M, s_hl, s_hr, s_wm, s_wr,
                  K: tl.constexpr, K_P: tl.constexpr, PARAM: tl.constexpr, OP: tl.constexpr, ACC: tl.constexpr,
                  DOT_PREC: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_MB: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rl = (pid * BLOCK_L + tl.arange(0, BLOCK_L)).to(tl.int64)
    ml = rl < L
    cm = tl.arange(0, BLOCK_MB)
    mcol = cm < M
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    acc = tl.zeros((BLOCK_L, BLOCK_MB), dtype=ACC)
    for r0 in range(0, R, BLOCK_K):
        kk = r0 + rk
        mk = kk < R
        a = tl.load(hid_ptr + rl[:, None] * s_hl + kk[None, :] * s_hr, mask=ml[:, None] & mk[None, :], other=0.0)
        b = tl.load(w2_ptr + cm[None, :].to(tl.int64) * s_wm + kk[:, None] * s_wr, mask=mk[:, None] & mcol[None, :],
                    other=0.0)
        acc = tl.dot(a.to(OP), b.to(OP), acc, input_precision=DOT_PREC)
    s = acc + tl.load(b2_ptr + cm, mask=mcol, other=0.0).to(ACC)[None, :]
    s = s.to(PARAM).to(ACC)  # the logits nn.Linear would produce in the parameter dtype (ties included)
    # Top-K policy (geoalign.routing.topk_lower_index): descending, NaN above every number (as torch.sort), ties and
    # -inf -> lower index. A taken-mask, not a value comparison, removes each winner, so the K ids are distinct
    # and < M even when the remaining logits are all -inf or NaN.
    is_nan = s != s
    taken = cm[None, :] >= M  # padding columns are never candidates
    kc = tl.arange(0, K_P)
    sel = tl.full((BLOCK_L, K_P), float("-inf"), ACC)
    ids = tl.zeros((BLOCK_L, K_P), dtype=tl.int32)
    for k in tl.static_range(K):
        free_nan = is_nan & ~taken
        has_nan = tl.max(free_nan.to(tl.int32), axis=1) > 0
        free_num = ~is_nan & ~taken
        mx = tl.max(tl.where(free_num, s, float("-inf")), axis=1)  # -inf when every free number is -inf
        cand = tl.where(has_nan[:, None], free_nan, free_num & (s == mx[:, None]))
        j = tl.min(tl.where(cand, cm[None, :], BLOCK_MB), axis=1)  # the lowest candidate column
        v = tl.where(has_nan, float("nan"), mx)
        sel = tl.where(kc[None, :] == k, v[:, None], sel)
        ids = tl.where(kc[None, :] == k, j[:, None], ids)
        taken = taken | (cm[None, :] == j[:, None])
    kept = kc[None, :] < K
    # softmax over the K kept logits, as torch.softmax: selection 0 is the largest (a NaN there, or all K -inf,
    # makes the whole row NaN)
    top = tl.sum(tl.where(kc[None, :] == 0, sel, 0.0), axis=1)
    e = tl.where(kept, tl.exp(sel - top[:, None]), 0.0)
    alpha = e / tl.sum(e, axis=1)[:, None]
    out = rl[:, None] * K + kc[None, :]
    tl.store(idx_ptr + out, ids, mask=ml[:, None] & kept)
    tl.store(alpha_ptr + out, alpha, mask=ml[:, None] & kept)


@triton.jit
def _route_bwd_kernel(d_alpha_ptr, alpha_ptr, idx_ptr, ds_ptr, L, M,
                      K: tl.constexpr, K_P: tl.constexpr, ACC: tl.constexpr,
                      BLOCK_L: tl.constexpr, BLOCK_MB: tl.constexpr):
    pid = tl.program_id(0)
    rl = (pid * BLOCK_L + tl.arange(0, BLOCK_L)).to(tl.int64)
    ml = rl < L
    kc = tl.arange(0, K_P)
    mk = ml[:, None] & (kc[None, :] < K)
    off = rl[:, None] * K + kc[None, :]
    alpha = tl.load(alpha_ptr + off, mask=mk, other=0.0).to(ACC)
    d_alpha = tl.load(d_alpha_ptr + off, mask=mk, other=0.0).to(ACC)
    ids = tl.load(idx_ptr + off, mask=mk, other=-1)
    d_kept = alpha * (d_alpha - tl.sum(alpha * d_alpha, axis=1)[:, None])  # softmax backward over the K kept
    cm = tl.arange(0, BLOCK_MB)
    ds = tl.zeros((BLOCK_L, BLOCK_MB), dtype=ACC)
    for k in tl.static_range(K):
        dk = tl.sum(tl.where(kc[None, :] == k, d_kept, 0.0), axis=1)
        ik = tl.sum(tl.where(kc[None, :] == k, ids, 0), axis=1)
        ds = tl.where(cm[None, :] == ik[:, None], dk[:, None], ds)
    tl.store(ds_ptr + rl[:, None] * M + cm[None, :], ds.to(ds_ptr.dtype.element_ty),
             mask=ml[:, None] & (cm[None, :] < M))


def _block_mb(M: int) -> int:
    return max(16, triton.next_power_of_2(M))


def route_forward(hid: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, k: int):
    """hid [L, R], w2 [M, R], b2 [M] (parameter dtype) -> (topk_idx [L, K] int32, alpha [L, K] fp32/fp64)."""
    op = "route_forward"
    check_tensor(op, "hid", hid, shape=(None, None), dtype=FLOAT_DTYPES)
    L, R = hid.shape
    dtype, dev = hid.dtype, hid.device
    check_tensor(op, "w2", w2, shape=(None, R), dtype=dtype, device=dev)
    M = w2.shape[0]
    check_tensor(op, "b2", b2, shape=(M,), dtype=dtype, device=dev)
    check_int(op, "k", k, 1, M)
    idx = alloc((L, k), torch.int32, dev)
    alpha = alloc((L, k), acc_dtype(dtype), dev)
    if L == 0:
        return idx, alpha
    cfg = get_config("rows", L, dev, dtype)
    block_l = max(16, min(cfg["BLOCK_M"], 64))
    with guarded(op, idx=idx, alpha=alpha) as out:
        _route_kernel[(triton.cdiv(L, block_l),)](
            hid, w2, b2, out.idx, out.alpha, L, R, M, hid.stride(0), hid.stride(1), w2.stride(0), w2.stride(1),
            K=k, K_P=triton.next_power_of_2(k), PARAM=tl_dtype(dtype), OP=dot_dtype(dtype),
            ACC=tl_dtype(acc_dtype(dtype)), DOT_PREC=dot_precision(dtype), BLOCK_L=block_l, BLOCK_MB=_block_mb(M),
            BLOCK_K=max(16, cfg["BLOCK_K"]), num_warps=cfg["num_warps"],
        )
    return idx, alpha


def route_backward(d_alpha: torch.Tensor, alpha: torch.Tensor, topk_idx: torch.Tensor, hid: torch.Tensor,
                   w2: torch.Tensor):
    """-> (d_hid [L, R], d_w2 [M, R], d_b2 [M]) in the parameter dtype."""
    op = "route_backward"
    check_tensor(op, "hid", hid, shape=(None, None), dtype=FLOAT_DTYPES)
    L, R = hid.shape
    dtype, dev = hid.dtype, hid.device
    check_tensor(op, "w2", w2, shape=(None, R), dtype=dtype, device=dev)
    M = w2.shape[0]
    check_tensor(op, "alpha", alpha, shape=(L, None), dtype=acc_dtype(dtype), device=dev)
    K = alpha.shape[1]
    check_int(op, "K", K, 1, M)
    check_tensor(op, "d_alpha", d_alpha, shape=(L, K), dtype=FLOAT_DTYPES, device=dev)
    check_tensor(op, "topk_idx", topk_idx, shape=(L, K), dtype=INDEX_DTYPES, device=dev)
    ds = alloc((L, M), dtype, dev)
    if L > 0:
        cfg = get_config("rows", L, dev, dtype)
        block_l = max(16, min(cfg["BLOCK_M"], 64))
        with guarded(op, ds=ds) as out:
            _route_bwd_kernel[(triton.cdiv(L, block_l),)](
                d_alpha.contiguous(), alpha.contiguous(), topk_idx.contiguous(), out.ds, L, M,
                K=K, K_P=triton.next_power_of_2(K), ACC=tl_dtype(acc_dtype(dtype)),
                BLOCK_L=block_l, BLOCK_MB=_block_mb(M), num_warps=cfg["num_warps"],
            )
    d_hid = matmul(ds, w2)  # [L, M] @ [M, R]
    d_w2 = matmul(ds.t(), hid)  # [M, L] @ [L, R]
    d_b2 = ds.to(acc_dtype(dtype)).sum(0).to(dtype)
    return d_hid, d_w2, d_b2


# ------------------------------------------------------------------------------------------ torch.library custom ops
@custom_op("geoalign::triton_route", mutates_args=())
def route_op(hid: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_idx [L, K] int32, alpha [L, K] fp32/fp64) from hid [L, R] and router fc2 (w2 [M, R], b2 [M])."""
    return route_forward(hid, w2, b2.contiguous(), k)


@route_op.register_fake
def _route_fake(hid, w2, b2, k):
    L = hid.shape[0]
    return hid.new_empty((L, k), dtype=torch.int32), hid.new_empty((L, k), dtype=acc_dtype(w2.dtype))


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


def _route_autograd(ctx, _d_topk_idx, d_alpha):
    hid, w2, topk_idx, alpha = ctx.saved_tensors
    d_hid, d_w2, d_b2 = route_backward_op(d_alpha, alpha, topk_idx, hid, w2)
    return d_hid, d_w2, d_b2, None


route_op.register_autograd(_route_autograd, setup_context=_route_setup_context)
