"""Routed feature bank, one VGGT layer at a time: gathered GEMM1 with LayerNorm in the A-load (design.md 5.2, 3).

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
from .configs import get_config
from .guard import guarded
from .library import custom_op
from .runtime import acc_dtype
from .utils import alloc, dot_dtype, gelu, gelu_grad, dot_precision, rows_contiguous, tl_dtype


# --------------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _ln_stats_kernel(layer_ptr, s_row, N, gather_ptr, s_gl, s_gg, L, tokens_ptr, raw_ptr, mean_ptr, rstd_ptr,
                     n_rows, G, Dg, eps, SAVE_RAW: tl.constexpr, PARAM: tl.constexpr, ACC: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows r = p*G + g of the gathered [n*G, D'] matrix: mean/rstd of PARAM-rounded values (as torch's
    layer_norm(raw.to(param dtype))); raw[r] = R_i[gather_index[tokens[p], g]] when SAVE_RAW.
    A token id outside [0, L) or a gather row outside [0, N) reads nothing and gets NaN statistics."""
    pid = tl.program_id(0)
    r = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    mr = r < n_rows
    p = r // G
    g = r % G
    t = tl.load(tokens_ptr + p, mask=mr, other=0).to(tl.int64)
    ok = mr & (t >= 0) & (t < L)
    src = tl.load(gather_ptr + t * s_gl + g * s_gg, mask=ok, other=0).to(tl.int64)
    ok = ok & (src >= 0) & (src < N)
    rd = tl.arange(0, BLOCK_D).to(tl.int64)
    total = tl.zeros((BLOCK_R,), dtype=ACC)
    for d0 in range(0, Dg, BLOCK_D):
        d = d0 + rd
        m = mr[:, None] & (d[None, :] < Dg)
        x = tl.load(layer_ptr + src[:, None] * s_row + d[None, :], mask=m & ok[:, None], other=0.0)
        if SAVE_RAW:
            tl.store(raw_ptr + r[:, None] * Dg + d[None, :], x, mask=m)
        total += tl.sum(x.to(PARAM).to(ACC), axis=1)
    mean = total / Dg
    sq = tl.zeros((BLOCK_R,), dtype=ACC)
    for d0 in range(0, Dg, BLOCK_D):  # second pass over the (cached) rows: centred sum of squares
        d = d0 + rd
        m = mr[:, None] & (d[None, :] < Dg)
        x = tl.load(layer_ptr + src[:, None] * s_row + d[None, :], mask=m & ok[:, None], other=0.0).to(PARAM).to(ACC)
        xc = tl.where(m, x - mean[:, None], 0.0)
        sq += tl.sum(xc * xc, axis=1)
    rstd = tl.where(ok, 1.0 / tl.sqrt(sq / Dg + eps), float("nan"))
    mean = tl.where(ok, mean, float("nan"))
    tl.store(mean_ptr + r, mean, mask=mr)
    tl.store(rstd_ptr + r, rstd, mask=mr)


