"""Routed feature bank: every VGGT layer's forward as it streams in, and one grouped backward for all of them
(docs/architecture.md, "Backends").

The L*K routed (token, slot) pairs are sorted by bank layer once per forward (``tokens``, ``slots``, ``offsets``,
``positions`` from :func:`bank_rows`, vLLM fused_moe's sorted-pairs layout): layer j owns pairs
offsets[j]:offsets[j+1], and pair (t, s) sits at positions[t*K + s]. The offsets stay on the device; every grid is
sized for the worst case (a layer gets at most min(L, L*K) pairs: a token's K slots go to distinct layers) and
programs past the last pair exit at once. So nothing here makes the host wait for the device, and a forward can be
captured in a CUDA graph.

    _bank_rows_kernel          the counting sort of the L*K routes by layer (one program per layer, stable)

  forward with a gradient (training): per layer as it streams in, normalise only; GEMM1 once for every layer
    _gather_normalize_kernel   one pass over layer j's n_j*G gathered patch rows: two-pass mean / rstd (fp32),
                               x_hat in the parameter dtype written at the pairs' tape rows; copies LN_j's affine
                               into the stacked affine [2, M, D'] that GEMM1 and the backward read
    _bank_gemm1_kernel           (grouped, after the last layer) one launch over every layer's pairs: row tiles walk
                               the layers in order, each tile inside one layer (fused_moe's expert blocks), so the
                               LayerNorm affine in the A-load is one vector per tile; + b1 into z [P, H] (the tape)
    _bank_combine_kernel       h_bar[t] += sum_s alpha[t, s] GELU(z[positions[t*K + s]]): the K slots of a token
                               summed in registers (no atomics, deterministic)
  forward without a gradient (inference): per layer, x_hat into a scratch buffer of min(L, L*K) rows, then
    _bank_gemm1_kernel           (one layer) the same GEMM, its epilogue + alpha * GELU read-add-written into h_bar (a
                               layer's pairs have distinct tokens); memory stays at one layer's pairs
  backward, all layers at once (VGGT is frozen: no gradient into a layer, so dx = dz W1 is never formed)
    _bank_dz_kernel            dz = alpha * dh_bar[t] * GELU'(z) for all L*K pairs (2-D grid: pairs x H tiles) and
                               per-tile partial sums of d_alpha[t, s] = <dh_bar[t], GELU(z)>
    _bank_weight_grad_kernel   per [H, G*D'] tile, a loop over the layers: M_j = dz_j^T x_hat_j (fp32), db1_j,
                               then dW1 += gamma_j M_j + beta_j db1_j held in fp32 registers across every layer
                               (one rounding to the parameter dtype), and the tile's partial rows of
                               dgamma_j = sum_h W1 M_j and dbeta_j = sum_h W1 db1_j (no atomics)
    _bank_backward_finish_kernel  the partial sums reduced (d_alpha over H tiles; dgamma, dbeta over H tiles and
                               the G groups) and db1 rounded, in one launch

The tape (only when a gradient is needed): x_hat [L*K, G*D'] and z [L*K, H] in the parameter dtype, rows in pair
order, and the stacked LayerNorm affine [2, M, D']. Row indices are int64 before they meet a stride (L*K*G*D' and
N*D' can pass 2^31).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import guard
from .checks import FLOAT_DTYPES, INDEX_DTYPES, check_int, check_tensor
from .configs import get_config, launch_kwargs, tune
from .guard import guarded
from .library import custom_op
from .runtime import acc_dtype
from .utils import alloc, dot_dtype, dot_precision, gelu, gelu_grad, rows_contiguous, tl_dtype


# --------------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _bank_rows_kernel(
        topk_ptr,  # topk_idx [L*K] (flat, row-major; int32 or int64): the bank layer of pair f = t*K + s
        tokens_ptr, slots_ptr,  # outputs: [P] token id and slot of each pair, sorted by layer (int64)
        offsets_ptr,  # output: [M+1] layer j's pairs at offsets[j]:offsets[j+1] (int64)
        positions_ptr,  # output: [L*K] the sorted position of pair f (int64)
        n_pairs, K, M,  # L*K, slots per token, bank layers
        BLOCK_SIZE: tl.constexpr):  # pairs per step of the scan
    """Program j: the pairs routed to bank layer j, in flat order (so tokens ascend within the layer; a stable
    counting sort). Pass 1 counts the pairs of layers below j (layer j's first position), pass 2 places layer j's
    pairs by a running prefix sum. Ids outside [0, M) belong to no layer: program 0 gives them position -1 and the
    last program fills the unused tail of tokens / slots with -1 (so what reads them sees an invalid id: NaN rows,
    no stray writes)."""
    j = tl.program_id(0)
    offs = tl.arange(0, BLOCK_SIZE).to(tl.int64)
    below = tl.full([], 0, tl.int64)
    for f0 in range(0, n_pairs, BLOCK_SIZE):
        f = f0 + offs
        ids = tl.load(topk_ptr + f, mask=f < n_pairs, other=-1).to(tl.int64)
        below += tl.sum(((ids >= 0) & (ids < j)).to(tl.int64), axis=0)
    tl.store(offsets_ptr + j, below)
    position = below
    for f0 in range(0, n_pairs, BLOCK_SIZE):
        f = f0 + offs
        ids = tl.load(topk_ptr + f, mask=f < n_pairs, other=-1).to(tl.int64)
        hit = ids == j
        rank = tl.cumsum(hit.to(tl.int64), axis=0)  # inclusive: the first hit gets 1
        out = position + rank - 1
        tl.store(tokens_ptr + out, f // K, mask=hit)
        tl.store(slots_ptr + out, f % K, mask=hit)
        tl.store(positions_ptr + f, out, mask=hit)
        if j == 0:
            tl.store(positions_ptr + f, -1, mask=(f < n_pairs) & ((ids < 0) | (ids >= M)))
        position += tl.sum(hit.to(tl.int64), axis=0)
    if j == M - 1:
        tl.store(offsets_ptr + M, position)
        for tail0 in range(position, n_pairs, BLOCK_SIZE):  # empty unless some id was outside [0, M)
            tail = tail0 + offs  # (own names: triton 3.6 refuses a name that an if block retypes, int32 -> int64)
            tl.store(tokens_ptr + tail, -1, mask=tail < n_pairs)
            tl.store(slots_ptr + tail, -1, mask=tail < n_pairs)


@triton.jit
def _gather_normalize_kernel(
        layer_ptr, stride_layer_row, N,  # bank layer j [N, D'] (unit column stride), its row stride and row count
        gather_ptr, stride_gather_l, stride_gather_g, L,  # gather_index [L, G] and its strides; L tokens
        tokens_ptr, offsets_ptr, layer_pos,  # [P] token id of each pair; [M+1] layer offsets; this layer's position
        x_hat_ptr,  # output: normalised rows [rows, G*D'] (parameter dtype), row-major
        ln_weight_ptr, ln_bias_ptr,  # LN_j's affine [D'] (read only when TAPE)
        affine_ptr, stride_affine_kind, stride_affine_layer,  # output when TAPE: affine[0, j] = gamma_j, [1, j] = beta_j
        G, D_geo, eps,  # patch rows per token, row width D', LayerNorm eps
        TAPE: tl.constexpr,  # x_hat rows at the pairs' tape positions (else at 0..n_j-1, a scratch buffer)
        PARAM_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr,
        BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr):  # gathered rows per program, column chunk
    """Gathered row r = p*G + g of layer j's pair p: x_hat = (v - mean) * rstd with v = R_j[gather_index[token, g]]
    rounded to the parameter dtype (as torch's layer_norm(raw.to(param dtype))), two-pass statistics in ACC_DTYPE.
    A token id outside [0, L) or a gather row outside [0, N) reads nothing and gives a NaN row (visible)."""
    pid = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_SIZE_N).to(tl.int64)
    if TAPE:
        if pid == 0:  # the stacked affine, so that GEMM1 and the backward read every layer's from one tensor
            for d0 in range(0, D_geo, BLOCK_SIZE_N):
                mask = offs_d < D_geo - d0
                out = affine_ptr + layer_pos * stride_affine_layer + d0 + offs_d
                tl.store(out, tl.load(ln_weight_ptr + d0 + offs_d, mask=mask), mask=mask)
                tl.store(out + stride_affine_kind, tl.load(ln_bias_ptr + d0 + offs_d, mask=mask), mask=mask)
    first = tl.load(offsets_ptr + layer_pos).to(tl.int64)
    n_rows = (tl.load(offsets_ptr + layer_pos + 1).to(tl.int64) - first) * G
    if pid * BLOCK_SIZE_M >= n_rows:  # the grid is sized for the largest possible layer
        return
    offs_r = (pid * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)).to(tl.int64)
    mask_r = offs_r < n_rows
    pair = offs_r // G
    group = offs_r % G
    token = tl.load(tokens_ptr + first + pair, mask=mask_r, other=0).to(tl.int64)
    valid = mask_r & (token >= 0) & (token < L)
    src = tl.load(gather_ptr + token * stride_gather_l + group * stride_gather_g, mask=valid, other=0).to(tl.int64)
    valid = valid & (src >= 0) & (src < N)
    row_ptrs = layer_ptr + src[:, None] * stride_layer_row + offs_d[None, :]
    total = tl.zeros((BLOCK_SIZE_M,), dtype=ACC_DTYPE)
    for d0 in range(0, D_geo, BLOCK_SIZE_N):
        mask = valid[:, None] & (offs_d[None, :] < D_geo - d0)
        total += tl.sum(tl.load(row_ptrs + d0, mask=mask, other=0.0).to(PARAM_DTYPE).to(ACC_DTYPE), axis=1)
    mean = total / D_geo
    sq = tl.zeros((BLOCK_SIZE_M,), dtype=ACC_DTYPE)
    for d0 in range(0, D_geo, BLOCK_SIZE_N):  # second pass over the (cached) rows: centred sum of squares
        mask = valid[:, None] & (offs_d[None, :] < D_geo - d0)
        v = tl.load(row_ptrs + d0, mask=mask, other=0.0).to(PARAM_DTYPE).to(ACC_DTYPE)
        centred = tl.where(mask, v - mean[:, None], 0.0)
        sq += tl.sum(centred * centred, axis=1)
    rstd = tl.where(valid, 1.0 / tl.sqrt(sq / D_geo + eps), float("nan"))
    if TAPE:
        out_rows = first * G + offs_r
    else:
        out_rows = offs_r
    out_ptrs = x_hat_ptr + out_rows[:, None] * D_geo + offs_d[None, :]
    for d0 in range(0, D_geo, BLOCK_SIZE_N):  # third pass: write the normalised row
        mask = offs_d[None, :] < D_geo - d0
        v = tl.load(row_ptrs + d0, mask=mask & valid[:, None], other=0.0).to(PARAM_DTYPE).to(ACC_DTYPE)
        x_hat = (v - mean[:, None]) * rstd[:, None]
        tl.store(out_ptrs + d0, x_hat.to(PARAM_DTYPE), mask=mask & mask_r[:, None])


@triton.jit
def _bank_gemm1_kernel(
        x_hat_ptr,  # normalised rows [rows, G*D'] (parameter dtype), row-major
        ln_weight_ptr, ln_bias_ptr, stride_ln_layer,  # LN_j's affine at ln_*_ptr + j * stride (column c: entry c % D')
        w1_ptr, stride_w1_h, stride_w1_k, b1_ptr,  # GEMM1 weight [H, G*D'] and bias [H]
        tokens_ptr, slots_ptr, offsets_ptr, layer_lo, layer_hi,  # [P] pairs' token ids, slots; [M+1]; layers run
        alpha_ptr, stride_alpha_l,  # alpha [L, K] (unit column stride)
        h_bar_ptr, stride_h_bar_l,  # h_bar [L, H] (accumulation dtype), read-add-written when not TAPE
        z_ptr,  # output when TAPE: z [P, H] pre-activations at the pairs' tape rows
        H, D_geo, G, L, K,  # hidden width, D', patch rows per token, tokens, slots per token
        num_row_tiles,  # row tiles of the grid (the worst case over the layers run)
        TAPE: tl.constexpr, PARAM_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr,
        ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,  # pairs, H, G*D'
        GROUP_SIZE_M: tl.constexpr):  # row tiles per group of the launch order
    """A dense GEMM over the pairs of layers layer_lo..layer_hi-1 (rows) x H (columns), K-dim = G*D'
    (x = gamma_j x_hat + beta_j in the A-load). The row tiles walk the layers in order, a tile never straddling two
    layers; they are sized for the worst case and the surplus programs exit. 1-D grid in grouped order (Triton
    tutorial 03): GROUP_SIZE_M row tiles walk every H tile together, so their band of x_hat (in training the whole
    tape: L*K x G*D' = 16128 x 8192 bf16, about 250 MiB at paper scale) is read from DRAM about once instead of once
    per H tile.
    TAPE: rows are the pairs' tape rows; epilogue + b1, stored as z (h_bar comes from z: _bank_combine_kernel).
    Else (one layer, rows 0..n_j-1 of a scratch buffer): + b1, exact GELU, * alpha, read-add-write into h_bar."""
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(H, BLOCK_SIZE_N)
    num_pid_in_group = GROUP_SIZE_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_SIZE_M
    group_size_m = min(num_row_tiles - first_pid_m, GROUP_SIZE_M)
    pid_n = (pid % num_pid_in_group) // group_size_m
    tile = (first_pid_m + (pid % num_pid_in_group) % group_size_m).to(tl.int64)
    layer = layer_lo - 1  # the layer this program's tile belongs to (none found: stays below layer_lo)
    first = tile * 0
    n = tile * 0
    local = tile * 0
    for j in range(layer_lo, layer_hi):
        lo = tl.load(offsets_ptr + j).to(tl.int64)
        count = tl.load(offsets_ptr + j + 1).to(tl.int64) - lo
        tiles = (count + BLOCK_SIZE_M - 1) // BLOCK_SIZE_M
        hit = (tile >= 0) & (tile < tiles)
        layer = tl.where(hit, j, layer)
        first = tl.where(hit, lo, first)
        n = tl.where(hit, count, n)
        local = tl.where(hit, tile, local)
        tile -= tiles
    if layer < layer_lo:
        return
    offs_m = (local * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)).to(tl.int64)  # the layer's pairs
    mask_m = offs_m < n
    offs_n = (pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)).to(tl.int64)  # hidden columns
    mask_n = offs_n < H
    offs_k = tl.arange(0, BLOCK_SIZE_K).to(tl.int64)
    width = G * D_geo
    if TAPE:
        rows = first + offs_m
    else:
        rows = offs_m
    ln_w_ptr = ln_weight_ptr + layer.to(tl.int64) * stride_ln_layer
    ln_b_ptr = ln_bias_ptr + layer.to(tl.int64) * stride_ln_layer
    a_ptrs = x_hat_ptr + rows[:, None] * width + offs_k[None, :]
    w_ptrs = w1_ptr + offs_n[None, :] * stride_w1_h + offs_k[:, None] * stride_w1_k
    acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=ACC_DTYPE)
    for k0 in range(0, width, BLOCK_SIZE_K):
        cols = k0 + offs_k
        mask_k = cols < width
        x_hat = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(ACC_DTYPE)
        ln_w = tl.load(ln_w_ptr + cols % D_geo, mask=mask_k, other=0.0).to(ACC_DTYPE)
        ln_b = tl.load(ln_b_ptr + cols % D_geo, mask=mask_k, other=0.0).to(ACC_DTYPE)
        x = tl.where(mask_m[:, None] & mask_k[None, :], x_hat * ln_w[None, :] + ln_b[None, :], 0.0)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(x.to(PARAM_DTYPE).to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION,
                     out_dtype=ACC_DTYPE)
        a_ptrs += BLOCK_SIZE_K
        w_ptrs += BLOCK_SIZE_K * stride_w1_k
    z = (acc + tl.load(b1_ptr + offs_n, mask=mask_n, other=0.0).to(ACC_DTYPE)[None, :]).to(PARAM_DTYPE)
    if TAPE:
        tl.store(z_ptr + rows[:, None] * H + offs_n[None, :], z, mask=mask_m[:, None] & mask_n[None, :])
    else:
        token = tl.load(tokens_ptr + first + offs_m, mask=mask_m, other=0).to(tl.int64)
        slot = tl.load(slots_ptr + first + offs_m, mask=mask_m, other=0).to(tl.int64)
        valid = mask_m & (token >= 0) & (token < L) & (slot >= 0) & (slot < K)  # no read or write through bad ids
        # alpha as a [BLOCK_SIZE_M, 1] column: loaded as a 1-D vector, it breaks triton 3.6's fp64 build (the
        # RemoveLayoutConversions pass leaves the load's mask and pointer in different layouts)
        alpha = tl.load(alpha_ptr + (token * stride_alpha_l + slot)[:, None], mask=valid[:, None], other=0.0)
        h_bar_ptrs = h_bar_ptr + token[:, None] * stride_h_bar_l + offs_n[None, :]
        mask_h = valid[:, None] & mask_n[None, :]
        h_old = tl.load(h_bar_ptrs, mask=mask_h, other=0.0)
        tl.store(h_bar_ptrs, h_old + alpha.to(ACC_DTYPE) * gelu(z.to(ACC_DTYPE)), mask=mask_h)


@triton.jit
def _bank_combine_kernel(
        z_ptr,  # the tape's pre-activations z [P, H] (parameter dtype)
        positions_ptr,  # [L*K] the tape row of pair (t, s) at t*K + s
        alpha_ptr, stride_alpha_l,  # alpha [L, K] (unit column stride)
        h_bar_ptr, stride_h_bar_l,  # h_bar [L, H] (accumulation dtype), read-add-written
        L, H, K, P,  # tokens, hidden width, slots per token, pairs
        ACC_DTYPE: tl.constexpr, BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr):  # tokens, H per program
    """One [tokens, H] tile: h_bar[t] += sum_s alpha[t, s] GELU(z[positions[t*K + s]]), slots summed in order in
    ACC_DTYPE. A position outside [0, P) reads nothing and makes its token's row NaN (visible)."""
    offs_t = (tl.program_id(0) * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)).to(tl.int64)
    mask_t = offs_t < L
    offs_n = (tl.program_id(1) * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)).to(tl.int64)
    mask = mask_t[:, None] & (offs_n[None, :] < H)
    total = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=ACC_DTYPE)
    for s in range(0, K):
        row = tl.load(positions_ptr + offs_t * K + s, mask=mask_t, other=-1).to(tl.int64)
        valid = mask_t & (row >= 0) & (row < P)
        alpha = tl.load(alpha_ptr + offs_t * stride_alpha_l + s, mask=valid, other=0.0).to(ACC_DTYPE)
        z = tl.load(z_ptr + row[:, None] * H + offs_n[None, :], mask=mask & valid[:, None], other=0.0)
        total += tl.where(valid[:, None], alpha[:, None] * gelu(z.to(ACC_DTYPE)), float("nan"))
    h_bar_ptrs = h_bar_ptr + offs_t[:, None] * stride_h_bar_l + offs_n[None, :]
    tl.store(h_bar_ptrs, tl.load(h_bar_ptrs, mask=mask, other=0.0) + total, mask=mask)


