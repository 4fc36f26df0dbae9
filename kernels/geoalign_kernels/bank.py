"""Routed feature bank, one VGGT layer at a time: gathered GEMM1 with LayerNorm in the A-load (docs/architecture.md).

For bank layer i and its n routed (token, slot) pairs (``tokens``/``slots`` from geoalign.routing.bank_rows):

  forward   h_bar[t] += alpha[t, s] * GELU(W1 . concat_g LN_i(R_i[gather_index[t, g]]) + b1)     (in place)
    _ln_stats_kernel   pre-pass over the n*G gathered rows: mean, rstd (two-pass, fp32); optionally copies the
                       gathered raw rows out for backward
    _bank_fwd_kernel   GEMM over pairs (rows) x H (cols), K-dim = G*D': the A-load gathers patch rows through
                       gather_index and applies LN_i on the fly; epilogue: + b1, exact GELU, * alpha, read-add-write
                       into h_bar (tokens are distinct within a layer: no atomics, deterministic); optionally stores z
  backward  (VGGT is frozen: no gradient into the layer)
    _bank_dz_kernel    dz = alpha * dh_bar[t] * GELU'(z) (parameter dtype), d_alpha[t, s] = <dh_bar[t], GELU(z)>,
                       per-program partial sums of db1
    _bank_dw1_kernel   dW1 = dz^T @ LN_i(raw), LN applied on the fly in the B-load
    _bank_dx_kernel    dx = dz @ W1 per (pair, g) row block, epilogue reduces dgamma_i = sum dx * x_hat and
                       dbeta_i = sum dx into per-program fp32 partial buffers (no locks/atomics); dx is never stored
  partial buffers are summed on the host side (torch .sum(0)).

Saved for backward (per layer, only when a gradient is needed), same as the torch backend plus the LN statistics:
  raw  [n, G, D']  gathered patch rows in the layer's dtype (so the layer itself can be freed)
  mean, rstd [n*G] fp32 (fp64 for fp64 parameters)  LayerNorm statistics (8 bytes per row; not recomputed)
  z    [n, H]      GEMM1 pre-activation in the parameter dtype (GELU and GELU' recomputed from it)
Row indices are cast to int64 before being multiplied by strides (n*G*D' and N*D' can pass 2^31).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import guard
from .checks import FLOAT_DTYPES, INDEX_DTYPES, check_tensor
from .configs import get_config, launch_kwargs
from .guard import guarded
from .library import custom_op
from .runtime import acc_dtype
from .utils import alloc, dot_dtype, gelu, gelu_grad, dot_precision, rows_contiguous, tl_dtype


# --------------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _ln_stats_kernel(
        layer_ptr, stride_layer_row, N,  # bank layer i [N, D'] (unit column stride), its row stride and row count
        gather_ptr, stride_gather_l, stride_gather_g, L,  # gather_index [L, G] and its strides; L tokens
        tokens_ptr,  # [n] token id of each routed pair
        raw_ptr, mean_ptr, rstd_ptr,  # outputs: raw [n*G, D'] (when SAVE_RAW), mean / rstd [n*G]
        n_rows, G, D_geo, eps,  # n*G gathered rows, patch rows per token, row width D', LayerNorm eps
        SAVE_RAW: tl.constexpr, PARAM_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr,
        BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr):  # rows per program, column chunk
    """Rows r = p*G + g of the gathered [n*G, D'] matrix: mean/rstd of PARAM-rounded values (as torch's
    layer_norm(raw.to(param dtype))); raw[r] = R_i[gather_index[tokens[p], g]] when SAVE_RAW.
    A token id outside [0, L) or a gather row outside [0, N) reads nothing and gets NaN statistics."""
    pid = tl.program_id(0)
    offs_r = (pid * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)).to(tl.int64)
    mask_r = offs_r < n_rows
    pair = offs_r // G
    group = offs_r % G
    token = tl.load(tokens_ptr + pair, mask=mask_r, other=0).to(tl.int64)
    valid = mask_r & (token >= 0) & (token < L)
    src = tl.load(gather_ptr + token * stride_gather_l + group * stride_gather_g, mask=valid, other=0).to(tl.int64)
    valid = valid & (src >= 0) & (src < N)
    offs_d = tl.arange(0, BLOCK_SIZE_N).to(tl.int64)
    row_ptrs = layer_ptr + src[:, None] * stride_layer_row + offs_d[None, :]
    total = tl.zeros((BLOCK_SIZE_M,), dtype=ACC_DTYPE)
    for d0 in range(0, D_geo, BLOCK_SIZE_N):
        mask = mask_r[:, None] & (offs_d[None, :] < D_geo - d0)
        x = tl.load(row_ptrs + d0, mask=mask & valid[:, None], other=0.0)
        if SAVE_RAW:
            tl.store(raw_ptr + offs_r[:, None] * D_geo + (d0 + offs_d)[None, :], x, mask=mask)
        total += tl.sum(x.to(PARAM_DTYPE).to(ACC_DTYPE), axis=1)
    mean = total / D_geo
    sq = tl.zeros((BLOCK_SIZE_M,), dtype=ACC_DTYPE)
    for d0 in range(0, D_geo, BLOCK_SIZE_N):  # second pass over the (cached) rows: centred sum of squares
        mask = mask_r[:, None] & (offs_d[None, :] < D_geo - d0)
        x = tl.load(row_ptrs + d0, mask=mask & valid[:, None], other=0.0).to(PARAM_DTYPE).to(ACC_DTYPE)
        centred = tl.where(mask, x - mean[:, None], 0.0)
        sq += tl.sum(centred * centred, axis=1)
    rstd = tl.where(valid, 1.0 / tl.sqrt(sq / D_geo + eps), float("nan"))
    mean = tl.where(valid, mean, float("nan"))
    tl.store(mean_ptr + offs_r, mean, mask=mask_r)
    tl.store(rstd_ptr + offs_r, rstd, mask=mask_r)


@triton.jit
def _bank_fwd_kernel(
        layer_ptr, stride_layer_row, N,  # bank layer i [N, D'] (unit column stride), row stride, row count
        gather_ptr, stride_gather_l, stride_gather_g,  # gather_index [L, G]
        tokens_ptr, slots_ptr,  # [n] token id and slot of each routed pair
        alpha_ptr, stride_alpha_l,  # alpha [L, K] (unit column stride)
        mean_ptr, rstd_ptr,  # LayerNorm statistics [n*G] from _ln_stats_kernel
        ln_weight_ptr, ln_bias_ptr,  # LN_i affine [D']
        w1_ptr, stride_w1_h, stride_w1_k, b1_ptr,  # GEMM1 weight [H, G*D'] and bias [H]
        h_bar_ptr, stride_h_bar_l,  # h_bar [L, H] (accumulation dtype), read-add-written
        z_ptr,  # output: z [n, H] pre-activations (when SAVE_Z)
        n, H, D_geo, G, L, K,  # pairs, hidden width, D', patch rows per token, tokens, slots per token
        SAVE_Z: tl.constexpr, PARAM_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr):  # pairs, H, D'
    """GEMM over pairs (rows) x H (columns), K-dim = G*D': the A-load gathers patch rows and applies LN_i on the fly;
    epilogue: + b1, exact GELU, * alpha, read-add-write into h_bar (a token's pairs of one layer are distinct)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = (pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)).to(tl.int64)  # pairs
    mask_m = offs_m < n
    offs_n = (pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)).to(tl.int64)  # hidden columns
    mask_n = offs_n < H
    offs_k = tl.arange(0, BLOCK_SIZE_K).to(tl.int64)
    token = tl.load(tokens_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    slot = tl.load(slots_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    valid = mask_m & (token >= 0) & (token < L) & (slot >= 0) & (slot < K)  # no read or write through bad ids
    acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=ACC_DTYPE)
    for g in range(0, G):
        src = tl.load(gather_ptr + token * stride_gather_l + g * stride_gather_g, mask=valid, other=0).to(tl.int64)
        src_valid = valid & (src >= 0) & (src < N)  # (the pre-pass gave such rows NaN statistics)
        mean = tl.load(mean_ptr + offs_m * G + g, mask=mask_m, other=0.0)
        rstd = tl.load(rstd_ptr + offs_m * G + g, mask=mask_m, other=0.0)
        x_ptrs = layer_ptr + src[:, None] * stride_layer_row + offs_k[None, :]
        w_ptrs = w1_ptr + offs_n[None, :] * stride_w1_h + (g * D_geo + offs_k)[:, None] * stride_w1_k
        for d0 in range(0, D_geo, BLOCK_SIZE_K):
            mask_k = offs_k < D_geo - d0
            x = tl.load(x_ptrs, mask=src_valid[:, None] & mask_k[None, :], other=0.0).to(PARAM_DTYPE).to(ACC_DTYPE)
            ln_w = tl.load(ln_weight_ptr + d0 + offs_k, mask=mask_k, other=0.0).to(ACC_DTYPE)
            ln_b = tl.load(ln_bias_ptr + d0 + offs_k, mask=mask_k, other=0.0).to(ACC_DTYPE)
            x_norm = (x - mean[:, None]) * rstd[:, None] * ln_w[None, :] + ln_b[None, :]
            x_norm = tl.where(mask_m[:, None] & mask_k[None, :], x_norm, 0.0)
            w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot(x_norm.to(PARAM_DTYPE).to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
            x_ptrs += BLOCK_SIZE_K
            w_ptrs += BLOCK_SIZE_K * stride_w1_k
    z = (acc + tl.load(b1_ptr + offs_n, mask=mask_n, other=0.0).to(ACC_DTYPE)[None, :]).to(PARAM_DTYPE)
    if SAVE_Z:
        tl.store(z_ptr + offs_m[:, None] * H + offs_n[None, :], z, mask=mask_m[:, None] & mask_n[None, :])
    alpha = tl.load(alpha_ptr + token * stride_alpha_l + slot, mask=valid, other=0.0).to(ACC_DTYPE)
    h_bar_ptrs = h_bar_ptr + token[:, None] * stride_h_bar_l + offs_n[None, :]
    mask_h = valid[:, None] & mask_n[None, :]
    h_old = tl.load(h_bar_ptrs, mask=mask_h, other=0.0)
    tl.store(h_bar_ptrs, h_old + alpha[:, None] * gelu(z.to(ACC_DTYPE)), mask=mask_h)


@triton.jit
def _bank_dz_kernel(
        d_h_bar_ptr, stride_d_h_bar_l,  # dL/dh_bar [L, H] (accumulation dtype)
        tokens_ptr, slots_ptr,  # [n] token id and slot of each routed pair
        alpha_ptr, stride_alpha_l,  # alpha [L, K]
        z_ptr,  # saved pre-activations z [n, H]
        dz_ptr,  # output: dz [n, H] (parameter dtype)
        d_alpha_ptr, stride_d_alpha_l,  # output: d alpha [L, K] (this layer's pairs only)
        db1_partial_ptr,  # output: per-program partial sums of db1 [programs, H]
        n, H, L, K,  # pairs, hidden width, tokens, slots per token
        PARAM_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr,
        BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr):  # pairs per program, column chunk
    """dz = alpha * dh_bar[t] * GELU'(z), d_alpha[t, s] = <dh_bar[t], GELU(z)>, partial sums of db1."""
    pid = tl.program_id(0)
    offs_m = (pid * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)).to(tl.int64)
    mask_m = offs_m < n
    token = tl.load(tokens_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    slot = tl.load(slots_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    valid = mask_m & (token >= 0) & (token < L) & (slot >= 0) & (slot < K)  # no read or write through bad ids
    alpha = tl.load(alpha_ptr + token * stride_alpha_l + slot, mask=valid, other=0.0).to(ACC_DTYPE)
    d_alpha = tl.zeros((BLOCK_SIZE_M,), dtype=ACC_DTYPE)
    offs_n = tl.arange(0, BLOCK_SIZE_N).to(tl.int64)
    for h0 in range(0, H, BLOCK_SIZE_N):
        cols = h0 + offs_n
        mask = mask_m[:, None] & (cols[None, :] < H)
        dh = tl.load(d_h_bar_ptr + token[:, None] * stride_d_h_bar_l + cols[None, :], mask=mask & valid[:, None],
                     other=0.0).to(ACC_DTYPE)
        z = tl.load(z_ptr + offs_m[:, None] * H + cols[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
        d_alpha += tl.sum(dh * gelu(z), axis=1)
        dz = (alpha[:, None] * dh * gelu_grad(z)).to(PARAM_DTYPE)
        tl.store(dz_ptr + offs_m[:, None] * H + cols[None, :], dz, mask=mask)
        tl.store(db1_partial_ptr + pid.to(tl.int64) * H + cols, tl.sum(tl.where(mask, dz.to(ACC_DTYPE), 0.0), axis=0),
                 mask=cols < H)
    tl.store(d_alpha_ptr + token * stride_d_alpha_l + slot, d_alpha, mask=valid)


@triton.jit
def _row_and_patch_tile(rows, D_geo, BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr):
    """The tile of a program on the grid (rows / BLOCK_SIZE_M, G * cdiv(D', BLOCK_SIZE_N)) of the backward kernels:
    (row offsets, row mask, patch row g, column offsets within D', column mask)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    num_pid_d = tl.cdiv(D_geo, BLOCK_SIZE_N)
    offs_r = (pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)).to(tl.int64)
    offs_d = ((pid_n % num_pid_d) * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)).to(tl.int64)
    return offs_r, offs_r < rows, pid_n // num_pid_d, offs_d, offs_d < D_geo


@triton.jit
def _bank_dw1_kernel(
        dz_ptr,  # dz [n, H] (parameter dtype)
        raw_ptr, mean_ptr, rstd_ptr,  # saved gathered rows [n*G, D'] and their LayerNorm statistics [n*G]
        ln_weight_ptr, ln_bias_ptr,  # LN_i affine [D']
        dw1_ptr,  # output: dW1 [H, G*D'] (parameter dtype)
        n, H, D_geo, G,  # pairs, hidden width, D', patch rows per token
        PARAM_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr):  # H, D', pairs
    """dW1[h, g*D' + d] = sum_p dz[p, h] * x[p, g, d], x = LN(raw) recomputed in the B-load. Grid (H/BM, G*D'/BN)."""
    offs_h, mask_h, g, offs_d, mask_d = _row_and_patch_tile(H, D_geo, BLOCK_SIZE_M, BLOCK_SIZE_N)
    ln_w = tl.load(ln_weight_ptr + offs_d, mask=mask_d, other=0.0).to(ACC_DTYPE)
    ln_b = tl.load(ln_bias_ptr + offs_d, mask=mask_d, other=0.0).to(ACC_DTYPE)
    offs_p = tl.arange(0, BLOCK_SIZE_K).to(tl.int64)
    acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=ACC_DTYPE)
    for p0 in range(0, n, BLOCK_SIZE_K):
        pairs = p0 + offs_p
        mask_p = pairs < n
        dz = tl.load(dz_ptr + pairs[None, :] * H + offs_h[:, None], mask=mask_h[:, None] & mask_p[None, :], other=0.0)
        row = pairs * G + g
        mean = tl.load(mean_ptr + row, mask=mask_p, other=0.0)
        rstd = tl.load(rstd_ptr + row, mask=mask_p, other=0.0)
        mask = mask_p[:, None] & mask_d[None, :]
        x = tl.load(raw_ptr + row[:, None] * D_geo + offs_d[None, :], mask=mask, other=0.0).to(PARAM_DTYPE).to(ACC_DTYPE)
        x_norm = tl.where(mask, (x - mean[:, None]) * rstd[:, None] * ln_w[None, :] + ln_b[None, :], 0.0)
        acc = tl.dot(dz.to(DOT_DTYPE), x_norm.to(PARAM_DTYPE).to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
    dw1_ptrs = dw1_ptr + offs_h[:, None] * (G * D_geo) + (g * D_geo + offs_d)[None, :]
    tl.store(dw1_ptrs, acc.to(PARAM_DTYPE), mask=mask_h[:, None] & mask_d[None, :])


@triton.jit
def _bank_dx_kernel(
        dz_ptr,  # dz [n, H] (parameter dtype)
        w1_ptr, stride_w1_h, stride_w1_k,  # GEMM1 weight [H, G*D']
        raw_ptr, mean_ptr, rstd_ptr,  # saved gathered rows [n*G, D'] and their LayerNorm statistics [n*G]
        dgamma_partial_ptr, dbeta_partial_ptr,  # outputs: [programs_m * G, D'] partial sums (accumulation dtype)
        n, H, D_geo, G,  # pairs, hidden width, D', patch rows per token
        PARAM_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr):  # pairs, D', H
    """dx[p, g, d] = sum_h dz[p, h] W1[h, g*D' + d]; writes the partial dgamma/dbeta rows (pid_m*G + g) over the
    block's pairs; dx is never stored. Grid (n/BM, G*D'/BN)."""
    pid_m = tl.program_id(0)
    offs_m, mask_m, g, offs_d, mask_d = _row_and_patch_tile(n, D_geo, BLOCK_SIZE_M, BLOCK_SIZE_N)
    offs_h = tl.arange(0, BLOCK_SIZE_K).to(tl.int64)
    dz_ptrs = dz_ptr + offs_m[:, None] * H + offs_h[None, :]
    w_ptrs = w1_ptr + offs_h[:, None] * stride_w1_h + (g * D_geo + offs_d)[None, :] * stride_w1_k
    acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=ACC_DTYPE)
    for h0 in range(0, H, BLOCK_SIZE_K):
        mask_h = offs_h < H - h0
        dz = tl.load(dz_ptrs, mask=mask_m[:, None] & mask_h[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_h[:, None] & mask_d[None, :], other=0.0)
        acc = tl.dot(dz.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
        dz_ptrs += BLOCK_SIZE_K
        w_ptrs += BLOCK_SIZE_K * stride_w1_h
    dx = acc.to(PARAM_DTYPE).to(ACC_DTYPE)
    row = offs_m * G + g
    mean = tl.load(mean_ptr + row, mask=mask_m, other=0.0)
    rstd = tl.load(rstd_ptr + row, mask=mask_m, other=0.0)
    mask = mask_m[:, None] & mask_d[None, :]
    x = tl.load(raw_ptr + row[:, None] * D_geo + offs_d[None, :], mask=mask, other=0.0).to(PARAM_DTYPE).to(ACC_DTYPE)
    x_hat = (x - mean[:, None]) * rstd[:, None]
    dx = tl.where(mask, dx, 0.0)
    offs_out = (pid_m * G + g) * D_geo + offs_d
    tl.store(dgamma_partial_ptr + offs_out, tl.sum(dx * x_hat, axis=0), mask=mask_d)
    tl.store(dbeta_partial_ptr + offs_out, tl.sum(dx, axis=0), mask=mask_d)


# -------------------------------------------------------------------------------------------------------- launchers
def _dtypes(dtype: torch.dtype) -> dict:
    """The dtype constexprs of the bank kernels for parameters of ``dtype``."""
    return dict(PARAM_DTYPE=tl_dtype(dtype), DOT_DTYPE=dot_dtype(dtype), ACC_DTYPE=tl_dtype(acc_dtype(dtype)),
                DOT_PRECISION=dot_precision(dtype))


def _check_bank_params(op, ln_weight, ln_bias, fc1_weight, Dg, G, dev):
    """LN_i [D'] and GEMM1 [H, G*D'] parameters, one float dtype, on dev. Returns H."""
    check_tensor(op, "fc1_weight", fc1_weight, shape=(None, G * Dg), dtype=FLOAT_DTYPES, device=dev)
    dtype = fc1_weight.dtype
    check_tensor(op, "ln_weight", ln_weight, shape=(Dg,), dtype=dtype, device=dev)
    check_tensor(op, "ln_bias", ln_bias, shape=(Dg,), dtype=dtype, device=dev)
    return fc1_weight.shape[0]


def _check_pairs(op, tokens, slots, L, K, dev):
    """tokens/slots [n] int ids of the (token, slot) pairs: n <= L*K (a token's K slots go to distinct layers)."""
    check_tensor(op, "tokens", tokens, shape=(None,), dtype=INDEX_DTYPES, device=dev)
    n = tokens.shape[0]
    check_tensor(op, "slots", slots, shape=(n,), dtype=INDEX_DTYPES, device=dev)
    if n > L * K:
        raise ValueError(f"{op}: {n} routed pairs for L={L} tokens with K={K} slots each; expected at most {L * K}")
    guard.check_index_range(op, "tokens", tokens, L, "rows of h_bar")
    guard.check_index_range(op, "slots", slots, K, "columns of alpha")
    return n


def bank_forward(h_bar: torch.Tensor, alpha: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                 fc1_weight: torch.Tensor, fc1_bias: torch.Tensor, layer: torch.Tensor, tokens: torch.Tensor,
                 slots: torch.Tensor, gather_index: torch.Tensor, eps: float, save: bool):
    """Adds layer i's contribution into h_bar [L, H] (fp32/fp64, in place). alpha [L, K]; ln_* [D']; fc1_weight
    [H, G*D'], fc1_bias [H]; layer [N, D'] (any float dtype); tokens/slots [n] int64; gather_index [L, G].
    Returns (raw [n, G, D'] layer dtype, mean [n*G], rstd [n*G], z [n, H] param dtype); raw and z are empty
    ([0, ...]) unless save."""
    op = "bank_forward"
    dev = h_bar.device
    check_tensor(op, "gather_index", gather_index, shape=(None, None), dtype=INDEX_DTYPES, device=dev)
    L, G = gather_index.shape
    check_tensor(op, "layer", layer, shape=(None, None), dtype=FLOAT_DTYPES, device=dev)
    N, Dg = layer.shape
    H = _check_bank_params(op, ln_weight, ln_bias, fc1_weight, Dg, G, dev)
    dtype = fc1_weight.dtype
    acc = acc_dtype(dtype)
    check_tensor(op, "fc1_bias", fc1_bias, shape=(H,), dtype=dtype, device=dev)
    check_tensor(op, "h_bar", h_bar, shape=(L, H), dtype=acc, unit_stride=True)
    check_tensor(op, "alpha", alpha, shape=(L, None), dtype=FLOAT_DTYPES, device=dev)
    K = alpha.shape[1]
    n = _check_pairs(op, tokens, slots, L, K, dev)
    guard.check_index_range(op, "gather_index", gather_index, N, "rows of the layer")
    layer = rows_contiguous(layer)  # one explicit copy if the rows are strided
    alpha = rows_contiguous(alpha)
    tokens, slots = tokens.contiguous(), slots.contiguous()
    ln_weight, ln_bias, fc1_bias = ln_weight.contiguous(), ln_bias.contiguous(), fc1_bias.contiguous()
    mean = alloc((n * G,), acc, dev)
    rstd = alloc((n * G,), acc, dev)
    raw = alloc((n, G, Dg), layer.dtype, dev) if save else layer.new_empty((0, G, Dg))
    z = alloc((n, H), dtype, dev) if save else fc1_weight.new_empty((0, H))
    if n == 0:
        return raw, mean, rstd, z
    types = _dtypes(dtype)
    rcfg = get_config("rows", n * G, dev)
    with guarded("bank_forward/ln_stats", raw=raw, mean=mean, rstd=rstd) as out:
        _ln_stats_kernel[(triton.cdiv(n * G, rcfg["BLOCK_SIZE_M"]),)](
            layer, layer.stride(0), N, gather_index, gather_index.stride(0), gather_index.stride(1), L, tokens,
            out.raw, out.mean, out.rstd, n * G, G, Dg, eps, SAVE_RAW=save, PARAM_DTYPE=types["PARAM_DTYPE"],
            ACC_DTYPE=types["ACC_DTYPE"], BLOCK_SIZE_M=rcfg["BLOCK_SIZE_M"], BLOCK_SIZE_N=rcfg["BLOCK_SIZE_N"],
            num_warps=rcfg["num_warps"],
        )
    cfg = get_config("bank_fwd", n, dev, dtype)
    grid = (triton.cdiv(n, cfg["BLOCK_SIZE_M"]), triton.cdiv(H, cfg["BLOCK_SIZE_N"]))
    with guarded("bank_forward/gemm1", h_bar=h_bar, z=z) as out:
        _bank_fwd_kernel[grid](
            layer, layer.stride(0), N, gather_index, gather_index.stride(0), gather_index.stride(1), tokens, slots,
            alpha, alpha.stride(0), mean, rstd, ln_weight, ln_bias, fc1_weight, fc1_weight.stride(0),
            fc1_weight.stride(1), fc1_bias, out.h_bar, h_bar.stride(0), out.z, n, H, Dg, G, L, K,
            SAVE_Z=save, **types, **launch_kwargs(cfg),
        )
    return raw, mean, rstd, z


def bank_backward(d_h_bar: torch.Tensor, alpha: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                  fc1_weight: torch.Tensor, tokens: torch.Tensor, slots: torch.Tensor, raw: torch.Tensor,
                  mean: torch.Tensor, rstd: torch.Tensor, z: torch.Tensor, need_ln: bool = True,
                  need_w1: bool = True):
    """-> (d_alpha [L, K] (alpha's dtype, zero off this layer's pairs), d_ln_weight, d_ln_bias [D'],
    d_fc1_weight [H, G*D'], d_fc1_bias [H]) in the parameter dtype; LN/W1 grads are zeros when not needed."""
    op = "bank_backward"
    dev = d_h_bar.device
    check_tensor(op, "raw", raw, shape=(None, None, None), dtype=FLOAT_DTYPES, device=dev)
    n, G, Dg = raw.shape
    H = _check_bank_params(op, ln_weight, ln_bias, fc1_weight, Dg, G, dev)
    dtype = fc1_weight.dtype
    acc = acc_dtype(dtype)
    check_tensor(op, "d_h_bar", d_h_bar, shape=(None, H), dtype=acc)
    L = d_h_bar.shape[0]
    check_tensor(op, "alpha", alpha, shape=(L, None), dtype=FLOAT_DTYPES, device=dev)
    K = alpha.shape[1]
    if _check_pairs(op, tokens, slots, L, K, dev) != n:
        raise ValueError(f"{op}: tokens must have one id per saved pair ({n}), got {tokens.shape[0]}")
    check_tensor(op, "mean", mean, shape=(n * G,), dtype=acc, device=dev)
    check_tensor(op, "rstd", rstd, shape=(n * G,), dtype=acc, device=dev)
    check_tensor(op, "z", z, shape=(n, H), dtype=dtype, device=dev)
    d_alpha = torch.zeros(alpha.shape, dtype=alpha.dtype, device=dev)  # non-zero only at this layer's pairs
    if n == 0:
        return (d_alpha, torch.zeros_like(ln_weight), torch.zeros_like(ln_bias), torch.zeros_like(fc1_weight),
                fc1_weight.new_zeros((H,)))
    d_h_bar = rows_contiguous(d_h_bar)
    alpha = rows_contiguous(alpha)
    tokens, slots = tokens.contiguous(), slots.contiguous()
    raw, z, mean, rstd = raw.contiguous(), z.contiguous(), mean.contiguous(), rstd.contiguous()
    ln_weight, ln_bias = ln_weight.contiguous(), ln_bias.contiguous()
    types = _dtypes(dtype)
    rcfg = get_config("rows", n, dev)
    n_blocks = triton.cdiv(n, rcfg["BLOCK_SIZE_M"])
    dz = alloc((n, H), dtype, dev)
    db1_part = alloc((n_blocks, H), acc, dev)
    with guarded("bank_backward/dz", dz=dz, d_alpha=d_alpha, db1_part=db1_part) as out:
        _bank_dz_kernel[(n_blocks,)](
            d_h_bar, d_h_bar.stride(0), tokens, slots, alpha, alpha.stride(0), z, out.dz, out.d_alpha,
            d_alpha.stride(0), out.db1_part, n, H, L, K,
            PARAM_DTYPE=types["PARAM_DTYPE"], ACC_DTYPE=types["ACC_DTYPE"], BLOCK_SIZE_M=rcfg["BLOCK_SIZE_M"],
            BLOCK_SIZE_N=rcfg["BLOCK_SIZE_N"], num_warps=rcfg["num_warps"],
        )
    d_b1 = db1_part.sum(0).to(dtype)
    if need_w1:
        cfg = get_config("bank_dw1", H, dev, dtype)
        d_w1 = alloc((H, G * Dg), dtype, dev)
        grid = (triton.cdiv(H, cfg["BLOCK_SIZE_M"]), G * triton.cdiv(Dg, cfg["BLOCK_SIZE_N"]))
        with guarded("bank_backward/dw1", d_w1=d_w1) as out:
            _bank_dw1_kernel[grid](dz, raw, mean, rstd, ln_weight, ln_bias, out.d_w1, n, H, Dg, G, **types,
                                   **launch_kwargs(cfg))
    else:
        d_w1 = torch.zeros_like(fc1_weight)
    if need_ln:
        cfg = get_config("bank_dx", n, dev, dtype)
        n_mb = triton.cdiv(n, cfg["BLOCK_SIZE_M"])
        dgamma_part = alloc((n_mb * G, Dg), acc, dev)
        dbeta_part = alloc((n_mb * G, Dg), acc, dev)
        grid = (n_mb, G * triton.cdiv(Dg, cfg["BLOCK_SIZE_N"]))
        with guarded("bank_backward/dx", dgamma_part=dgamma_part, dbeta_part=dbeta_part) as out:
            _bank_dx_kernel[grid](dz, fc1_weight, fc1_weight.stride(0), fc1_weight.stride(1), raw, mean, rstd,
                                  out.dgamma_part, out.dbeta_part, n, H, Dg, G, **types, **launch_kwargs(cfg))
        d_ln_w, d_ln_b = dgamma_part.sum(0).to(dtype), dbeta_part.sum(0).to(dtype)
    else:
        d_ln_w, d_ln_b = torch.zeros_like(ln_weight), torch.zeros_like(ln_bias)
    return d_alpha, d_ln_w, d_ln_b, d_w1, d_b1


# ------------------------------------------------------------------------------------------ torch.library custom ops
@custom_op("geoalign::triton_bank_accumulate", mutates_args=("h_bar",))
def bank_accumulate_op(h_bar: torch.Tensor, alpha: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                       fc1_weight: torch.Tensor, fc1_bias: torch.Tensor, layer: torch.Tensor, tokens: torch.Tensor,
                       slots: torch.Tensor, gather_index: torch.Tensor, eps: float,
                       save: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """In-place h_bar update for one bank layer; returns what backward needs (raw, mean, rstd, z)."""
    return bank_forward(h_bar, alpha, ln_weight, ln_bias, fc1_weight, fc1_bias, layer, tokens, slots, gather_index,
                        eps, save)


@bank_accumulate_op.register_fake
def _bank_accumulate_fake(h_bar, alpha, ln_weight, ln_bias, fc1_weight, fc1_bias, layer, tokens, slots,
                          gather_index, eps, save):
    n, G, Dg, H = tokens.shape[0], gather_index.shape[1], layer.shape[1], fc1_weight.shape[0]
    rows = n if save else 0
    acc = acc_dtype(fc1_weight.dtype)
    return (layer.new_empty((rows, G, Dg)), h_bar.new_empty((n * G,), dtype=acc), h_bar.new_empty((n * G,), dtype=acc),
            fc1_weight.new_empty((rows, H)))


@custom_op("geoalign::triton_bank_backward", mutates_args=())
def bank_backward_op(d_h_bar: torch.Tensor, alpha: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                     fc1_weight: torch.Tensor, tokens: torch.Tensor, slots: torch.Tensor, raw: torch.Tensor,
                     mean: torch.Tensor, rstd: torch.Tensor, z: torch.Tensor, need_ln: bool,
                     need_w1: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_alpha, d_ln_weight, d_ln_bias, d_fc1_weight, d_fc1_bias) of one bank layer."""
    return bank_backward(d_h_bar, alpha, ln_weight, ln_bias, fc1_weight, tokens, slots, raw, mean, rstd, z,
                         need_ln, need_w1)


@bank_backward_op.register_fake
def _bank_backward_fake(d_h_bar, alpha, ln_weight, ln_bias, fc1_weight, tokens, slots, raw, mean, rstd, z, need_ln,
                        need_w1):
    return (torch.empty_like(alpha), torch.empty_like(ln_weight), torch.empty_like(ln_bias),
            torch.empty_like(fc1_weight), fc1_weight.new_empty((fc1_weight.shape[0],)))


class BankAccumulate(torch.autograd.Function):
    """h_bar[t] += alpha[t, s] * GELU(W1 . concat_g LN_i(R_i[gather_index[t, g]]) + b1) for layer i's pairs (t, s),
    in place (no [L, H] copy per layer; hence an autograd.Function with mark_dirty: torch.library refuses autograd
    formulas on mutating ops). Same signature and gradients as geoalign.backends.torch_sparse.BankAccumulate."""

    @staticmethod
    def forward(ctx, h_bar, alpha, ln_weight, ln_bias, fc1_weight, fc1_bias, layer, tokens, slots, gather_index, eps):
        ctx.mark_dirty(h_bar)
        raw, mean, rstd, z = bank_accumulate_op(h_bar, alpha, ln_weight, ln_bias, fc1_weight, fc1_bias, layer,
                                                tokens, slots, gather_index, eps, True)
        ctx.save_for_backward(alpha, ln_weight, ln_bias, fc1_weight, tokens, slots, raw, mean, rstd, z)
        return h_bar

    @staticmethod
    def backward(ctx, d_h_bar):
        alpha, ln_weight, ln_bias, fc1_weight, tokens, slots, raw, mean, rstd, z = ctx.saved_tensors
        need = ctx.needs_input_grad
        if not any(need[1:6]):
            return (d_h_bar,) + (None,) * 10
        d_alpha, d_ln_w, d_ln_b, d_w1, d_b1 = bank_backward_op(
            d_h_bar, alpha, ln_weight, ln_bias, fc1_weight, tokens, slots, raw, mean, rstd, z,
            bool(need[2] or need[3]), bool(need[4]))
        return (d_h_bar, d_alpha if need[1] else None, d_ln_w if need[2] else None, d_ln_b if need[3] else None,
                d_w1 if need[4] else None, d_b1 if need[5] else None, None, None, None, None, None)


def bank_accumulate(h_bar, alpha, ln_weight, ln_bias, fc1_weight, fc1_bias, layer, tokens, slots, gather_index,
                    eps: float) -> torch.Tensor:
    """Autograd-aware in-place accumulation of one bank layer into h_bar; returns h_bar. Saves nothing when no
    gradient is needed (inference / streaming under no_grad)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (h_bar, alpha, ln_weight, ln_bias, fc1_weight,
                                                                   fc1_bias)):
        return BankAccumulate.apply(h_bar, alpha, ln_weight, ln_bias, fc1_weight, fc1_bias, layer, tokens, slots,
                                    gather_index, eps)
    bank_accumulate_op(h_bar, alpha, ln_weight, ln_bias, fc1_weight, fc1_bias, layer, tokens, slots, gather_index,
                       eps, False)
    return h_bar
