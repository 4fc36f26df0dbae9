"""Routed feature bank, one VGGT layer at a time: normalise first, then GEMM1 with a fused epilogue
(docs/architecture.md, "Backends").

For bank layer i and its n routed (token, slot) pairs (``tokens``/``slots`` from geoalign.routing.bank_rows):

  forward   h_bar[t] += alpha[t, s] * GELU(W1 . (gamma x_hat + beta) + b1)                      (in place)
    _gather_normalize_kernel  one pass over the n*G gathered patch rows: two-pass mean / rstd (fp32) and the
                              normalised rows x_hat [n, G*D'] in the parameter dtype: GEMM1's operand, and the one
                              tensor backward keeps
    _bank_fwd_kernel          a dense GEMM x_hat [n, G*D'] @ W1^T with the LayerNorm affine in its A-load and
                              + b1, exact GELU, * alpha, read-add-write into h_bar in the epilogue (a token's pairs
                              of one layer are distinct: no atomics, deterministic); optionally stores z
  backward  (VGGT is frozen: no gradient into the layer, so dx = dz W1 is never formed)
    _bank_dz_kernel           dz = alpha * dh_bar[t] * GELU'(z) (parameter dtype), d_alpha[t, s] = <dh_bar[t], GELU(z)>,
                              per-program partial sums of db1
    _bank_weight_grad_kernel  the one GEMM M = dz^T x_hat [H, G*D'] (fp32 accumulator) with the epilogue
                                dW1 = gamma M + beta db1,  partial dgamma = sum_h W1 M,  partial dbeta = sum_h W1 db1
                              (per-program fp32 partial rows, summed on the host; no locks or atomics)

Saved for backward (per layer, only when a gradient is needed): x_hat [n, G*D'] and z [n, H], both in the parameter
dtype (the same bytes as the raw rows; nothing about LayerNorm is recomputed). Row indices are cast to int64 before
being multiplied by strides (n*G*D' and N*D' can pass 2^31).
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
from .utils import alloc, dot_dtype, dot_precision, gelu, gelu_grad, rows_contiguous, tl_dtype


# --------------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _gather_normalize_kernel(
        layer_ptr, stride_layer_row, N,  # bank layer i [N, D'] (unit column stride), its row stride and row count
        gather_ptr, stride_gather_l, stride_gather_g, L,  # gather_index [L, G] and its strides; L tokens
        tokens_ptr,  # [n] token id of each routed pair
        x_hat_ptr,  # output: x_hat [n*G, D'] normalised rows (parameter dtype), row-major
        n_rows, G, D_geo, eps,  # n*G gathered rows, patch rows per token, row width D', LayerNorm eps
        PARAM_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr,
        BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr):  # rows per program, column chunk
    """Row r = p*G + g: x_hat[r] = (v - mean) * rstd with v = R_i[gather_index[tokens[p], g]] rounded to the
    parameter dtype (as torch's layer_norm(raw.to(param dtype))), two-pass statistics in ACC_DTYPE.
    A token id outside [0, L) or a gather row outside [0, N) reads nothing and gives a NaN row (visible)."""
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
    out_ptrs = x_hat_ptr + offs_r[:, None] * D_geo + offs_d[None, :]
    for d0 in range(0, D_geo, BLOCK_SIZE_N):  # third pass: write the normalised row
        mask = offs_d[None, :] < D_geo - d0
        v = tl.load(row_ptrs + d0, mask=mask & valid[:, None], other=0.0).to(PARAM_DTYPE).to(ACC_DTYPE)
        x_hat = (v - mean[:, None]) * rstd[:, None]
        tl.store(out_ptrs + d0, x_hat.to(PARAM_DTYPE), mask=mask & mask_r[:, None])


@triton.jit
def _bank_fwd_kernel(
        x_hat_ptr,  # normalised rows [n, G*D'] (parameter dtype), row-major
        ln_weight_ptr, ln_bias_ptr,  # LN_i affine [D'], applied in the A-load (column c uses entry c % D')
        w1_ptr, stride_w1_h, stride_w1_k, b1_ptr,  # GEMM1 weight [H, G*D'] and bias [H]
        tokens_ptr, slots_ptr,  # [n] token id and slot of each routed pair
        alpha_ptr, stride_alpha_l,  # alpha [L, K] (unit column stride)
        h_bar_ptr, stride_h_bar_l,  # h_bar [L, H] (accumulation dtype), read-add-written
        z_ptr,  # output: z [n, H] pre-activations (when SAVE_Z)
        n, H, D_geo, G, L, K,  # pairs, hidden width, D', patch rows per token, tokens, slots per token
        SAVE_Z: tl.constexpr, PARAM_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr):  # pairs, H, G*D'
    """A dense GEMM over pairs (rows) x H (columns), K-dim = G*D' (x = gamma x_hat + beta in the A-load); epilogue:
    + b1, exact GELU, * alpha, read-add-write into h_bar at the pair's token."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = (pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)).to(tl.int64)  # pairs
    mask_m = offs_m < n
    offs_n = (pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)).to(tl.int64)  # hidden columns
    mask_n = offs_n < H
    offs_k = tl.arange(0, BLOCK_SIZE_K).to(tl.int64)
    width = G * D_geo
    a_ptrs = x_hat_ptr + offs_m[:, None] * width + offs_k[None, :]
    w_ptrs = w1_ptr + offs_n[None, :] * stride_w1_h + offs_k[:, None] * stride_w1_k
    acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=ACC_DTYPE)
    for k0 in range(0, width, BLOCK_SIZE_K):
        cols = k0 + offs_k
        mask_k = cols < width
        x_hat = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(ACC_DTYPE)
        ln_w = tl.load(ln_weight_ptr + cols % D_geo, mask=mask_k, other=0.0).to(ACC_DTYPE)
        ln_b = tl.load(ln_bias_ptr + cols % D_geo, mask=mask_k, other=0.0).to(ACC_DTYPE)
        x = tl.where(mask_m[:, None] & mask_k[None, :], x_hat * ln_w[None, :] + ln_b[None, :], 0.0)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(x.to(PARAM_DTYPE).to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_SIZE_K
        w_ptrs += BLOCK_SIZE_K * stride_w1_k
    z = (acc + tl.load(b1_ptr + offs_n, mask=mask_n, other=0.0).to(ACC_DTYPE)[None, :]).to(PARAM_DTYPE)
    if SAVE_Z:
        tl.store(z_ptr + offs_m[:, None] * H + offs_n[None, :], z, mask=mask_m[:, None] & mask_n[None, :])
    token = tl.load(tokens_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    slot = tl.load(slots_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    valid = mask_m & (token >= 0) & (token < L) & (slot >= 0) & (slot < K)  # no read or write through bad ids
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
def _bank_weight_grad_kernel(
        dz_ptr,  # dz [n, H] (parameter dtype), row-major
        x_hat_ptr,  # saved normalised rows [n, G*D'] (parameter dtype), row-major
        db1_ptr,  # db1 [H] (accumulation dtype), complete
        ln_weight_ptr, ln_bias_ptr,  # LN_i affine [D'] (column c uses entry c % D')
        w1_ptr, stride_w1_h, stride_w1_k,  # GEMM1 weight [H, G*D']
        dw1_ptr,  # output: dW1 [H, G*D'] (parameter dtype), when STORE_DW1
        dgamma_partial_ptr, dbeta_partial_ptr,  # outputs: [programs_h, G*D'] partial sums (accumulation dtype)
        n, H, D_geo, G,  # pairs, hidden width, D', patch rows per token
        STORE_DW1: tl.constexpr, PARAM_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr):  # H, G*D', pairs
    """M = dz^T x_hat for an [H, G*D'] tile (reduction over the pairs), then dW1 = gamma M + beta db1 and this tile's
    row of partial sums dgamma[c] = sum_h W1[h, c] M[h, c], dbeta[c] = sum_h W1[h, c] db1[h]."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    width = G * D_geo
    offs_h = (pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)).to(tl.int64)
    mask_h = offs_h < H
    offs_c = (pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)).to(tl.int64)
    mask_c = offs_c < width
    offs_p = tl.arange(0, BLOCK_SIZE_K).to(tl.int64)
    dz_ptrs = dz_ptr + offs_p[None, :] * H + offs_h[:, None]  # dz^T tile [BLOCK_H, BLOCK_P]
    x_ptrs = x_hat_ptr + offs_p[:, None] * width + offs_c[None, :]  # x_hat tile [BLOCK_P, BLOCK_C]
    acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=ACC_DTYPE)
    for p0 in range(0, n, BLOCK_SIZE_K):
        mask_p = offs_p < n - p0
        dz = tl.load(dz_ptrs, mask=mask_h[:, None] & mask_p[None, :], other=0.0)
        x_hat = tl.load(x_ptrs, mask=mask_p[:, None] & mask_c[None, :], other=0.0)
        acc = tl.dot(dz.to(DOT_DTYPE), x_hat.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
        dz_ptrs += BLOCK_SIZE_K * H
        x_ptrs += BLOCK_SIZE_K * width
    mask = mask_h[:, None] & mask_c[None, :]
    db1 = tl.load(db1_ptr + offs_h, mask=mask_h, other=0.0).to(ACC_DTYPE)
    ln_w = tl.load(ln_weight_ptr + offs_c % D_geo, mask=mask_c, other=0.0).to(ACC_DTYPE)
    ln_b = tl.load(ln_bias_ptr + offs_c % D_geo, mask=mask_c, other=0.0).to(ACC_DTYPE)
    if STORE_DW1:
        dw1 = acc * ln_w[None, :] + db1[:, None] * ln_b[None, :]
        tl.store(dw1_ptr + offs_h[:, None] * width + offs_c[None, :], dw1.to(PARAM_DTYPE), mask=mask)
    w1 = tl.load(w1_ptr + offs_h[:, None] * stride_w1_h + offs_c[None, :] * stride_w1_k, mask=mask,
                 other=0.0).to(ACC_DTYPE)
    offs_out = pid_m.to(tl.int64) * width + offs_c
    tl.store(dgamma_partial_ptr + offs_out, tl.sum(w1 * acc, axis=0), mask=mask_c)
    tl.store(dbeta_partial_ptr + offs_out, tl.sum(w1 * db1[:, None], axis=0), mask=mask_c)


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
    Returns (x_hat [n, G*D'], z [n, H]) in the parameter dtype, what backward needs; z is empty ([0, H]) unless
    save (x_hat is GEMM1's operand, so it always exists)."""
    op = "bank_forward"
    dev = h_bar.device
    check_tensor(op, "gather_index", gather_index, shape=(None, None), dtype=INDEX_DTYPES, device=dev)
    L, G = gather_index.shape
    check_tensor(op, "layer", layer, shape=(None, None), dtype=FLOAT_DTYPES, device=dev)
    N, Dg = layer.shape
    H = _check_bank_params(op, ln_weight, ln_bias, fc1_weight, Dg, G, dev)
    dtype = fc1_weight.dtype
    check_tensor(op, "fc1_bias", fc1_bias, shape=(H,), dtype=dtype, device=dev)
    check_tensor(op, "h_bar", h_bar, shape=(L, H), dtype=acc_dtype(dtype), unit_stride=True)
    check_tensor(op, "alpha", alpha, shape=(L, None), dtype=FLOAT_DTYPES, device=dev)
    K = alpha.shape[1]
    n = _check_pairs(op, tokens, slots, L, K, dev)
    guard.check_index_range(op, "gather_index", gather_index, N, "rows of the layer")
    layer = rows_contiguous(layer)  # one explicit copy if the rows are strided
    alpha = rows_contiguous(alpha)
    tokens, slots = tokens.contiguous(), slots.contiguous()
    ln_weight, ln_bias, fc1_bias = ln_weight.contiguous(), ln_bias.contiguous(), fc1_bias.contiguous()
    x_hat = alloc((n, G * Dg), dtype, dev)
    z = alloc((n, H), dtype, dev) if save else fc1_weight.new_empty((0, H))
    if n == 0:
        return x_hat, z
    types = _dtypes(dtype)
    rcfg = get_config("rows", n * G, dev)
    with guarded("bank_forward/normalize", x_hat=x_hat) as out:
        _gather_normalize_kernel[(triton.cdiv(n * G, rcfg["BLOCK_SIZE_M"]),)](
            layer, layer.stride(0), N, gather_index, gather_index.stride(0), gather_index.stride(1), L, tokens,
            out.x_hat, n * G, G, Dg, eps, PARAM_DTYPE=types["PARAM_DTYPE"], ACC_DTYPE=types["ACC_DTYPE"],
            BLOCK_SIZE_M=rcfg["BLOCK_SIZE_M"], BLOCK_SIZE_N=rcfg["BLOCK_SIZE_N"], num_warps=rcfg["num_warps"],
        )
    cfg = get_config("bank_fwd", n, dev, dtype)
    grid = (triton.cdiv(n, cfg["BLOCK_SIZE_M"]), triton.cdiv(H, cfg["BLOCK_SIZE_N"]))
    with guarded("bank_forward/gemm1", h_bar=h_bar, z=z) as out:
        _bank_fwd_kernel[grid](
            x_hat, ln_weight, ln_bias, fc1_weight, fc1_weight.stride(0), fc1_weight.stride(1), fc1_bias, tokens,
            slots, alpha, alpha.stride(0), out.h_bar, h_bar.stride(0), out.z, n, H, Dg, G, L, K,
            SAVE_Z=save, **types, **launch_kwargs(cfg),
        )
    return x_hat, z


def bank_backward(d_h_bar: torch.Tensor, alpha: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                  fc1_weight: torch.Tensor, tokens: torch.Tensor, slots: torch.Tensor, x_hat: torch.Tensor,
                  z: torch.Tensor, need_ln: bool = True, need_w1: bool = True):
    """-> (d_alpha [L, K] (alpha's dtype, zero off this layer's pairs), d_ln_weight, d_ln_bias [D'],
    d_fc1_weight [H, G*D'], d_fc1_bias [H]) in the parameter dtype; LN/W1 grads are zeros when not needed."""
    op = "bank_backward"
    dev = d_h_bar.device
    check_tensor(op, "fc1_weight", fc1_weight, shape=(None, None), dtype=FLOAT_DTYPES, device=dev)
    H, width = fc1_weight.shape
    dtype = fc1_weight.dtype
    check_tensor(op, "ln_weight", ln_weight, shape=(None,), dtype=dtype, device=dev)
    Dg = ln_weight.shape[0]
    if Dg == 0 or width % Dg:
        raise ValueError(f"{op}: fc1_weight's width {width} is not a multiple of D'={Dg} (ln_weight's size)")
    G = width // Dg
    _check_bank_params(op, ln_weight, ln_bias, fc1_weight, Dg, G, dev)
    acc = acc_dtype(dtype)
    check_tensor(op, "d_h_bar", d_h_bar, shape=(None, H), dtype=acc)
    L = d_h_bar.shape[0]
    check_tensor(op, "alpha", alpha, shape=(L, None), dtype=FLOAT_DTYPES, device=dev)
    K = alpha.shape[1]
    n = _check_pairs(op, tokens, slots, L, K, dev)
    check_tensor(op, "x_hat", x_hat, shape=(n, width), dtype=dtype, device=dev)
    check_tensor(op, "z", z, shape=(n, H), dtype=dtype, device=dev)
    d_alpha = torch.zeros(alpha.shape, dtype=alpha.dtype, device=dev)  # non-zero only at this layer's pairs
    if n == 0:
        return (d_alpha, torch.zeros_like(ln_weight), torch.zeros_like(ln_bias), torch.zeros_like(fc1_weight),
                fc1_weight.new_zeros((H,)))
    d_h_bar = rows_contiguous(d_h_bar)
    alpha = rows_contiguous(alpha)
    tokens, slots = tokens.contiguous(), slots.contiguous()
    x_hat, z = x_hat.contiguous(), z.contiguous()
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
    db1 = db1_part.sum(0)
    d_b1 = db1.to(dtype)
    if not (need_w1 or need_ln):
        return d_alpha, torch.zeros_like(ln_weight), torch.zeros_like(ln_bias), torch.zeros_like(fc1_weight), d_b1
    cfg = get_config("bank_dw1", H, dev, dtype)
    n_h_blocks = triton.cdiv(H, cfg["BLOCK_SIZE_M"])
    d_w1 = alloc((H, width), dtype, dev) if need_w1 else fc1_weight.new_empty((0, width))
    dgamma_part = alloc((n_h_blocks, width), acc, dev)
    dbeta_part = alloc((n_h_blocks, width), acc, dev)
    grid = (n_h_blocks, triton.cdiv(width, cfg["BLOCK_SIZE_N"]))
    with guarded("bank_backward/weight_grad", d_w1=d_w1, dgamma_part=dgamma_part, dbeta_part=dbeta_part) as out:
        _bank_weight_grad_kernel[grid](
            dz, x_hat, db1, ln_weight, ln_bias, fc1_weight, fc1_weight.stride(0), fc1_weight.stride(1), out.d_w1,
            out.dgamma_part, out.dbeta_part, n, H, Dg, G, STORE_DW1=need_w1, **types, **launch_kwargs(cfg),
        )
    if not need_w1:
        d_w1 = torch.zeros_like(fc1_weight)
    d_ln_w = dgamma_part.reshape(n_h_blocks * G, Dg).sum(0).to(dtype)
    d_ln_b = dbeta_part.reshape(n_h_blocks * G, Dg).sum(0).to(dtype)
    return d_alpha, d_ln_w, d_ln_b, d_w1, d_b1


# ------------------------------------------------------------------------------------------ torch.library custom ops
@custom_op("geoalign::triton_bank_accumulate", mutates_args=("h_bar",))
def bank_accumulate_op(h_bar: torch.Tensor, alpha: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                       fc1_weight: torch.Tensor, fc1_bias: torch.Tensor, layer: torch.Tensor, tokens: torch.Tensor,
                       slots: torch.Tensor, gather_index: torch.Tensor, eps: float,
                       save: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """In-place h_bar update for one bank layer; returns what backward needs (x_hat, z)."""
    return bank_forward(h_bar, alpha, ln_weight, ln_bias, fc1_weight, fc1_bias, layer, tokens, slots, gather_index,
                        eps, save)


@bank_accumulate_op.register_fake
def _bank_accumulate_fake(h_bar, alpha, ln_weight, ln_bias, fc1_weight, fc1_bias, layer, tokens, slots,
                          gather_index, eps, save):
    n, G, Dg, H = tokens.shape[0], gather_index.shape[1], layer.shape[1], fc1_weight.shape[0]
    return fc1_weight.new_empty((n, G * Dg)), fc1_weight.new_empty((n if save else 0, H))


@custom_op("geoalign::triton_bank_backward", mutates_args=())
def bank_backward_op(d_h_bar: torch.Tensor, alpha: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                     fc1_weight: torch.Tensor, tokens: torch.Tensor, slots: torch.Tensor, x_hat: torch.Tensor,
                     z: torch.Tensor, need_ln: bool,
                     need_w1: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_alpha, d_ln_weight, d_ln_bias, d_fc1_weight, d_fc1_bias) of one bank layer."""
    return bank_backward(d_h_bar, alpha, ln_weight, ln_bias, fc1_weight, tokens, slots, x_hat, z, need_ln, need_w1)


@bank_backward_op.register_fake
def _bank_backward_fake(d_h_bar, alpha, ln_weight, ln_bias, fc1_weight, tokens, slots, x_hat, z, need_ln, need_w1):
    return (torch.empty_like(alpha), torch.empty_like(ln_weight), torch.empty_like(ln_bias),
            torch.empty_like(fc1_weight), fc1_weight.new_empty((fc1_weight.shape[0],)))


class BankAccumulate(torch.autograd.Function):
    """h_bar[t] += alpha[t, s] * GELU(W1 . concat_g LN_i(R_i[gather_index[t, g]]) + b1) for layer i's pairs (t, s),
    in place (no [L, H] copy per layer; hence an autograd.Function with mark_dirty: torch.library refuses autograd
    formulas on mutating ops). Same signature and gradients as geoalign.backends.torch_sparse.BankAccumulate."""

    @staticmethod
    def forward(ctx, h_bar, alpha, ln_weight, ln_bias, fc1_weight, fc1_bias, layer, tokens, slots, gather_index, eps):
        ctx.mark_dirty(h_bar)
        x_hat, z = bank_accumulate_op(h_bar, alpha, ln_weight, ln_bias, fc1_weight, fc1_bias, layer, tokens, slots,
                                      gather_index, eps, True)
        ctx.save_for_backward(alpha, ln_weight, ln_bias, fc1_weight, tokens, slots, x_hat, z)
        return h_bar

    @staticmethod
    def backward(ctx, d_h_bar):
        alpha, ln_weight, ln_bias, fc1_weight, tokens, slots, x_hat, z = ctx.saved_tensors
        need = ctx.needs_input_grad
        if not any(need[1:6]):
            return (d_h_bar,) + (None,) * 10
        d_alpha, d_ln_w, d_ln_b, d_w1, d_b1 = bank_backward_op(
            d_h_bar, alpha, ln_weight, ln_bias, fc1_weight, tokens, slots, x_hat, z, bool(need[2] or need[3]),
            bool(need[4]))
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