@triton.jit
def _bank_dz_kernel(
        d_h_bar_ptr, stride_d_h_bar_l,  # dL/dh_bar [L, H] (accumulation dtype)
        tokens_ptr, slots_ptr,  # [P] token id and slot of each pair
        alpha_ptr, stride_alpha_l,  # alpha [L, K]
        z_ptr,  # the tape's pre-activations z [P, H]
        dz_ptr,  # output: dz [P, H] (parameter dtype)
        d_alpha_partial_ptr,  # output: [H tiles, L, K] partial sums of d alpha (accumulation dtype)
        P, H, L, K,  # pairs, hidden width, tokens, slots per token
        PARAM_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr,
        BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr):  # pairs, hidden columns per program
    """One [pairs, H] tile: dz = alpha * dh_bar[t] * GELU'(z) and this tile's share of <dh_bar[t], GELU(z)>."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = (pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)).to(tl.int64)
    mask_m = offs_m < P
    offs_n = (pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)).to(tl.int64)
    mask = mask_m[:, None] & (offs_n[None, :] < H)
    token = tl.load(tokens_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    slot = tl.load(slots_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    valid = mask_m & (token >= 0) & (token < L) & (slot >= 0) & (slot < K)  # no read or write through bad ids
    # alpha as a [BLOCK_SIZE_M, 1] column (a 1-D load breaks triton 3.6's fp64 build: see _bank_gemm1_kernel)
    alpha = tl.load(alpha_ptr + (token * stride_alpha_l + slot)[:, None], mask=valid[:, None], other=0.0)
    dh = tl.load(d_h_bar_ptr + token[:, None] * stride_d_h_bar_l + offs_n[None, :], mask=mask & valid[:, None],
                 other=0.0).to(ACC_DTYPE)
    z = tl.load(z_ptr + offs_m[:, None] * H + offs_n[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
    dz = (alpha.to(ACC_DTYPE) * dh * gelu_grad(z)).to(PARAM_DTYPE)
    tl.store(dz_ptr + offs_m[:, None] * H + offs_n[None, :], dz, mask=mask)
    d_alpha = tl.sum(tl.where(mask, dh * gelu(z), 0.0), axis=1)
    tl.store(d_alpha_partial_ptr + (pid_n.to(tl.int64) * L + token) * K + slot, d_alpha, mask=valid)


@triton.jit
def _bank_weight_grad_kernel(
        dz_ptr,  # dz [P, H] (parameter dtype), rows in pair order
        x_hat_ptr,  # the tape's normalised rows [P, G*D'] (parameter dtype)
        offsets_ptr, num_layers,  # [M+1] layer offsets into the pairs; M
        ln_weight_ptr, ln_bias_ptr, stride_ln_layer,  # every layer's LN affine [M, D'] (unit column stride)
        w1_ptr, stride_w1_h, stride_w1_k,  # GEMM1 weight [H, G*D']
        dw1_ptr,  # output: dW1 [H, G*D'] (parameter dtype), when STORE_DW1
        db1_ptr,  # output: db1 [H] (accumulation dtype), written by the programs of the first column tile
        dgamma_partial_ptr, dbeta_partial_ptr,  # outputs: [H tiles, M, G*D'] partial sums (accumulation dtype)
        H, D_geo, G,  # hidden width, D', patch rows per token
        STORE_DW1: tl.constexpr, PARAM_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr):  # H, G*D', pairs
    """One [H, G*D'] tile of dW1 for every layer: M_j = dz_j^T x_hat_j (reduction over layer j's pairs) and
    db1_j = sum of dz_j, then dW1 += gamma_j M_j + beta_j db1_j and this tile's partial rows
    dgamma_j[c] = sum_h W1[h, c] M_j[h, c], dbeta_j[c] = sum_h W1[h, c] db1_j[h]."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    width = G * D_geo
    offs_h = (pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)).to(tl.int64)
    mask_h = offs_h < H
    offs_c = (pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)).to(tl.int64)
    mask_c = offs_c < width
    mask = mask_h[:, None] & mask_c[None, :]
    offs_p = tl.arange(0, BLOCK_SIZE_K).to(tl.int64)
    dw1 = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=ACC_DTYPE)
    db1_all = tl.zeros((BLOCK_SIZE_M,), dtype=ACC_DTYPE)
    for j in range(0, num_layers):
        lo = tl.load(offsets_ptr + j).to(tl.int64)
        hi = tl.load(offsets_ptr + j + 1).to(tl.int64)
        acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=ACC_DTYPE)
        db1 = tl.zeros((BLOCK_SIZE_M,), dtype=ACC_DTYPE)
        dz_ptrs = dz_ptr + (lo + offs_p)[None, :] * H + offs_h[:, None]  # dz_j^T tile [BLOCK_H, BLOCK_P]
        x_ptrs = x_hat_ptr + (lo + offs_p)[:, None] * width + offs_c[None, :]  # x_hat_j tile [BLOCK_P, BLOCK_C]
        for p0 in range(lo, hi, BLOCK_SIZE_K):
            mask_p = offs_p < hi - p0
            dz = tl.load(dz_ptrs, mask=mask_h[:, None] & mask_p[None, :], other=0.0)
            x_hat = tl.load(x_ptrs, mask=mask_p[:, None] & mask_c[None, :], other=0.0)
            acc = tl.dot(dz.to(DOT_DTYPE), x_hat.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION,
                         out_dtype=ACC_DTYPE)
            db1 += tl.sum(dz.to(ACC_DTYPE), axis=1)
            dz_ptrs += BLOCK_SIZE_K * H
            x_ptrs += BLOCK_SIZE_K * width
        # the loop's db1 gets exactly one use (this select; rows past H are 0 anyway): triton 3.6's
        # OptimizeThreadLocality pass, which rewrites the in-loop tl.sum, asserts that (fp32 build, sm_90)
        db1 = tl.where(mask_h, db1, 0.0)
        ln_w = tl.load(ln_weight_ptr + j * stride_ln_layer + offs_c % D_geo, mask=mask_c, other=0.0).to(ACC_DTYPE)
        ln_b = tl.load(ln_bias_ptr + j * stride_ln_layer + offs_c % D_geo, mask=mask_c, other=0.0).to(ACC_DTYPE)
        dw1 += acc * ln_w[None, :] + db1[:, None] * ln_b[None, :]
        db1_all += db1
        w1 = tl.load(w1_ptr + offs_h[:, None] * stride_w1_h + offs_c[None, :] * stride_w1_k, mask=mask,
                     other=0.0).to(ACC_DTYPE)
        offs_out = (pid_m.to(tl.int64) * num_layers + j) * width + offs_c
        tl.store(dgamma_partial_ptr + offs_out, tl.sum(w1 * acc, axis=0), mask=mask_c)
        tl.store(dbeta_partial_ptr + offs_out, tl.sum(w1 * db1[:, None], axis=0), mask=mask_c)
    if STORE_DW1:
        tl.store(dw1_ptr + offs_h[:, None] * width + offs_c[None, :], dw1.to(PARAM_DTYPE), mask=mask)
    if pid_n == 0:
        tl.store(db1_ptr + offs_h, db1_all, mask=mask_h)