@triton.jit
def _bank_fwd_kernel(layer_ptr, s_row, N, gather_ptr, s_gl, s_gg, tokens_ptr, slots_ptr, alpha_ptr, s_al,
                     mean_ptr, rstd_ptr, lnw_ptr, lnb_ptr, w1_ptr, s_wh, s_wk, b1_ptr, h_ptr, s_hl, z_ptr,
                     n, H, Dg, G, L, K, SAVE_Z: tl.constexpr, PARAM: tl.constexpr, OP: tl.constexpr, ACC: tl.constexpr,
                     DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rp = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # pair ids
    mp = rp < n
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # hidden columns
    mn = rn < H
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    t = tl.load(tokens_ptr + rp, mask=mp, other=0).to(tl.int64)
    s = tl.load(slots_ptr + rp, mask=mp, other=0).to(tl.int64)
    ok = mp & (t >= 0) & (t < L) & (s >= 0) & (s < K)  # ids out of range: no read or write through them
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for g in range(0, G):
        src = tl.load(gather_ptr + t * s_gl + g * s_gg, mask=ok, other=0).to(tl.int64)
        src_ok = ok & (src >= 0) & (src < N)  # (the pre-pass gave such rows NaN statistics)
        mu = tl.load(mean_ptr + rp * G + g, mask=mp, other=0.0)
        rs = tl.load(rstd_ptr + rp * G + g, mask=mp, other=0.0)
        for d0 in range(0, Dg, BLOCK_K):
            d = d0 + rk
            md = d < Dg
            m = mp[:, None] & md[None, :]
            x = tl.load(layer_ptr + src[:, None] * s_row + d[None, :], mask=src_ok[:, None] & md[None, :],
                        other=0.0).to(PARAM).to(ACC)
            lw = tl.load(lnw_ptr + d, mask=md, other=0.0).to(ACC)
            lb = tl.load(lnb_ptr + d, mask=md, other=0.0).to(ACC)
            xn = tl.where(m, (x - mu[:, None]) * rs[:, None] * lw[None, :] + lb[None, :], 0.0)
            w = tl.load(w1_ptr + rn[None, :] * s_wh + (g * Dg + d)[:, None] * s_wk, mask=md[:, None] & mn[None, :],
                        other=0.0)
            acc = tl.dot(xn.to(PARAM).to(OP), w.to(OP), acc, input_precision=DOT_PREC)
    z = (acc + tl.load(b1_ptr + rn, mask=mn, other=0.0).to(ACC)[None, :]).to(PARAM)
    m2 = mp[:, None] & mn[None, :]
    if SAVE_Z:
        tl.store(z_ptr + rp[:, None] * H + rn[None, :], z, mask=m2)
    a = tl.load(alpha_ptr + t * s_al + s, mask=ok, other=0.0).to(ACC)
    h_off = h_ptr + t[:, None] * s_hl + rn[None, :]
    m_h = ok[:, None] & mn[None, :]
    h_old = tl.load(h_off, mask=m_h, other=0.0)
    tl.store(h_off, h_old + a[:, None] * gelu(z.to(ACC)), mask=m_h)


@triton.jit
def _bank_dz_kernel(dh_ptr, s_dl, tokens_ptr, slots_ptr, alpha_ptr, s_al, z_ptr, dz_ptr, d_alpha_ptr, s_dal,
                    db1_part_ptr, n, H, L, K, PARAM: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    rp = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mp = rp < n
    t = tl.load(tokens_ptr + rp, mask=mp, other=0).to(tl.int64)
    s = tl.load(slots_ptr + rp, mask=mp, other=0).to(tl.int64)
    ok = mp & (t >= 0) & (t < L) & (s >= 0) & (s < K)  # ids out of range: no read or write through them
    a = tl.load(alpha_ptr + t * s_al + s, mask=ok, other=0.0).to(ACC)
    d_alpha = tl.zeros((BLOCK_M,), dtype=ACC)
    rn0 = tl.arange(0, BLOCK_N).to(tl.int64)
    for h0 in range(0, H, BLOCK_N):
        rn = h0 + rn0
        m = mp[:, None] & (rn[None, :] < H)
        dh = tl.load(dh_ptr + t[:, None] * s_dl + rn[None, :], mask=m & ok[:, None], other=0.0).to(ACC)
        z = tl.load(z_ptr + rp[:, None] * H + rn[None, :], mask=m, other=0.0).to(ACC)
        d_alpha += tl.sum(dh * gelu(z), axis=1)
        dz = (a[:, None] * dh * gelu_grad(z)).to(PARAM)
        tl.store(dz_ptr + rp[:, None] * H + rn[None, :], dz, mask=m)
        tl.store(db1_part_ptr + pid.to(tl.int64) * H + rn, tl.sum(tl.where(m, dz.to(ACC), 0.0), axis=0), mask=rn < H)
    tl.store(d_alpha_ptr + t * s_dal + s, d_alpha, mask=ok)


@triton.jit
def _bank_dw1_kernel(dz_ptr, raw_ptr, mean_ptr, rstd_ptr, lnw_ptr, lnb_ptr, dw1_ptr, n, H, Dg, G,
                     PARAM: tl.constexpr, OP: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dW1[h, g*D' + d] = sum_p dz[p, h] * x[p, g, d], x = LN(raw) recomputed in the B-load. Grid (H/BM, G*D'/BN)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    n_db = tl.cdiv(Dg, BLOCK_N)
    g = pid_n // n_db
    rh = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mh = rh < H
    d = ((pid_n % n_db) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    md = d < Dg
    lw = tl.load(lnw_ptr + d, mask=md, other=0.0).to(ACC)
    lb = tl.load(lnb_ptr + d, mask=md, other=0.0).to(ACC)
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for p0 in range(0, n, BLOCK_K):
        p = p0 + rk
        mpk = p < n
        a = tl.load(dz_ptr + p[None, :] * H + rh[:, None], mask=mh[:, None] & mpk[None, :], other=0.0)
        row = p * G + g
        mu = tl.load(mean_ptr + row, mask=mpk, other=0.0)
        rs = tl.load(rstd_ptr + row, mask=mpk, other=0.0)
        m = mpk[:, None] & md[None, :]
        x = tl.load(raw_ptr + row[:, None] * Dg + d[None, :], mask=m, other=0.0).to(PARAM).to(ACC)
        xn = tl.where(m, (x - mu[:, None]) * rs[:, None] * lw[None, :] + lb[None, :], 0.0)
        acc = tl.dot(a.to(OP), xn.to(PARAM).to(OP), acc, input_precision=DOT_PREC)
    tl.store(dw1_ptr + rh[:, None] * (G * Dg) + (g * Dg + d)[None, :], acc.to(PARAM), mask=mh[:, None] & md[None, :])


@triton.jit
def _bank_dx_kernel(dz_ptr, w1_ptr, s_wh, s_wk, raw_ptr, mean_ptr, rstd_ptr, dgamma_part_ptr, dbeta_part_ptr,
                    n, H, Dg, G, PARAM: tl.constexpr, OP: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dx[p, g, d] = sum_h dz[p, h] W1[h, g*D' + d]; writes partial dgamma/dbeta rows (pid_m*G + g) over the block's
    pairs. Grid (n/BM, G*D'/BN)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    n_db = tl.cdiv(Dg, BLOCK_N)
    g = pid_n // n_db
    rp = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mp = rp < n
    d = ((pid_n % n_db) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    md = d < Dg
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for h0 in range(0, H, BLOCK_K):
        h = h0 + rk
        mk = h < H
        a = tl.load(dz_ptr + rp[:, None] * H + h[None, :], mask=mp[:, None] & mk[None, :], other=0.0)
        w = tl.load(w1_ptr + h[:, None] * s_wh + (g * Dg + d)[None, :] * s_wk, mask=mk[:, None] & md[None, :],
                    other=0.0)
        acc = tl.dot(a.to(OP), w.to(OP), acc, input_precision=DOT_PREC)
    dx = acc.to(PARAM).to(ACC)
    row = rp * G + g
    mu = tl.load(mean_ptr + row, mask=mp, other=0.0)
    rs = tl.load(rstd_ptr + row, mask=mp, other=0.0)
    m = mp[:, None] & md[None, :]
    x = tl.load(raw_ptr + row[:, None] * Dg + d[None, :], mask=m, other=0.0).to(PARAM).to(ACC)
    x_hat = (x - mu[:, None]) * rs[:, None]
    dx = tl.where(m, dx, 0.0)
    out = (pid_m * G + g) * Dg + d
    tl.store(dgamma_part_ptr + out, tl.sum(dx * x_hat, axis=0), mask=md)
    tl.store(dbeta_part_ptr + out, tl.sum(dx, axis=0), mask=md)


# -------------------------------------------------------------------------------------------------------- launchers
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
    rcfg = get_config("rows", n * G, dev)
    block_r = rcfg["BLOCK_M"]
    with guarded("bank_forward/ln_stats", raw=raw, mean=mean, rstd=rstd) as out:
        _ln_stats_kernel[(triton.cdiv(n * G, block_r),)](
            layer, layer.stride(0), N, gather_index, gather_index.stride(0), gather_index.stride(1), L, tokens,
            out.raw, out.mean, out.rstd, n * G, G, Dg, eps, SAVE_RAW=save, PARAM=tl_dtype(dtype), ACC=tl_dtype(acc),
            BLOCK_R=block_r, BLOCK_D=rcfg["BLOCK_N"], num_warps=rcfg["num_warps"],
        )
    cfg = get_config("bank_fwd", n, dev, dtype)
    grid = (triton.cdiv(n, cfg["BLOCK_M"]), triton.cdiv(H, cfg["BLOCK_N"]))
    with guarded("bank_forward/gemm1", h_bar=h_bar, z=z) as out:
        _bank_fwd_kernel[grid](
            layer, layer.stride(0), N, gather_index, gather_index.stride(0), gather_index.stride(1), tokens, slots,
            alpha, alpha.stride(0), mean, rstd, ln_weight, ln_bias, fc1_weight, fc1_weight.stride(0),
            fc1_weight.stride(1), fc1_bias, out.h_bar, h_bar.stride(0), out.z, n, H, Dg, G, L, K,
            SAVE_Z=save, PARAM=tl_dtype(dtype), OP=dot_dtype(dtype), ACC=tl_dtype(acc), DOT_PREC=dot_precision(dtype),
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
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
    rcfg = get_config("rows", n, dev)
    block_m = rcfg["BLOCK_M"]
    n_blocks = triton.cdiv(n, block_m)
    dz = alloc((n, H), dtype, dev)
    db1_part = alloc((n_blocks, H), acc, dev)
    with guarded("bank_backward/dz", dz=dz, d_alpha=d_alpha, db1_part=db1_part) as out:
        _bank_dz_kernel[(n_blocks,)](
            d_h_bar, d_h_bar.stride(0), tokens, slots, alpha, alpha.stride(0), z, out.dz, out.d_alpha,
            d_alpha.stride(0), out.db1_part, n, H, L, K,
            PARAM=tl_dtype(dtype), ACC=tl_dtype(acc), BLOCK_M=block_m, BLOCK_N=rcfg["BLOCK_N"],
            num_warps=rcfg["num_warps"],
        )
    d_b1 = db1_part.sum(0).to(dtype)
    common = dict(PARAM=tl_dtype(dtype), OP=dot_dtype(dtype), ACC=tl_dtype(acc), DOT_PREC=dot_precision(dtype))
    if need_w1:
        cfg = get_config("bank_dw1", H, dev, dtype)
        d_w1 = alloc((H, G * Dg), dtype, dev)
        grid = (triton.cdiv(H, cfg["BLOCK_M"]), G * triton.cdiv(Dg, cfg["BLOCK_N"]))
        with guarded("bank_backward/dw1", d_w1=d_w1) as out:
            _bank_dw1_kernel[grid](dz, raw, mean, rstd, ln_weight, ln_bias, out.d_w1, n, H, Dg, G, **common,
                                   BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                                   num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    else:
        d_w1 = torch.zeros_like(fc1_weight)
    if need_ln:
        cfg = get_config("bank_dx", n, dev, dtype)
        n_mb = triton.cdiv(n, cfg["BLOCK_M"])
        dgamma_part = alloc((n_mb * G, Dg), acc, dev)
        dbeta_part = alloc((n_mb * G, Dg), acc, dev)
        grid = (n_mb, G * triton.cdiv(Dg, cfg["BLOCK_N"]))
        with guarded("bank_backward/dx", dgamma_part=dgamma_part, dbeta_part=dbeta_part) as out:
            _bank_dx_kernel[grid](dz, fc1_weight, fc1_weight.stride(0), fc1_weight.stride(1), raw, mean, rstd,
                                  out.dgamma_part, out.dbeta_part, n, H, Dg, G, **common,
                                  BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
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
