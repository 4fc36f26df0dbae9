"""Routed feature bank: every VGGT layer's forward as it streams in, and one grouped backward for all of them
(docs/architecture.md, "Backends").

The L*K routed (token, slot) pairs are sorted by bank layer once per forward (``tokens``, ``slots``, ``offsets``,
``positions`` from :func:`bank_rows`, vLLM fused_moe's sorted-pairs layout): layer j owns pairs
offsets[j]:offsets[j+1], and pair (t, s) sits at positions[t*K + s]. The offsets stay on the device; every grid is
sized without them (a layer gets at most min(L, L*K) pairs: a token's K slots go to distinct layers) and the work
past a layer's last pair is skipped on the device. So nothing here makes the host wait for the device, and a
forward can be captured in a CUDA graph.

    _bank_rows_kernel          the counting sort of the L*K routes by layer (one program per layer, stable)

  forward with a gradient (training): per layer as it streams in, normalise only; GEMM1 once for every layer
    _gather_normalize_kernel   layer j's n_j*G gathered patch rows, each read once (held in registers; rows wider
                               than _MAX_ROW_BLOCK are streamed in chunks): exact two-pass mean / rstd (fp32), x_hat
                               in the parameter dtype written at the pairs' tape rows, and GEMM1's operand
                               x = gamma_j x_hat + beta_j (parameter dtype) at the same rows of a forward-only
                               buffer; copies LN_j's affine into the stacked affine [2, M, D'] that the backward
                               reads. A grid-stride loop over a bounded grid (about one wave on a GPU)
    _bank_gemm1_kernel         (after the last layer) one plain GEMM over every pair: z [P, H] = x W1^T + b1 (the
                               tape), row tiles in grouped order, A loaded straight into tl.dot (pipelined), K / N
                               masks only where G*D' / H are not whole tiles (EVEN_K, EVEN_N)
    _bank_combine_kernel       h_bar[t] += sum_s alpha[t, s] GELU(z[positions[t*K + s]]): the K slots of a token
                               summed in registers (no atomics, deterministic)
  forward without a gradient (inference): per layer, x into a scratch buffer of min(L, L*K) rows, then
    _bank_gemm1_kernel         (one layer) the same GEMM, its epilogue + b1, exact GELU, * alpha read-add-written
                               into h_bar in four column quarters (a layer's pairs have distinct tokens); memory
                               stays at one layer's pairs
  backward, all layers at once (VGGT is frozen: no gradient into a layer, so dx = dz W1 is never formed)
    _bank_dz_kernel            dz = alpha * dh_bar[t] * GELU'(z) for all L*K pairs (2-D grid: pairs x H tiles) and
                               per-tile partial sums of d_alpha[t, s] = <dh_bar[t], GELU(z)>
    _bank_weight_grad_kernel   per [H, G*D'] tile, a loop over the layers: M_j = dz_j^T x_hat_j (fp32), db1_j,
                               then dW1 += gamma_j M_j + beta_j db1_j held in fp32 registers across every layer
                               (one rounding to the parameter dtype), and the tile's partial rows of
                               dgamma_j = sum_h W1 M_j and dbeta_j = sum_h W1 db1_j (no atomics; in column quarters)
    _bank_backward_finish_kernel  the partial sums reduced (d_alpha over H tiles; dgamma, dbeta over H tiles and
                               the G groups) and db1 rounded, in one launch

GEMM1 needs no tile-to-layer table (vLLM's expert_ids): its operand x already carries each layer's LayerNorm
affine, so no row tile has to know its layer. Training's GEMM1 is one dense GEMM over the P = L*K pairs in pair
order (exactly cdiv(P, BLOCK_SIZE_M) row tiles, none idle, no walk or search over the layers), and inference's
runs on one layer, whose rows are 0..n_j-1 of the scratch (n_j read from the offsets on the device). The cost is
the forward-only x buffer in training ([P, G*D'] in the parameter dtype, freed once GEMM1 has run: the torch
backend's operand buffer likewise); in exchange GEMM1 is a plain pipelined GEMM (its A tile never passes through
registers). layer_pos is not specialised by the JIT (do_not_specialize), so layers 0 and 1 do not compile apart.

TMA (configs.tma_enabled: sm_90 and newer, tensor-core dtypes, GEOALIGN_TMA): GEMM1 reads x and W1, and the weight
gradient dz and x_hat, through host tensor descriptors (boxes past a tensor's edge read zeros); the weight
gradient's last partial step of each layer stays on masked pointer loads (a box would read the next layer's pairs).
Both paths are parity-tested under the interpreter (tests/test_triton_fusion.py).

The tape (only when a gradient is needed): x_hat [L*K, G*D'] and z [L*K, H] in the parameter dtype, rows in pair
order, and the stacked LayerNorm affine [2, M, D']. Row indices are int64 before they meet a stride (L*K*G*D' and
N*D' can pass 2^31).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import guard
from .checks import FLOAT_DTYPES, INDEX_DTYPES, check_int, check_tensor
from .configs import get_config, launch_kwargs, tma_enabled, tune
from .gemm import tma_operand
from .guard import guarded
from .library import custom_op
from .runtime import acc_dtype
from .utils import alloc, dot_dtype, dot_precision, gelu, gelu_grad, rows_contiguous, tl_dtype


#: the widest row (columns, a power of 2) the normalise pass holds in registers; wider rows are streamed in chunks
_MAX_ROW_BLOCK = 4096
#: row elements per normalise program in registers: rows per step = _ROW_ELEMENTS // next_power_of_2(D'). 4096 (two
#: rows of D' = 2048): 48-64 registers and no spill, sm_90 bf16, triton 3.6 and 3.9; 8192 spilled 4 B under 3.6
_ROW_ELEMENTS = 4096
#: grid-stride programs of the normalise pass off a GPU (the interpreter runs programs one after another)
_CPU_ROW_PROGRAMS = 2


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


@triton.jit(do_not_specialize=["layer_pos"])
def _gather_normalize_kernel(
        layer_ptr, stride_layer_row, N,  # bank layer j [N, D'] (unit column stride), its row stride and row count
        gather_ptr, stride_gather_l, stride_gather_g, L,  # gather_index [L, G] and its strides; L tokens
        tokens_ptr, offsets_ptr, layer_pos,  # [P] token id of each pair; [M+1] layer offsets; this layer's position
        x_hat_ptr,  # output when TAPE: the tape's normalised rows x_hat [P, G*D'] (parameter dtype), row-major
        x_ptr,  # output: GEMM1's operand x = gamma_j x_hat + beta_j (parameter dtype), row-major: [P, G*D'] at the
        #         pairs' tape rows when TAPE, else [min(L, P), G*D'] at rows 0..n_j-1 (a scratch buffer)
        ln_weight_ptr, ln_bias_ptr,  # LN_j's affine [D']
        affine_ptr, stride_affine_kind, stride_affine_layer,  # output when TAPE: affine[0, j] = gamma_j, [1, j] = beta_j
        G, D_geo, eps,  # patch rows per token, row width D', LayerNorm eps
        TAPE: tl.constexpr,  # training: x_hat and x at the pairs' tape rows, the affine stacked; else x only, scratch
        ROW_IN_REGISTERS: tl.constexpr,  # BLOCK_SIZE_N >= D': a row is read once and held in registers
        PARAM_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr,
        BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr):  # gathered rows per step, columns (or chunk)
    """Gathered row r = p*G + g of layer j's pair p: x_hat = (v - mean) * rstd with v = R_j[gather_index[token, g]]
    rounded to the parameter dtype (as torch's layer_norm(raw.to(param dtype))), exact two-pass statistics in
    ACC_DTYPE; x_hat rounded to the parameter dtype, then x = gamma_j x_hat + beta_j computed in ACC_DTYPE and
    rounded to the parameter dtype (what GEMM1 multiplies). A token id outside [0, L) or a gather row outside
    [0, N) reads nothing and gives a NaN row (visible).

    Grid-stride: the launch has a bounded number of programs (about one wave on a GPU), sized without knowing n_j
    (on the device); each program takes row blocks pid, pid + programs, ... of layer j's n_j*G rows, so an empty or
    small layer costs a few idle programs instead of a grid sized for min(L, L*K) pairs. ROW_IN_REGISTERS (D' up to
    the launcher's _MAX_ROW_BLOCK): each row is loaded once, centred and normalised from registers; else (very wide
    rows) the row is streamed in BLOCK_SIZE_N chunks three times (sum, centred sum of squares, write)."""
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    offs_d = tl.arange(0, BLOCK_SIZE_N).to(tl.int64)
    if TAPE:
        if pid == 0:  # the stacked affine, so that the backward reads every layer's from one tensor
            for d0 in range(0, D_geo, BLOCK_SIZE_N):
                mask = offs_d < D_geo - d0
                out = affine_ptr + layer_pos * stride_affine_layer + d0 + offs_d
                tl.store(out, tl.load(ln_weight_ptr + d0 + offs_d, mask=mask), mask=mask)
                tl.store(out + stride_affine_kind, tl.load(ln_bias_ptr + d0 + offs_d, mask=mask), mask=mask)
    first = tl.load(offsets_ptr + layer_pos).to(tl.int64)
    n_rows = (tl.load(offsets_ptr + layer_pos + 1).to(tl.int64) - first) * G
    if TAPE:
        out_first = first * G  # the layer's first tape row (rows r = p*G + g of [P*G, D'])
    else:
        out_first = first * 0
    if ROW_IN_REGISTERS:
        mask_d = offs_d < D_geo
        ln_w = tl.load(ln_weight_ptr + offs_d, mask=mask_d, other=0.0).to(ACC_DTYPE)
        ln_b = tl.load(ln_bias_ptr + offs_d, mask=mask_d, other=0.0).to(ACC_DTYPE)
    for row0 in range(pid.to(tl.int64) * BLOCK_SIZE_M, n_rows, num_programs.to(tl.int64) * BLOCK_SIZE_M):
        offs_r = row0 + tl.arange(0, BLOCK_SIZE_M).to(tl.int64)
        mask_r = offs_r < n_rows
        pair = offs_r // G
        group = offs_r % G
        token = tl.load(tokens_ptr + first + pair, mask=mask_r, other=0).to(tl.int64)
        valid = mask_r & (token >= 0) & (token < L)
        src = tl.load(gather_ptr + token * stride_gather_l + group * stride_gather_g, mask=valid,
                      other=0).to(tl.int64)
        valid = valid & (src >= 0) & (src < N)
        row_ptrs = layer_ptr + src[:, None] * stride_layer_row + offs_d[None, :]
        out_offs = (out_first + offs_r)[:, None] * D_geo + offs_d[None, :]
        if ROW_IN_REGISTERS:
            v = tl.load(row_ptrs, mask=valid[:, None] & mask_d[None, :], other=0.0).to(PARAM_DTYPE).to(ACC_DTYPE)
            mean = tl.sum(v, axis=1) / D_geo
            centred = tl.where(mask_d[None, :], v - mean[:, None], 0.0)
            rstd = tl.where(valid, 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / D_geo + eps), float("nan"))
            x_hat = (centred * rstd[:, None]).to(PARAM_DTYPE)
            out_mask = mask_r[:, None] & mask_d[None, :]
            if TAPE:
                tl.store(x_hat_ptr + out_offs, x_hat, mask=out_mask)
            x = x_hat.to(ACC_DTYPE) * ln_w[None, :] + ln_b[None, :]
            tl.store(x_ptr + out_offs, x.to(PARAM_DTYPE), mask=out_mask)
        else:
            total = tl.zeros((BLOCK_SIZE_M,), dtype=ACC_DTYPE)
            for d0 in range(0, D_geo, BLOCK_SIZE_N):
                mask = valid[:, None] & (offs_d[None, :] < D_geo - d0)
                total += tl.sum(tl.load(row_ptrs + d0, mask=mask, other=0.0).to(PARAM_DTYPE).to(ACC_DTYPE), axis=1)
            mean = total / D_geo
            sq = tl.zeros((BLOCK_SIZE_M,), dtype=ACC_DTYPE)
            for d0 in range(0, D_geo, BLOCK_SIZE_N):  # second pass over the (cached) row: centred sum of squares
                mask = valid[:, None] & (offs_d[None, :] < D_geo - d0)
                v = tl.load(row_ptrs + d0, mask=mask, other=0.0).to(PARAM_DTYPE).to(ACC_DTYPE)
                centred = tl.where(mask, v - mean[:, None], 0.0)
                sq += tl.sum(centred * centred, axis=1)
            rstd = tl.where(valid, 1.0 / tl.sqrt(sq / D_geo + eps), float("nan"))
            for d0 in range(0, D_geo, BLOCK_SIZE_N):  # third pass: write x_hat and x
                mask_c = offs_d < D_geo - d0
                v = tl.load(row_ptrs + d0, mask=mask_c[None, :] & valid[:, None], other=0.0)
                x_hat = ((v.to(PARAM_DTYPE).to(ACC_DTYPE) - mean[:, None]) * rstd[:, None]).to(PARAM_DTYPE)
                out_mask = mask_r[:, None] & mask_c[None, :]
                if TAPE:
                    tl.store(x_hat_ptr + out_offs + d0, x_hat, mask=out_mask)
                ln_w_c = tl.load(ln_weight_ptr + d0 + offs_d, mask=mask_c, other=0.0).to(ACC_DTYPE)
                ln_b_c = tl.load(ln_bias_ptr + d0 + offs_d, mask=mask_c, other=0.0).to(ACC_DTYPE)
                x = x_hat.to(ACC_DTYPE) * ln_w_c[None, :] + ln_b_c[None, :]
                tl.store(x_ptr + out_offs + d0, x.to(PARAM_DTYPE), mask=out_mask)


@triton.jit(do_not_specialize=["layer_pos"])
def _bank_gemm1_kernel(
        x_ptr,  # GEMM1's operand x = gamma_j x_hat + beta_j [rows, G*D'] (parameter dtype), row-major
        w1_ptr, stride_w1_h, stride_w1_k, b1_ptr,  # GEMM1 weight [H, G*D'] and bias [H]
        tokens_ptr, slots_ptr, offsets_ptr, layer_pos,  # (not TAPE) [P] pairs' token ids, slots; [M+1]; the layer
        alpha_ptr, stride_alpha_l,  # (not TAPE) alpha [L, K] (unit column stride)
        h_bar_ptr, stride_h_bar_l,  # (not TAPE) h_bar [L, H] (accumulation dtype), read-add-written
        z_ptr,  # output when TAPE: z [P, H] pre-activations, rows in pair order
        n_pairs, H, width, L, K,  # rows when TAPE (P); hidden width, G*D', tokens, slots per token
        num_row_tiles,  # row tiles of the grid
        TAPE: tl.constexpr,
        EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,  # G*D' % BLOCK_SIZE_K == 0, H % BLOCK_SIZE_N == 0: no K / N mask
        USE_TMA: tl.constexpr,  # x_ptr / w1_ptr are TMA descriptors of x [rows, G*D'] and W1 [H, G*D']
        PARAM_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,  # pairs, H, G*D'
        GROUP_SIZE_M: tl.constexpr):  # row tiles per group of the launch order
    """A plain dense GEMM, x [rows, G*D'] @ W1^T: the operand already carries each layer's LayerNorm affine
    (_gather_normalize_kernel), so the A tile goes from memory straight into tl.dot (pipelined, never through
    registers) and no tile needs to know its layer. 1-D grid in grouped order (Triton tutorial 03): GROUP_SIZE_M
    row tiles walk every H tile together, so their band of x (in training L*K x G*D' = 16128 x 8192 bf16, about
    250 MiB at paper scale) is read from DRAM about once instead of once per H tile. Rows are masked; the K and N
    masks only where the shape needs them (EVEN_K / EVEN_N).
    TAPE: rows 0..P-1 of x (pair order), exactly cdiv(P, BLOCK_SIZE_M) row tiles; epilogue + b1, stored as z (h_bar
    comes from z: _bank_combine_kernel).
    Else (one layer, rows 0..n_j-1 of a scratch buffer; the grid is sized for min(L, P) rows and the tiles past n_j
    exit): + b1, exact GELU, * alpha, read-add-write into h_bar (a layer's pairs have distinct tokens).
    USE_TMA (sm_90): both operands by TMA boxes (past the tensors' edges they read zeros; a scratch row past the
    layer's pairs is stale, and its row of the result is never stored), no masks in the K loop."""
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(H, BLOCK_SIZE_N)
    num_pid_in_group = GROUP_SIZE_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_SIZE_M
    group_size_m = min(num_row_tiles - first_pid_m, GROUP_SIZE_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m
    if TAPE:
        first = tl.zeros([], tl.int64)
        n = tl.zeros([], tl.int64) + n_pairs
    else:
        first = tl.load(offsets_ptr + layer_pos).to(tl.int64)
        n = tl.load(offsets_ptr + layer_pos + 1).to(tl.int64) - first
    offs_m = pid_m.to(tl.int64) * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M).to(tl.int64)  # rows of x
    if pid_m.to(tl.int64) * BLOCK_SIZE_M >= n:  # (not TAPE: a row tile past this layer's pairs)
        return
    mask_m = offs_m < n
    offs_n = (pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)).to(tl.int64)  # hidden columns
    mask_n = offs_n < H
    acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=ACC_DTYPE)
    if USE_TMA:
        off_m = pid_m * BLOCK_SIZE_M  # int32 box coordinates
        off_n = pid_n * BLOCK_SIZE_N
        off_k = pid_n * 0
        for k0 in range(0, width, BLOCK_SIZE_K):
            a = x_ptr.load([off_m, off_k])
            w = w1_ptr.load([off_n, off_k]).T
            acc = tl.dot(a.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            off_k += BLOCK_SIZE_K
    else:
        offs_k = tl.arange(0, BLOCK_SIZE_K).to(tl.int64)
        a_ptrs = x_ptr + offs_m[:, None] * width + offs_k[None, :]
        w_ptrs = w1_ptr + offs_n[None, :] * stride_w1_h + offs_k[:, None] * stride_w1_k
        for k0 in range(0, width, BLOCK_SIZE_K):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
                if EVEN_N:
                    w = tl.load(w_ptrs)
                else:
                    w = tl.load(w_ptrs, mask=mask_n[None, :], other=0.0)
            else:
                mask_k = offs_k < width - k0
                a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                if EVEN_N:
                    w = tl.load(w_ptrs, mask=mask_k[:, None], other=0.0)
                else:
                    w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot(a.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            a_ptrs += BLOCK_SIZE_K
            w_ptrs += BLOCK_SIZE_K * stride_w1_k
    if EVEN_N:
        b1 = tl.load(b1_ptr + offs_n)
    else:
        b1 = tl.load(b1_ptr + offs_n, mask=mask_n, other=0.0)
    z = (acc + b1.to(ACC_DTYPE)[None, :]).to(PARAM_DTYPE)
    if TAPE:
        tl.store(z_ptr + offs_m[:, None] * H + offs_n[None, :], z, mask=mask_m[:, None] & mask_n[None, :])
    else:
        token = tl.load(tokens_ptr + first + offs_m, mask=mask_m, other=0).to(tl.int64)
        slot = tl.load(slots_ptr + first + offs_m, mask=mask_m, other=0).to(tl.int64)
        valid = mask_m & (token >= 0) & (token < L) & (slot >= 0) & (slot < K)  # no read or write through bad ids
        # alpha as a [BLOCK_SIZE_M, 1] column: loaded as a 1-D vector, it breaks triton 3.6's fp64 build (the
        # RemoveLayoutConversions pass leaves the load's mask and pointer in different layouts)
        alpha = tl.load(alpha_ptr + (token * stride_alpha_l + slot)[:, None], mask=valid[:, None],
                        other=0.0).to(ACC_DTYPE)
        # the [BLOCK_SIZE_M, BLOCK_SIZE_N] tile in four column quarters (Triton tutorial 09's epilogue subtiling):
        # h_bar's fp32 read-add-write of a whole tile would hold its gathered rows, the GELU and the tile in
        # registers at once (255 registers at 128 x 128, bf16, sm_90; 120 in quarters)
        z_lo, z_hi = _split_columns(z, BLOCK_SIZE_M, BLOCK_SIZE_N)
        z_0, z_1 = _split_columns(z_lo, BLOCK_SIZE_M, BLOCK_SIZE_N // 2)
        z_2, z_3 = _split_columns(z_hi, BLOCK_SIZE_M, BLOCK_SIZE_N // 2)
        offs_q = (pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N // 4)).to(tl.int64)
        row_ptrs = h_bar_ptr + token * stride_h_bar_l
        _add_alpha_gelu(row_ptrs, valid, alpha, z_0, offs_q, H, ACC_DTYPE)
        _add_alpha_gelu(row_ptrs, valid, alpha, z_1, offs_q + BLOCK_SIZE_N // 4, H, ACC_DTYPE)
        _add_alpha_gelu(row_ptrs, valid, alpha, z_2, offs_q + BLOCK_SIZE_N // 2, H, ACC_DTYPE)
        _add_alpha_gelu(row_ptrs, valid, alpha, z_3, offs_q + 3 * (BLOCK_SIZE_N // 4), H, ACC_DTYPE)


@triton.jit
def _split_columns(t, BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr):
    """t [BLOCK_SIZE_M, BLOCK_SIZE_N] -> (t[:, :BLOCK_SIZE_N // 2], t[:, BLOCK_SIZE_N // 2:])."""
    return tl.split(tl.permute(tl.reshape(t, (BLOCK_SIZE_M, 2, BLOCK_SIZE_N // 2)), (0, 2, 1)))


@triton.jit
def _add_alpha_gelu(row_ptrs, valid, alpha, z, offs_n, H, ACC_DTYPE: tl.constexpr):
    """h_bar[row, offs_n] += alpha * GELU(z) for the rows at row_ptrs [rows] (fp32/fp64) where valid [rows]; alpha
    [rows, 1], z [rows, columns]."""
    h_bar_ptrs = row_ptrs[:, None] + offs_n[None, :]
    mask = valid[:, None] & (offs_n < H)[None, :]
    h_old = tl.load(h_bar_ptrs, mask=mask, other=0.0)
    tl.store(h_bar_ptrs, h_old + alpha * gelu(z.to(ACC_DTYPE)), mask=mask)


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
        dz_desc, x_hat_desc,  # USE_TMA: TMA descriptors of dz and x_hat (else unused: any tensor)
        offsets_ptr, num_layers,  # [M+1] layer offsets into the pairs; M
        ln_weight_ptr, ln_bias_ptr, stride_ln_layer,  # every layer's LN affine [M, D'] (unit column stride)
        w1_ptr, stride_w1_h, stride_w1_k,  # GEMM1 weight [H, G*D']
        dw1_ptr,  # output: dW1 [H, G*D'] (parameter dtype), when STORE_DW1
        db1_ptr,  # output: db1 [H] (accumulation dtype), written by the programs of the first column tile
        dgamma_partial_ptr, dbeta_partial_ptr,  # outputs: [H tiles, M, G*D'] partial sums (accumulation dtype)
        H, D_geo, G,  # hidden width, D', patch rows per token
        STORE_DW1: tl.constexpr, USE_TMA: tl.constexpr,
        PARAM_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr):  # H, G*D', pairs
    """One [H, G*D'] tile of dW1 for every layer: M_j = dz_j^T x_hat_j (reduction over layer j's pairs) and
    db1_j = sum of dz_j, then dW1 += gamma_j M_j + beta_j db1_j and this tile's partial rows
    dgamma_j[c] = sum_h W1[h, c] M_j[h, c], dbeta_j[c] = sum_h W1[h, c] db1_j[h] (in four column quarters).
    Two fp32 accumulators (dW1 across the layers, M_j per layer): 0 spills on sm_90 at a 128 x 64 tile (8 warps),
    not at 128 x 128 (aot_check).
    USE_TMA (sm_90): a layer's whole BLOCK_SIZE_K steps of pairs come by TMA boxes of dz and x_hat (no masks), its
    last partial step by masked loads (a box would read the next layer's pairs)."""
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
        p_start = lo
        if USE_TMA:
            whole = ((hi - lo) // BLOCK_SIZE_K) * BLOCK_SIZE_K
            off_p = lo.to(tl.int32)  # int32 box coordinates
            for p0 in range(lo, lo + whole, BLOCK_SIZE_K):
                dz = dz_desc.load([off_p, pid_m * BLOCK_SIZE_M]).T  # dz_j^T box [BLOCK_H, BLOCK_P]
                x_hat = x_hat_desc.load([off_p, pid_n * BLOCK_SIZE_N])
                acc = tl.dot(dz.to(DOT_DTYPE), x_hat.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION,
                             out_dtype=ACC_DTYPE)
                db1 += tl.sum(dz.to(ACC_DTYPE), axis=1)
                off_p += BLOCK_SIZE_K
            p_start = lo + whole
        dz_ptrs = dz_ptr + (p_start + offs_p)[None, :] * H + offs_h[:, None]  # dz_j^T tile [BLOCK_H, BLOCK_P]
        x_ptrs = x_hat_ptr + (p_start + offs_p)[:, None] * width + offs_c[None, :]  # x_hat_j tile [BLOCK_P, BLOCK_C]
        for p0 in range(p_start, hi, BLOCK_SIZE_K):  # (with TMA: the last partial step only)
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
        # this tile's partial rows of dgamma_j / dbeta_j, in four column quarters (the whole tile's W1 * M_j would
        # hold a third [BLOCK_SIZE_M, BLOCK_SIZE_N] fp32 tile beside dW1 and M_j, and spill)
        acc_lo, acc_hi = _split_columns(acc, BLOCK_SIZE_M, BLOCK_SIZE_N)
        acc_0, acc_1 = _split_columns(acc_lo, BLOCK_SIZE_M, BLOCK_SIZE_N // 2)
        acc_2, acc_3 = _split_columns(acc_hi, BLOCK_SIZE_M, BLOCK_SIZE_N // 2)
        quarter: tl.constexpr = BLOCK_SIZE_N // 4
        offs_q = (pid_n * BLOCK_SIZE_N + tl.arange(0, quarter)).to(tl.int64)
        w1_ptrs = w1_ptr + offs_h[:, None] * stride_w1_h + offs_q[None, :] * stride_w1_k
        offs_out = (pid_m.to(tl.int64) * num_layers + j) * width + offs_q
        _ln_partials(w1_ptrs, offs_out, offs_q, acc_0, db1, mask_h, dgamma_partial_ptr, dbeta_partial_ptr, width,
                     ACC_DTYPE)
        _ln_partials(w1_ptrs + quarter * stride_w1_k, offs_out + quarter, offs_q + quarter, acc_1, db1, mask_h,
                     dgamma_partial_ptr, dbeta_partial_ptr, width, ACC_DTYPE)
        _ln_partials(w1_ptrs + 2 * quarter * stride_w1_k, offs_out + 2 * quarter, offs_q + 2 * quarter, acc_2, db1,
                     mask_h, dgamma_partial_ptr, dbeta_partial_ptr, width, ACC_DTYPE)
        _ln_partials(w1_ptrs + 3 * quarter * stride_w1_k, offs_out + 3 * quarter, offs_q + 3 * quarter, acc_3, db1,
                     mask_h, dgamma_partial_ptr, dbeta_partial_ptr, width, ACC_DTYPE)
    if STORE_DW1:
        tl.store(dw1_ptr + offs_h[:, None] * width + offs_c[None, :], dw1.to(PARAM_DTYPE), mask=mask)
    if pid_n == 0:
        tl.store(db1_ptr + offs_h, db1_all, mask=mask_h)


@triton.jit
def _ln_partials(w1_ptrs, offs_out, offs_c, acc, db1, mask_h, dgamma_partial_ptr, dbeta_partial_ptr, width,
                 ACC_DTYPE: tl.constexpr):
    """Columns offs_c of one H tile of the weight gradient: dgamma partial = sum_h W1[h, c] M_j[h, c] and dbeta
    partial = sum_h W1[h, c] db1_j[h], stored at offs_out of the partials. w1_ptrs [rows, columns] address W1 at
    those columns, acc [rows, columns] holds M_j there, db1 [rows], mask_h [rows]: the tile's H rows."""
    mask_c = offs_c < width
    w1 = tl.load(w1_ptrs, mask=mask_h[:, None] & mask_c[None, :], other=0.0).to(ACC_DTYPE)
    tl.store(dgamma_partial_ptr + offs_out, tl.sum(w1 * acc, axis=0), mask=mask_c)
    tl.store(dbeta_partial_ptr + offs_out, tl.sum(w1 * db1[:, None], axis=0), mask=mask_c)


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
def _dtypes(dtype: torch.dtype, device=None) -> dict:
    """The dtype constexprs of the bank kernels for parameters of ``dtype`` (launched on ``device``: see
    utils.dot_precision)."""
    return dict(PARAM_DTYPE=tl_dtype(dtype), DOT_DTYPE=dot_dtype(dtype), ACC_DTYPE=tl_dtype(acc_dtype(dtype)),
                DOT_PRECISION=dot_precision(dtype, device))


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


def _normalize_blocks(Dg: int, rcfg: dict) -> dict:
    """The normalise pass's ROW_IN_REGISTERS, BLOCK_SIZE_M, BLOCK_SIZE_N for rows of width ``Dg``: whole rows in
    registers (next_power_of_2(D') columns, at most _ROW_ELEMENTS elements per program) up to _MAX_ROW_BLOCK
    columns, else the rows config's chunked blocks."""
    block_d = triton.next_power_of_2(Dg)
    if block_d <= _MAX_ROW_BLOCK:
        return dict(ROW_IN_REGISTERS=True, BLOCK_SIZE_M=max(1, min(rcfg["BLOCK_SIZE_M"], _ROW_ELEMENTS // block_d)),
                    BLOCK_SIZE_N=block_d)
    return dict(ROW_IN_REGISTERS=False, BLOCK_SIZE_M=rcfg["BLOCK_SIZE_M"], BLOCK_SIZE_N=rcfg["BLOCK_SIZE_N"])


@functools.lru_cache(maxsize=None)
def _cuda_programs(index: int, num_warps: int) -> int:
    """Programs of ``num_warps`` warps that fill every SM of CUDA device ``index`` once (one wave)."""
    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count * max(1, props.max_threads_per_multi_processor // (32 * num_warps))


def _row_programs(dev: torch.device, num_warps: int, blocks: int) -> int:
    """Programs of a grid-stride launch over at most ``blocks`` row blocks: one wave on a GPU (_CPU_ROW_PROGRAMS
    elsewhere, so the interpreter runs the stride loop too), never more than there can be blocks, at least one."""
    cap = _cuda_programs(dev.index or 0, num_warps) if dev.type == "cuda" else _CPU_ROW_PROGRAMS
    return max(1, min(blocks, cap))


def bank_layer_forward(h_bar: torch.Tensor, alpha: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                       fc1_weight: torch.Tensor, fc1_bias: torch.Tensor, layer: torch.Tensor, tokens: torch.Tensor,
                       slots: torch.Tensor, offsets: torch.Tensor, layer_pos: int, gather_index: torch.Tensor,
                       eps: float, x_hat: torch.Tensor, x: torch.Tensor, affine: torch.Tensor, tape: bool) -> None:
    """Bank layer ``layer_pos`` as it streams in. alpha [L, K]; ln_* [D'] (that layer's); fc1_weight [H, G*D'],
    fc1_bias [H]; layer [N, D'] (any float dtype); tokens/slots [P], offsets [M+1]; gather_index [L, G].

    tape=True (a gradient will be needed): normalise the layer's pairs into the tape's x_hat [P, G*D'] at their
    tape rows, write GEMM1's operand x = gamma x_hat + beta [P, G*D'] at the same rows (a forward-only buffer,
    read by bank_tape_forward) and copy (ln_weight, ln_bias) into affine[:, layer_pos] ([2, M, D']); h_bar is
    left alone (bank_tape_forward runs GEMM1 for every layer at once). tape=False: x into the scratch
    [min(L, P), G*D'] and the layer's pairs added into h_bar [L, H] (fp32/fp64, in place); x_hat and affine are
    not used (pass an empty [0, G*D'] and [2, 0, D']). x_hat, x and affine are in the parameter dtype."""
    op = "bank_layer_forward"
    dev = h_bar.device
    check_tensor(op, "gather_index", gather_index, shape=(None, None), dtype=INDEX_DTYPES, device=dev)
    L, G = gather_index.shape
    check_tensor(op, "layer", layer, shape=(None, None), dtype=FLOAT_DTYPES, device=dev)
    N, Dg = layer.shape
    check_tensor(op, "fc1_weight", fc1_weight, shape=(None, G * Dg), dtype=FLOAT_DTYPES, device=dev)
    H, dtype = fc1_weight.shape[0], fc1_weight.dtype
    width = G * Dg
    check_tensor(op, "ln_weight", ln_weight, shape=(Dg,), dtype=dtype, device=dev)
    check_tensor(op, "ln_bias", ln_bias, shape=(Dg,), dtype=dtype, device=dev)
    check_tensor(op, "fc1_bias", fc1_bias, shape=(H,), dtype=dtype, device=dev)
    check_tensor(op, "h_bar", h_bar, shape=(L, H), dtype=acc_dtype(dtype), unit_stride=True)
    check_tensor(op, "alpha", alpha, shape=(L, None), dtype=FLOAT_DTYPES, device=dev)
    K = alpha.shape[1]
    P, M = _check_pairs(op, tokens, slots, offsets, L, K, dev)
    check_int(op, "layer_pos", layer_pos, 0, M - 1)
    max_pairs = min(L, P)  # a layer's pairs have distinct tokens
    check_tensor(op, "x_hat", x_hat, shape=(P if tape else 0, width), dtype=dtype, device=dev)
    check_tensor(op, "x", x, shape=(P if tape else max_pairs, width), dtype=dtype, device=dev)
    check_tensor(op, "affine", affine, shape=(2, M if tape else 0, Dg), dtype=dtype, device=dev)
    for name, t in (("x_hat", x_hat), ("x", x), ("affine", affine)):
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous, got strides {list(t.stride())}")
    guard.check_index_range(op, "gather_index", gather_index, N, "rows of the layer")
    layer = rows_contiguous(layer)  # one explicit copy if the rows are strided
    alpha = rows_contiguous(alpha)
    tokens, slots = tokens.contiguous(), slots.contiguous()
    ln_weight, ln_bias, fc1_bias = ln_weight.contiguous(), ln_bias.contiguous(), fc1_bias.contiguous()
    types = _dtypes(dtype, dev)
    rcfg = get_config("rows", max_pairs * G, dev)
    blocks = _normalize_blocks(Dg, rcfg)
    # at least one program: it also stacks the layer's affine, which the backward reads even with no pairs
    programs = _row_programs(dev, rcfg["num_warps"], triton.cdiv(max_pairs * G, blocks["BLOCK_SIZE_M"]))
    with guarded("bank_layer_forward/normalize", x_hat=x_hat, x=x, affine=affine) as out:
        _gather_normalize_kernel[(programs,)](
            layer, layer.stride(0), N, gather_index, gather_index.stride(0), gather_index.stride(1), L, tokens,
            offsets, layer_pos, out.x_hat if tape else out.x, out.x, ln_weight, ln_bias, out.affine,
            affine.stride(0), affine.stride(1), G, Dg, eps, TAPE=tape, PARAM_DTYPE=types["PARAM_DTYPE"],
            ACC_DTYPE=types["ACC_DTYPE"], **blocks, num_warps=rcfg["num_warps"],
        )
    if tape:
        return

    def gemm1(cfg):
        tiles = triton.cdiv(max_pairs, cfg["BLOCK_SIZE_M"])  # the largest possible layer; tiles past n_j exit
        with guarded("bank_layer_forward/gemm1", h_bar=h_bar) as out:
            x_arg, w1_arg, use_tma = _tma_operands(x, (cfg["BLOCK_SIZE_M"], cfg["BLOCK_SIZE_K"]), fc1_weight,
                                                   (cfg["BLOCK_SIZE_N"], cfg["BLOCK_SIZE_K"]), dev)
            _bank_gemm1_kernel[(tiles * triton.cdiv(H, cfg["BLOCK_SIZE_N"]),)](
                x_arg, w1_arg, fc1_weight.stride(0), fc1_weight.stride(1), fc1_bias, tokens, slots, offsets,
                layer_pos, alpha, alpha.stride(0), out.h_bar, h_bar.stride(0), x, max_pairs, H, width, L, K, tiles,
                TAPE=False, USE_TMA=use_tma, **_even(cfg, width, H), **types, **launch_kwargs(cfg, group=True),
            )

    # h_bar is read-add-written: put back after autotune's timing runs
    gemm1(tune("gemm1_infer", max_pairs, dev, dtype, gemm1, restore=(h_bar,), n=H, k=G * Dg))


def _tma_operands(a: torch.Tensor, a_box: tuple, b: torch.Tensor, b_box: tuple, dev: torch.device):
    """(a argument, b argument, USE_TMA) of a bank GEMM launch: TMA descriptors of the row-major a and b with boxes
    a_box / b_box where TMA is on (configs.tma_enabled) and both rows are contiguous and 16-byte aligned; else the
    tensors themselves (pointer loads). GEMM1: x [rows, G*D'] (BLOCK_SIZE_M x BLOCK_SIZE_K) and W1 [H, G*D']
    (BLOCK_SIZE_N x BLOCK_SIZE_K); the weight gradient: dz [P, H] (BLOCK_SIZE_K x BLOCK_SIZE_M) and x_hat
    [P, G*D'] (BLOCK_SIZE_K x BLOCK_SIZE_N)."""
    if tma_enabled(dev, b.dtype):
        a_mode, a_desc = tma_operand(a, *a_box)
        b_mode, b_desc = tma_operand(b, *b_box)
        if a_mode == 1 and b_mode == 1:
            return a_desc, b_desc, True
    return a, b, False


def _even(cfg: dict, width: int, H: int) -> dict:
    """GEMM1's EVEN_K / EVEN_N: the K (G*D') and N (H) extents are whole tiles, so those loads need no mask."""
    return dict(EVEN_K=width % cfg["BLOCK_SIZE_K"] == 0, EVEN_N=H % cfg["BLOCK_SIZE_N"] == 0)


def bank_tape_forward(h_bar: torch.Tensor, alpha: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor,
                      positions: torch.Tensor, x: torch.Tensor, z: torch.Tensor) -> None:
    """GEMM1 for every taped pair once all bank layers are normalised (bank_layer_forward with tape=True):
    z [P, H] = x W1^T + b1 (parameter dtype) with x [P, G*D'] = gamma_j x_hat + beta_j (the normalise pass's
    forward-only buffer, parameter dtype), one plain GEMM over every layer's pairs, then
    h_bar[t] += sum_s alpha[t, s] GELU(z[positions[t*K + s]]) (fp32/fp64, in place). alpha [L, K]; positions
    [L*K] int64; P = L*K."""
    op = "bank_tape_forward"
    dev = h_bar.device
    check_tensor(op, "fc1_weight", fc1_weight, shape=(None, None), dtype=FLOAT_DTYPES, device=dev)
    (H, width), dtype = fc1_weight.shape, fc1_weight.dtype
    check_tensor(op, "fc1_bias", fc1_bias, shape=(H,), dtype=dtype, device=dev)
    check_tensor(op, "h_bar", h_bar, shape=(None, H), dtype=acc_dtype(dtype), unit_stride=True)
    L = h_bar.shape[0]
    check_tensor(op, "alpha", alpha, shape=(L, None), dtype=FLOAT_DTYPES, device=dev)
    K = alpha.shape[1]
    P = L * K
    check_tensor(op, "positions", positions, shape=(P,), dtype=torch.int64, device=dev)
    check_tensor(op, "x", x, shape=(P, width), dtype=dtype, device=dev)
    check_tensor(op, "z", z, shape=(P, H), dtype=dtype, device=dev)
    for name, t in (("x", x), ("z", z)):
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous, got strides {list(t.stride())}")
    guard.check_index_range(op, "positions", positions, P, "tape rows")
    if P == 0:
        return
    alpha, fc1_bias = rows_contiguous(alpha), fc1_bias.contiguous()
    types = _dtypes(dtype, dev)

    def gemm1(cfg):
        tiles = triton.cdiv(P, cfg["BLOCK_SIZE_M"])
        with guarded("bank_tape_forward/gemm1", z=z) as out:  # (tokens / slots / offsets / alpha not read: TAPE)
            x_arg, w1_arg, use_tma = _tma_operands(x, (cfg["BLOCK_SIZE_M"], cfg["BLOCK_SIZE_K"]), fc1_weight,
                                                   (cfg["BLOCK_SIZE_N"], cfg["BLOCK_SIZE_K"]), dev)
            _bank_gemm1_kernel[(tiles * triton.cdiv(H, cfg["BLOCK_SIZE_N"]),)](
                x_arg, w1_arg, fc1_weight.stride(0), fc1_weight.stride(1), fc1_bias, positions, positions,
                positions, 0, alpha, alpha.stride(0), h_bar, h_bar.stride(0), out.z, P, H, width, L, K, tiles,
                TAPE=True, USE_TMA=use_tma, **_even(cfg, width, H), **types, **launch_kwargs(cfg, group=True),
            )

    gemm1(tune("gemm1_train", P, dev, dtype, gemm1, n=H, k=width))
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
    types = _dtypes(dtype, dev)
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
            dz_arg, x_hat_arg, tma = _tma_operands(dz, (cfg["BLOCK_SIZE_K"], cfg["BLOCK_SIZE_M"]), x_hat,
                                                   (cfg["BLOCK_SIZE_K"], cfg["BLOCK_SIZE_N"]), dev)
            _bank_weight_grad_kernel[grid](
                dz, x_hat, dz_arg, x_hat_arg, offsets, M, affine[0], affine[1], affine.stride(1), fc1_weight,
                fc1_weight.stride(0),
                fc1_weight.stride(1), out.d_w1, out.db1, out.dgamma_part, out.dbeta_part, H, Dg, G,
                STORE_DW1=need_w1, USE_TMA=tma, **types, **launch_kwargs(cfg),
            )
        return n_h_tiles, d_w1, db1, dgamma_part, dbeta_part

    n_h_tiles, d_w1, db1_acc, dgamma_part, dbeta_part = weight_grad(
        tune("weight_grad", H, dev, dtype, weight_grad, n=width, k=P))
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


@custom_op("geoalign::triton_bank_layer_forward", mutates_args=("h_bar", "x_hat", "x", "affine"))
def bank_layer_forward_op(h_bar: torch.Tensor, alpha: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                          fc1_weight: torch.Tensor, fc1_bias: torch.Tensor, layer: torch.Tensor,
                          tokens: torch.Tensor, slots: torch.Tensor, offsets: torch.Tensor, layer_pos: int,
                          gather_index: torch.Tensor, eps: float, x_hat: torch.Tensor, x: torch.Tensor,
                          affine: torch.Tensor, tape: bool) -> None:
    """One bank layer as it streams in (see bank_layer_forward): h_bar, x_hat, x and affine updated in place."""
    bank_layer_forward(h_bar, alpha, ln_weight, ln_bias, fc1_weight, fc1_bias, layer, tokens, slots, offsets,
                       layer_pos, gather_index, eps, x_hat, x, affine, tape)


@bank_layer_forward_op.register_fake
def _bank_layer_forward_fake(h_bar, alpha, ln_weight, ln_bias, fc1_weight, fc1_bias, layer, tokens, slots, offsets,
                             layer_pos, gather_index, eps, x_hat, x, affine, tape):
    return None


@custom_op("geoalign::triton_bank_tape_forward", mutates_args=("h_bar", "z"))
def bank_tape_forward_op(h_bar: torch.Tensor, alpha: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor,
                         positions: torch.Tensor, x: torch.Tensor, z: torch.Tensor) -> None:
    """GEMM1 of every taped pair and h_bar from it (see bank_tape_forward): h_bar and z updated in place."""
    bank_tape_forward(h_bar, alpha, fc1_weight, fc1_bias, positions, x, z)


@bank_tape_forward_op.register_fake
def _bank_tape_forward_fake(h_bar, alpha, fc1_weight, fc1_bias, positions, x, z):
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