@triton.jit
def _bank_backward_finish_kernel(
        d_alpha_partial_ptr, n_alpha_tiles, d_alpha_ptr, n_alpha,  # [tiles, L*K] partials -> d_alpha [L*K]
        dgamma_partial_ptr, dbeta_partial_ptr, n_h_tiles,  # [tiles, M, G*D'] partials (accumulation dtype)
        d_gamma_ptr, d_beta_ptr, M, G, D_geo,  # outputs [M, D'] (parameter dtype), when NEED_LN
        db1_acc_ptr, db1_ptr, H,  # db1 [H] in the accumulation dtype -> the parameter dtype
        NEED_LN: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Grid (blocks, 3); axis 1 picks the reduction: 0 d_alpha = sum over the dz kernel's H tiles, 1 dgamma and
    dbeta = sums over the weight-gradient kernel's H tiles and the G groups, 2 db1 rounded. Fixed order (no
    atomics): the result does not depend on scheduling."""
    task = tl.program_id(1)
    offs = (tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)).to(tl.int64)
    if task == 0:
        mask = offs < n_alpha
        total = tl.zeros((BLOCK_SIZE,), dtype=ACC_DTYPE)
        partial_ptrs = d_alpha_partial_ptr + offs  # (pointer steps: 64-bit addresses however many tiles)
        for i in range(0, n_alpha_tiles):
            total += tl.load(partial_ptrs, mask=mask, other=0.0)
            partial_ptrs += n_alpha
        tl.store(d_alpha_ptr + offs, total.to(d_alpha_ptr.dtype.element_ty), mask=mask)
    elif task == 1:
        if NEED_LN:
            mask = offs < M * D_geo
            layer = offs // D_geo
            d = offs % D_geo
            width = G * D_geo
            d_gamma = tl.zeros((BLOCK_SIZE,), dtype=ACC_DTYPE)
            d_beta = tl.zeros((BLOCK_SIZE,), dtype=ACC_DTYPE)
            base = layer * width + d  # int64; one H tile's [M, G*D'] block further per step
            for i in range(0, n_h_tiles):
                for g in range(0, G):
                    d_gamma += tl.load(dgamma_partial_ptr + base + g * D_geo, mask=mask, other=0.0)
                    d_beta += tl.load(dbeta_partial_ptr + base + g * D_geo, mask=mask, other=0.0)
                base += M * width
            tl.store(d_gamma_ptr + offs, d_gamma.to(d_gamma_ptr.dtype.element_ty), mask=mask)
            tl.store(d_beta_ptr + offs, d_beta.to(d_beta_ptr.dtype.element_ty), mask=mask)
    else:
        mask = offs < H
        tl.store(db1_ptr + offs, tl.load(db1_acc_ptr + offs, mask=mask).to(db1_ptr.dtype.element_ty), mask=mask)


# -------------------------------------------------------------------------------------------------------- launchers
def _dtypes(dtype: torch.dtype) -> dict:
    """The dtype constexprs of the bank kernels for parameters of ``dtype``."""
    return dict(PARAM_DTYPE=tl_dtype(dtype), DOT_DTYPE=dot_dtype(dtype), ACC_DTYPE=tl_dtype(acc_dtype(dtype)),
                DOT_PRECISION=dot_precision(dtype))


def _check_pairs(op, tokens, slots, offsets, L, K, dev):
    """tokens/slots [P] int ids of the pairs sorted by layer, offsets [M+1] int64: P <= L*K. Returns (P, M)."""
    check_tensor(op, "tokens", tokens, shape=(None,), dtype=INDEX_DTYPES, device=dev)
    P = tokens.shape[0]
    check_tensor(op, "slots", slots, shape=(P,), dtype=INDEX_DTYPES, device=dev)
    check_tensor(op, "offsets", offsets, shape=(None,), dtype=torch.int64, device=dev)
    if offsets.shape[0] < 2:
        raise ValueError(f"{op}: offsets must have M+1 >= 2 entries (layer j's pairs at offsets[j]:offsets[j+1]), "
                         f"got {offsets.shape[0]}")
    if P > L * K:
        raise ValueError(f"{op}: {P} routed pairs for L={L} tokens with K={K} slots each; expected at most {L * K}")
    guard.check_index_range(op, "tokens", tokens, L, "rows of h_bar")
    guard.check_index_range(op, "slots", slots, K, "columns of alpha")
    guard.check_index_range(op, "offsets", offsets, P + 1, "pair positions")
    return P, offsets.shape[0] - 1


def bank_rows(topk_idx: torch.Tensor, num_layers: int):
    """The L*K routes of topk_idx [L, K] (int32/int64) grouped by bank layer, in one launch: (tokens [P], slots [P],
    offsets [M+1], positions [L*K]) int64 with P = L*K; layer j's pairs at offsets[j]:offsets[j+1], tokens
    ascending within a layer (the order of geoalign.routing.bank_rows), pair (t, s) at positions[t*K + s]."""
    op = "bank_rows"
    check_tensor(op, "topk_idx", topk_idx, shape=(None, None), dtype=INDEX_DTYPES)
    L, K = topk_idx.shape
    check_int(op, "num_layers", num_layers, 1, 2**31 - 1)
    if L * K == 0:
        raise ValueError(f"{op}: topk_idx must be a non-empty [L, K], got {list(topk_idx.shape)}")
    guard.check_index_range(op, "topk_idx", topk_idx, num_layers, "bank layers")
    dev, P = topk_idx.device, L * K
    tokens, slots = alloc((P,), torch.int64, dev), alloc((P,), torch.int64, dev)
    offsets, positions = alloc((num_layers + 1,), torch.int64, dev), alloc((P,), torch.int64, dev)
    block = min(1024, triton.next_power_of_2(P))
    with guarded(op, tokens=tokens, slots=slots, offsets=offsets, positions=positions) as out:
        _bank_rows_kernel[(num_layers,)](topk_idx.contiguous(), out.tokens, out.slots, out.offsets, out.positions,
                                         P, K, num_layers, BLOCK_SIZE=block, num_warps=4)
    return tokens, slots, offsets, positions


def bank_layer_forward(h_bar: torch.Tensor, alpha: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                       fc1_weight: torch.Tensor, fc1_bias: torch.Tensor, layer: torch.Tensor, tokens: torch.Tensor,
                       slots: torch.Tensor, offsets: torch.Tensor, layer_pos: int, gather_index: torch.Tensor,
                       eps: float, x_hat: torch.Tensor, affine: torch.Tensor, tape: bool) -> None:
    """Bank layer ``layer_pos`` as it streams in. alpha [L, K]; ln_* [D'] (that layer's); fc1_weight [H, G*D'],
    fc1_bias [H]; layer [N, D'] (any float dtype); tokens/slots [P], offsets [M+1]; gather_index [L, G].

    tape=True (a gradient will be needed): normalise the layer's pairs into x_hat [P, G*D'] at their tape rows and
    copy (ln_weight, ln_bias) into affine[:, layer_pos] ([2, M, D']); h_bar is left alone (bank_tape_forward runs
    GEMM1 for every layer at once). tape=False: normalise into the scratch x_hat [min(L, P), G*D'] and add the
    layer's pairs into h_bar [L, H] (fp32/fp64, in place); affine is not used (pass an empty [2, 0, D'])."""
    op = "bank_layer_forward"
    dev = h_bar.device
    check_tensor(op, "gather_index", gather_index, shape=(None, None), dtype=INDEX_DTYPES, device=dev)
    L, G = gather_index.shape
    check_tensor(op, "layer", layer, shape=(None, None), dtype=FLOAT_DTYPES, device=dev)
    N, Dg = layer.shape
    check_tensor(op, "fc1_weight", fc1_weight, shape=(None, G * Dg), dtype=FLOAT_DTYPES, device=dev)
    H, dtype = fc1_weight.shape[0], fc1_weight.dtype
    check_tensor(op, "ln_weight", ln_weight, shape=(Dg,), dtype=dtype, device=dev)
    check_tensor(op, "ln_bias", ln_bias, shape=(Dg,), dtype=dtype, device=dev)
    check_tensor(op, "fc1_bias", fc1_bias, shape=(H,), dtype=dtype, device=dev)
    check_tensor(op, "h_bar", h_bar, shape=(L, H), dtype=acc_dtype(dtype), unit_stride=True)
    check_tensor(op, "alpha", alpha, shape=(L, None), dtype=FLOAT_DTYPES, device=dev)
    K = alpha.shape[1]
    P, M = _check_pairs(op, tokens, slots, offsets, L, K, dev)
    check_int(op, "layer_pos", layer_pos, 0, M - 1)
    max_pairs = min(L, P)  # a layer's pairs have distinct tokens
    check_tensor(op, "x_hat", x_hat, shape=(P if tape else max_pairs, G * Dg), dtype=dtype, device=dev)
    check_tensor(op, "affine", affine, shape=(2, M if tape else 0, Dg), dtype=dtype, device=dev)
    for name, t in (("x_hat", x_hat), ("affine", affine)):
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous, got strides {list(t.stride())}")
    guard.check_index_range(op, "gather_index", gather_index, N, "rows of the layer")
    layer = rows_contiguous(layer)  # one explicit copy if the rows are strided
    alpha = rows_contiguous(alpha)
    tokens, slots = tokens.contiguous(), slots.contiguous()
    ln_weight, ln_bias, fc1_bias = ln_weight.contiguous(), ln_bias.contiguous(), fc1_bias.contiguous()
    types = _dtypes(dtype)
    rcfg = get_config("rows", max_pairs * G, dev)
    with guarded("bank_layer_forward/normalize", x_hat=x_hat, affine=affine) as out:
        # at least one program: it also stacks the layer's affine, which the backward reads even with no pairs
        _gather_normalize_kernel[(max(1, triton.cdiv(max_pairs * G, rcfg["BLOCK_SIZE_M"])),)](
            layer, layer.stride(0), N, gather_index, gather_index.stride(0), gather_index.stride(1), L, tokens,
            offsets, layer_pos, out.x_hat, ln_weight, ln_bias, out.affine, affine.stride(0), affine.stride(1), G, Dg,
            eps, TAPE=tape, PARAM_DTYPE=types["PARAM_DTYPE"], ACC_DTYPE=types["ACC_DTYPE"],
            BLOCK_SIZE_M=rcfg["BLOCK_SIZE_M"], BLOCK_SIZE_N=rcfg["BLOCK_SIZE_N"], num_warps=rcfg["num_warps"],
        )
    if tape:
        return

    def gemm1(cfg):
        tiles = triton.cdiv(max_pairs, cfg["BLOCK_SIZE_M"])
        with guarded("bank_layer_forward/gemm1", h_bar=h_bar) as out:
            _bank_gemm1_kernel[(tiles * triton.cdiv(H, cfg["BLOCK_SIZE_N"]),)](
                x_hat, ln_weight, ln_bias, 0, fc1_weight, fc1_weight.stride(0), fc1_weight.stride(1), fc1_bias,
                tokens, slots, offsets, layer_pos, layer_pos + 1, alpha, alpha.stride(0), out.h_bar,
                h_bar.stride(0), x_hat, H, Dg, G, L, K, tiles, TAPE=False, **types, **launch_kwargs(cfg, group=True),
            )

    gemm1(tune("bank_gemm1", max_pairs, dev, dtype, gemm1, restore=(h_bar,)))  # h_bar is read-add-written


def bank_tape_forward(h_bar: torch.Tensor, alpha: torch.Tensor, affine: torch.Tensor, fc1_weight: torch.Tensor,
                      fc1_bias: torch.Tensor, offsets: torch.Tensor, positions: torch.Tensor, x_hat: torch.Tensor,
                      z: torch.Tensor) -> None:
    """GEMM1 for every taped pair once all bank layers are normalised (bank_layer_forward with tape=True):
    z [P, H] = (gamma_j x_hat + beta_j) W1^T + b1 (parameter dtype), one launch over every layer, then
    h_bar[t] += sum_s alpha[t, s] GELU(z[positions[t*K + s]]) (fp32/fp64, in place). alpha [L, K]; affine
    [2, M, D'] (the stacked LayerNorm affine); offsets [M+1]; positions [L*K]; x_hat [P, G*D'] with P = L*K."""
    op = "bank_tape_forward"
    dev = h_bar.device
    check_tensor(op, "fc1_weight", fc1_weight, shape=(None, None), dtype=FLOAT_DTYPES, device=dev)
    (H, width), dtype = fc1_weight.shape, fc1_weight.dtype
    check_tensor(op, "affine", affine, shape=(2, None, None), dtype=dtype, device=dev)
    M, Dg = affine.shape[1], affine.shape[2]
    if Dg == 0 or width % Dg:
        raise ValueError(f"{op}: fc1_weight's width {width} is not a multiple of D'={Dg} (affine's width)")
    G = width // Dg
    check_tensor(op, "fc1_bias", fc1_bias, shape=(H,), dtype=dtype, device=dev)
    check_tensor(op, "h_bar", h_bar, shape=(None, H), dtype=acc_dtype(dtype), unit_stride=True)
    L = h_bar.shape[0]
    check_tensor(op, "alpha", alpha, shape=(L, None), dtype=FLOAT_DTYPES, device=dev)
    K = alpha.shape[1]
    P = L * K
    check_tensor(op, "offsets", offsets, shape=(M + 1,), dtype=torch.int64, device=dev)
    check_tensor(op, "positions", positions, shape=(P,), dtype=torch.int64, device=dev)
    check_tensor(op, "x_hat", x_hat, shape=(P, width), dtype=dtype, device=dev)
    check_tensor(op, "z", z, shape=(P, H), dtype=dtype, device=dev)
    for name, t in (("affine", affine), ("x_hat", x_hat), ("z", z)):
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous, got strides {list(t.stride())}")
    guard.check_index_range(op, "offsets", offsets, P + 1, "pair positions")
    guard.check_index_range(op, "positions", positions, P, "tape rows")
    if P == 0:
        return
    alpha, fc1_bias = rows_contiguous(alpha), fc1_bias.contiguous()
    types = _dtypes(dtype)

    def gemm1(cfg):
        tiles = triton.cdiv(P, cfg["BLOCK_SIZE_M"]) + M  # each layer's last tile may be partial
        with guarded("bank_tape_forward/gemm1", z=z) as out:  # (tokens / slots are not read with TAPE)
            _bank_gemm1_kernel[(tiles * triton.cdiv(H, cfg["BLOCK_SIZE_N"]),)](
                x_hat, affine[0], affine[1], affine.stride(1), fc1_weight, fc1_weight.stride(0),
                fc1_weight.stride(1), fc1_bias, offsets, offsets, offsets, 0, M, alpha, alpha.stride(0), h_bar,
                h_bar.stride(0), out.z, H, Dg, G, L, K, tiles, TAPE=True, **types, **launch_kwargs(cfg, group=True),
            )

    gemm1(tune("bank_gemm1", P, dev, dtype, gemm1))
    rcfg = get_config("rows", L, dev)
    with guarded("bank_tape_forward/combine", h_bar=h_bar) as out:
        _bank_combine_kernel[(triton.cdiv(L, rcfg["BLOCK_SIZE_M"]), triton.cdiv(H, rcfg["BLOCK_SIZE_N"]))](
            z, positions, alpha, alpha.stride(0), out.h_bar, h_bar.stride(0), L, H, K, P,
            ACC_DTYPE=types["ACC_DTYPE"], BLOCK_SIZE_M=rcfg["BLOCK_SIZE_M"], BLOCK_SIZE_N=rcfg["BLOCK_SIZE_N"],
            num_warps=rcfg["num_warps"],
        )


def bank_backward(d_h_bar: torch.Tensor, alpha: torch.Tensor, affine: torch.Tensor, fc1_weight: torch.Tensor,
                  tokens: torch.Tensor, slots: torch.Tensor, offsets: torch.Tensor, x_hat: torch.Tensor,
                  z: torch.Tensor, need_ln: bool = True, need_w1: bool = True):
    """Every bank layer's gradients from d_h_bar [L, H] (fp32/fp64) and the tape (x_hat [P, G*D'], z [P, H], the
    stacked LayerNorm affine [2, M, D']): -> (d_alpha [L, K] (alpha's dtype), d_ln_weights, d_ln_biases [M, D'],
    d_fc1_weight [H, G*D'], d_fc1_bias [H]) in the parameter dtype. Three launches for all layers; dW1 and db1
    summed over the layers in fp32."""
    op = "bank_backward"
    dev = d_h_bar.device
    check_tensor(op, "fc1_weight", fc1_weight, shape=(None, None), dtype=FLOAT_DTYPES, device=dev)
    H, width = fc1_weight.shape
    dtype = fc1_weight.dtype
    check_tensor(op, "affine", affine, shape=(2, None, None), dtype=dtype, device=dev)
    M, Dg = affine.shape[1], affine.shape[2]
    if Dg == 0 or width % Dg:
        raise ValueError(f"{op}: fc1_weight's width {width} is not a multiple of D'={Dg} (affine's width)")
    G = width // Dg
    acc = acc_dtype(dtype)
    check_tensor(op, "d_h_bar", d_h_bar, shape=(None, H), dtype=acc)
    L = d_h_bar.shape[0]
    check_tensor(op, "alpha", alpha, shape=(L, None), dtype=FLOAT_DTYPES, device=dev)
    K = alpha.shape[1]
    P, M_offsets = _check_pairs(op, tokens, slots, offsets, L, K, dev)
    if M_offsets != M:
        raise ValueError(f"{op}: offsets has {M_offsets + 1} entries but affine has {M} layers; expected {M + 1}")
    check_tensor(op, "x_hat", x_hat, shape=(P, width), dtype=dtype, device=dev)
    check_tensor(op, "z", z, shape=(P, H), dtype=dtype, device=dev)
    d_h_bar = rows_contiguous(d_h_bar)
    alpha = rows_contiguous(alpha)
    tokens, slots = tokens.contiguous(), slots.contiguous()
    x_hat, z, affine = x_hat.contiguous(), z.contiguous(), affine.contiguous()
    types = _dtypes(dtype)
    rcfg = get_config("rows", P, dev)
    n_dz_tiles = triton.cdiv(H, rcfg["BLOCK_SIZE_N"])
    dz = alloc((P, H), dtype, dev)
    # every (t, s) is one pair when the pairs are all L*K of a routing (always, from bank_rows): no zero-fill
    d_alpha_part = (alloc if P == L * K else torch.zeros)((n_dz_tiles, L, K), dtype=acc, device=dev)
    with guarded("bank_backward/dz", dz=dz, d_alpha_part=d_alpha_part) as out:
        _bank_dz_kernel[(triton.cdiv(P, rcfg["BLOCK_SIZE_M"]), n_dz_tiles)](
            d_h_bar, d_h_bar.stride(0), tokens, slots, alpha, alpha.stride(0), z, out.dz, out.d_alpha_part, P, H,
            L, K, PARAM_DTYPE=types["PARAM_DTYPE"], ACC_DTYPE=types["ACC_DTYPE"], BLOCK_SIZE_M=rcfg["BLOCK_SIZE_M"],
            BLOCK_SIZE_N=rcfg["BLOCK_SIZE_N"], num_warps=rcfg["num_warps"],
        )

    def weight_grad(cfg):
        n_h_tiles = triton.cdiv(H, cfg["BLOCK_SIZE_M"])
        d_w1 = alloc((H, width), dtype, dev) if need_w1 else fc1_weight.new_empty((0, width))
        db1 = alloc((H,), acc, dev)
        dgamma_part = alloc((n_h_tiles, M, width), acc, dev)
        dbeta_part = alloc((n_h_tiles, M, width), acc, dev)
        grid = (n_h_tiles, triton.cdiv(width, cfg["BLOCK_SIZE_N"]))
        with guarded("bank_backward/weight_grad", d_w1=d_w1, db1=db1, dgamma_part=dgamma_part,
                     dbeta_part=dbeta_part) as out:
            _bank_weight_grad_kernel[grid](
                dz, x_hat, offsets, M, affine[0], affine[1], affine.stride(1), fc1_weight, fc1_weight.stride(0),
                fc1_weight.stride(1), out.d_w1, out.db1, out.dgamma_part, out.dbeta_part, H, Dg, G,
                STORE_DW1=need_w1, **types, **launch_kwargs(cfg),
            )
        return n_h_tiles, d_w1, db1, dgamma_part, dbeta_part

    n_h_tiles, d_w1, db1_acc, dgamma_part, dbeta_part = weight_grad(tune("bank_weight_grad", H, dev, dtype, weight_grad))
    d_alpha = alloc((L, K), alpha.dtype, dev)
    d_ln_w, d_ln_b = ((alloc if need_ln else torch.zeros)((M, Dg), dtype=dtype, device=dev) for _ in range(2))
    db1 = alloc((H,), dtype, dev)
    block = 128
    with guarded("bank_backward/finish", d_alpha=d_alpha, d_ln_w=d_ln_w, d_ln_b=d_ln_b, db1=db1) as out:
        _bank_backward_finish_kernel[(triton.cdiv(max(L * K, M * Dg, H), block), 3)](
            d_alpha_part, n_dz_tiles, out.d_alpha, L * K, dgamma_part, dbeta_part, n_h_tiles, out.d_ln_w, out.d_ln_b,
            M, G, Dg, db1_acc, out.db1, H, NEED_LN=need_ln, ACC_DTYPE=types["ACC_DTYPE"], BLOCK_SIZE=block,
        )
    if not need_w1:
        d_w1 = torch.zeros_like(fc1_weight)
    return d_alpha, d_ln_w, d_ln_b, d_w1, db1


# ------------------------------------------------------------------------------------------ torch.library custom ops
@custom_op("geoalign::triton_bank_rows", mutates_args=())
def bank_rows_op(topk_idx: torch.Tensor, num_layers: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens, slots, offsets, positions) of the routes grouped by bank layer (see bank_rows)."""
    return bank_rows(topk_idx, num_layers)


@bank_rows_op.register_fake
def _bank_rows_fake(topk_idx, num_layers):
    P = topk_idx.shape[0] * topk_idx.shape[1]
    new = lambda *shape: topk_idx.new_empty(shape, dtype=torch.int64)  # noqa: E731
    return new(P), new(P), new(num_layers + 1), new(P)


@custom_op("geoalign::triton_bank_layer_forward", mutates_args=("h_bar", "x_hat", "affine"))
def bank_layer_forward_op(h_bar: torch.Tensor, alpha: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                          fc1_weight: torch.Tensor, fc1_bias: torch.Tensor, layer: torch.Tensor,
                          tokens: torch.Tensor, slots: torch.Tensor, offsets: torch.Tensor, layer_pos: int,
                          gather_index: torch.Tensor, eps: float, x_hat: torch.Tensor, affine: torch.Tensor,
                          tape: bool) -> None:
    """One bank layer as it streams in (see bank_layer_forward): h_bar, x_hat and affine updated in place."""
    bank_layer_forward(h_bar, alpha, ln_weight, ln_bias, fc1_weight, fc1_bias, layer, tokens, slots, offsets,
                       layer_pos, gather_index, eps, x_hat, affine, tape)


@bank_layer_forward_op.register_fake
def _bank_layer_forward_fake(h_bar, alpha, ln_weight, ln_bias, fc1_weight, fc1_bias, layer, tokens, slots, offsets,
                             layer_pos, gather_index, eps, x_hat, affine, tape):
    return None


@custom_op("geoalign::triton_bank_tape_forward", mutates_args=("h_bar", "z"))
def bank_tape_forward_op(h_bar: torch.Tensor, alpha: torch.Tensor, affine: torch.Tensor, fc1_weight: torch.Tensor,
                         fc1_bias: torch.Tensor, offsets: torch.Tensor, positions: torch.Tensor,
                         x_hat: torch.Tensor, z: torch.Tensor) -> None:
    """GEMM1 of every taped pair and h_bar from it (see bank_tape_forward): h_bar and z updated in place."""
    bank_tape_forward(h_bar, alpha, affine, fc1_weight, fc1_bias, offsets, positions, x_hat, z)


@bank_tape_forward_op.register_fake
def _bank_tape_forward_fake(h_bar, alpha, affine, fc1_weight, fc1_bias, offsets, positions, x_hat, z):
    return None


@custom_op("geoalign::triton_bank_backward", mutates_args=())
def bank_backward_op(d_h_bar: torch.Tensor, alpha: torch.Tensor, affine: torch.Tensor, fc1_weight: torch.Tensor,
                     tokens: torch.Tensor, slots: torch.Tensor, offsets: torch.Tensor, x_hat: torch.Tensor,
                     z: torch.Tensor, need_ln: bool,
                     need_w1: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_alpha, d_ln_weights [M, D'], d_ln_biases [M, D'], d_fc1_weight, d_fc1_bias) of the whole bank."""
    return bank_backward(d_h_bar, alpha, affine, fc1_weight, tokens, slots, offsets, x_hat, z, need_ln, need_w1)


@bank_backward_op.register_fake
def _bank_backward_fake(d_h_bar, alpha, affine, fc1_weight, tokens, slots, offsets, x_hat, z, need_ln, need_w1):
    return (torch.empty_like(alpha), torch.empty_like(affine[0]), torch.empty_like(affine[1]),
            torch.empty_like(fc1_weight), fc1_weight.new_empty((fc1_weight.shape[0],)))
