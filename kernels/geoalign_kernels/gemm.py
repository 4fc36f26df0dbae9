"""Shared strided GEMM: C[M, N] = A[M, K] @ B[K, N] (+ bias[N]) (GELU) (+ residual[M, N]), and optionally the row
sums of A (sum_k A[m, k]: a bias gradient, when C is a weight gradient dY^T X and A = dY^T).

Used by the output stage (projector.fc2, out_proj, the folded W_out.W2) and by backward weight/input gradients.
A and B may be any strided views (transposes cost nothing); accumulation is fp32 (fp64 for fp64 inputs). Programs
are launched on a 1-D grid in grouped order (Triton tutorial 03): GROUP_SIZE_M row blocks share each column block,
so a band of A stays in L2 while the N tiles are walked, instead of A being re-read from DRAM for every N tile.

Split-K: when C has too few tiles to fill the device and K is long (the router's dW2 = dS^T H is [M, R] = 12 x 512
summed over L = 8064 tokens: 4 tiles of 126 K-steps on a 132-SM GPU), a second grid axis splits K into SPLIT_K
ranges, each program writes an fp32 partial C, and one sum reduces them (no atomics, deterministic).

TMA (configs.tma_enabled: sm_90 and newer, tensor-core dtypes, GEOALIGN_TMA): A and B are read through host tensor
descriptors, of the operand where its rows are contiguous (mode 1) or of its transpose where its columns are (mode
2: dY^T, dS^T, W^T), 16-byte aligned (tma_operand); a box past the tensor's edge reads zeros, so the K loop has no
masks, and a split-K range never ends inside a K step except at K. Else pointer loads, today's path. Persistent
grid (configs.PERSISTENT, GEOALIGN_PERSISTENT=1, without split-K): about one program per SM loops over the tiles.
Every call names its site (configs.SITES): its own tuning key.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import FLOAT_DTYPES, check_tensor
from .configs import launch_kwargs, num_sms, persistent_programs, tma_enabled, tune
from .guard import guarded
from .runtime import acc_dtype
from .utils import alloc, dot_dtype, dot_precision, gelu, tl_dtype


@triton.jit
def _matmul_tile(
        tile_id, a_ptr, b_ptr, c_ptr, bias_ptr, residual_ptr, M, N, K,
        stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_rm, stride_rn, stride_cs,
        row_sum_ptr, stride_row_sum_s,
        SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, APPLY_GELU: tl.constexpr,
        HAS_ROW_SUM: tl.constexpr, A_TMA: tl.constexpr, B_TMA: tl.constexpr,
        DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
        GROUP_SIZE_M: tl.constexpr):
    """One [BLOCK_SIZE_M, BLOCK_SIZE_N] tile of C (tile ``tile_id`` in grouped order), over this program's K range
    (program_id(1) of SPLIT_K). See _matmul_kernel for the arguments."""
    num_pid_m = tl.cdiv(M, BLOCK_SIZE_M)
    num_pid_n = tl.cdiv(N, BLOCK_SIZE_N)
    num_pid_in_group = GROUP_SIZE_M * num_pid_n
    group_id = tile_id // num_pid_in_group
    first_pid_m = group_id * GROUP_SIZE_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_SIZE_M)
    pid_m = first_pid_m + ((tile_id % num_pid_in_group) % group_size_m)
    pid_n = (tile_id % num_pid_in_group) // group_size_m

    # this program's K range: whole BLOCK_SIZE_K steps, split as evenly as possible (the last ranges may be empty);
    # a range never ends inside a K step except at K itself, so a TMA box never reads into the next range
    k_steps = tl.cdiv(tl.cdiv(K, BLOCK_SIZE_K), SPLIT_K)
    k_start = tl.program_id(1).to(tl.int64) * k_steps * BLOCK_SIZE_K
    k_end = tl.minimum(k_start + k_steps * BLOCK_SIZE_K, K)

    offs_m = (pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_SIZE_K).to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N
    if A_TMA == 0:
        a_ptrs = a_ptr + offs_m[:, None] * stride_am + (k_start + offs_k)[None, :] * stride_ak
    if B_TMA == 0:
        b_ptrs = b_ptr + (k_start + offs_k)[:, None] * stride_bk + offs_n[None, :] * stride_bn
    off_m = pid_m * BLOCK_SIZE_M  # int32: TMA box coordinates are 32-bit
    off_n = pid_n * BLOCK_SIZE_N
    off_k = k_start.to(tl.int32)
    acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=ACC_DTYPE)
    row_sum = tl.zeros((BLOCK_SIZE_M,), dtype=ACC_DTYPE)
    for k0 in range(k_start, k_end, BLOCK_SIZE_K):
        # TMA boxes past the tensor's edge read zeros (the hardware's bounds check), so they need no mask
        if A_TMA == 1:  # a descriptor of A [M, K]
            a = a_ptr.load([off_m, off_k])
        elif A_TMA == 2:  # a descriptor of A^T [K, M] (A column-major, e.g. dY^T)
            a = a_ptr.load([off_k, off_m]).T
        else:
            mask_k = offs_k < k_end - k0
            a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            a_ptrs += BLOCK_SIZE_K * stride_ak
        if B_TMA == 1:  # a descriptor of B [K, N]
            b = b_ptr.load([off_k, off_n])
        elif B_TMA == 2:  # a descriptor of B^T [N, K] (B = W^T of a row-major weight W [N, K])
            b = b_ptr.load([off_n, off_k]).T
        else:
            mask_kb = offs_k < k_end - k0
            b = tl.load(b_ptrs, mask=mask_kb[:, None] & mask_n[None, :], other=0.0)
            b_ptrs += BLOCK_SIZE_K * stride_bk
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION,
                     out_dtype=ACC_DTYPE)
        if HAS_ROW_SUM:
            row_sum += tl.sum(a.to(ACC_DTYPE), axis=1)
        off_k += BLOCK_SIZE_K
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(ACC_DTYPE)[None, :]
    if APPLY_GELU:
        acc = gelu(acc)
    mask_c = mask_m[:, None] & mask_n[None, :]
    if HAS_RESIDUAL:
        residual_ptrs = residual_ptr + offs_m[:, None] * stride_rm + offs_n[None, :] * stride_rn
        acc += tl.load(residual_ptrs, mask=mask_c, other=0.0).to(ACC_DTYPE)
    if HAS_ROW_SUM:
        if pid_n == 0:
            sum_ptrs = row_sum_ptr + tl.program_id(1).to(tl.int64) * stride_row_sum_s + offs_m
            tl.store(sum_ptrs, row_sum.to(row_sum_ptr.dtype.element_ty), mask=mask_m)
    c_tile_ptr = c_ptr + tl.program_id(1).to(tl.int64) * stride_cs  # this program's partial C (0 without split-K)
    c_ptrs = c_tile_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_c)


@triton.jit
def _matmul_kernel(
        a_ptr, b_ptr, c_ptr,  # A [M, K], B [K, N] (any strides; or TMA descriptors: A_TMA / B_TMA), C [M, N]
        bias_ptr, residual_ptr,  # bias [N], residual [M, N] (read only when HAS_BIAS / HAS_RESIDUAL)
        M, N, K,  # problem sizes
        stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,  # element strides
        stride_rm, stride_rn,  # residual strides
        stride_cs,  # element stride between the SPLIT_K partial C's (program_id(1) picks one)
        row_sum_ptr, stride_row_sum_s,  # output when HAS_ROW_SUM: sum_k A[m, k] [M] (one per K range)
        SPLIT_K: tl.constexpr,  # K ranges over grid axis 1; > 1 only without an epilogue
        HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, APPLY_GELU: tl.constexpr,  # epilogue
        HAS_ROW_SUM: tl.constexpr,  # the programs of the first column tile also sum A's rows
        A_TMA: tl.constexpr, B_TMA: tl.constexpr,  # 0 pointer loads; 1 a descriptor of the operand; 2 of its transpose
        PERSISTENT: tl.constexpr,  # the programs of axis 0 loop over the tiles (grid: about one program per SM)
        DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,  # operand / accumulator types
        BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,  # tile
        GROUP_SIZE_M: tl.constexpr):  # row blocks per group of the launch order
    if PERSISTENT:
        num_tiles = tl.cdiv(M, BLOCK_SIZE_M) * tl.cdiv(N, BLOCK_SIZE_N)
        for tile_id in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            _matmul_tile(tile_id, a_ptr, b_ptr, c_ptr, bias_ptr, residual_ptr, M, N, K,
                         stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_rm, stride_rn,
                         stride_cs, row_sum_ptr, stride_row_sum_s, SPLIT_K, HAS_BIAS, HAS_RESIDUAL, APPLY_GELU,
                         HAS_ROW_SUM, A_TMA, B_TMA, DOT_DTYPE, ACC_DTYPE, DOT_PRECISION,
                         BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K, GROUP_SIZE_M)
    else:
        _matmul_tile(tl.program_id(0), a_ptr, b_ptr, c_ptr, bias_ptr, residual_ptr, M, N, K,
                     stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_rm, stride_rn,
                     stride_cs, row_sum_ptr, stride_row_sum_s, SPLIT_K, HAS_BIAS, HAS_RESIDUAL, APPLY_GELU,
                     HAS_ROW_SUM, A_TMA, B_TMA, DOT_DTYPE, ACC_DTYPE, DOT_PRECISION,
                     BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K, GROUP_SIZE_M)


def tma_operand(t: torch.Tensor, block_rows: int, block_cols: int):
    """(mode, descriptor) for a 2-D GEMM operand ``t`` [R, C] read in [block_rows, block_cols] tiles: mode 1 with a
    descriptor of t itself when its rows are contiguous, 2 with a descriptor of t^T ([C, R], tile [block_cols,
    block_rows]) when its columns are, 0 (pointer loads, descriptor None) when TMA cannot address it (base or row
    stride not 16-byte aligned, or neither dimension contiguous)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    item = t.element_size()
    if t.data_ptr() % 16 or min(t.shape) == 0:
        return 0, None
    (rows, cols), (s_row, s_col) = t.shape, t.stride()
    if s_col == 1 and (s_row * item) % 16 == 0 and block_cols * item >= 16:
        return 1, TensorDescriptor(t, [rows, cols], [s_row, 1], [block_rows, block_cols])
    if s_row == 1 and (s_col * item) % 16 == 0 and block_rows * item >= 16:
        return 2, TensorDescriptor(t, [cols, rows], [s_col, 1], [block_cols, block_rows])
    return 0, None


def split_k_for(M: int, N: int, K: int, cfg: dict, num_sms: int) -> int:
    """How many K ranges to split C = A @ B into: 1 unless C's tiles fill less than half the device; then enough
    ranges to reach about one program per SM, each at least 4 K-steps long, at most 32."""
    tiles = triton.cdiv(M, cfg["BLOCK_SIZE_M"]) * triton.cdiv(N, cfg["BLOCK_SIZE_N"])
    if 2 * tiles >= num_sms:
        return 1
    by_k = triton.cdiv(K, cfg["BLOCK_SIZE_K"]) // 4
    return max(1, min(32, num_sms // tiles, by_k))


def matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
           gelu: bool = False, out_dtype: torch.dtype | None = None, op_dtype: torch.dtype | None = None,
           out: torch.Tensor | None = None, split_k: int | None = None,
           row_sum: torch.Tensor | None = None, site: str = "gemm") -> torch.Tensor:
    """a [M, K] @ b [K, N] (+ bias [N]) (GELU) (+ residual [M, N]) -> [M, N] in out_dtype (default a's dtype).
    op_dtype: dtype the operands are cast to before tl.dot (default: a's dtype). split_k: K ranges reduced by a sum
    (only without bias / GELU / residual); None picks it from the device's SM count (1 off CUDA).
    site: the call site's name in configs.SITES (its own tuning key, with M bucketed and N, K exact).
    row_sum: a [M] tensor that receives sum_k a[m, k] (accumulated in fp32 / fp64, in the same launch)."""
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
    if row_sum is not None:
        check_tensor(op, "row_sum", row_sum, shape=(M,), dtype=FLOAT_DTYPES, device=dev, unit_stride=True)
    epilogue = bias is not None or residual is not None or gelu
    if split_k is not None and (not isinstance(split_k, int) or split_k < 1 or (split_k > 1 and epilogue)):
        raise ValueError(f"{op}: split_k must be an int >= 1, and 1 with a bias, GELU or residual; got {split_k!r}")
    op_dtype = op_dtype or a.dtype
    out_dtype = out_dtype or a.dtype
    if out is None:
        out = alloc((M, N), out_dtype, dev)
    else:
        check_tensor(op, "out", out, shape=(M, N), dtype=FLOAT_DTYPES, device=dev)
    if M == 0 or N == 0:
        if row_sum is not None:  # no C tile to carry the sums
            row_sum.copy_(a.to(acc_dtype(op_dtype)).sum(1))
        return out
    acc = acc_dtype(op_dtype)
    use_tma = tma_enabled(dev, op_dtype)

    def launch(cfg):
        sms = num_sms(dev)
        splits = split_k or (1 if epilogue or sms is None else split_k_for(M, N, K, cfg, sms))
        tiles = triton.cdiv(M, cfg["BLOCK_SIZE_M"]) * triton.cdiv(N, cfg["BLOCK_SIZE_N"])
        persistent = splits == 1 and persistent_programs(dev, tiles) < tiles
        grid = (persistent_programs(dev, tiles) if persistent else tiles, splits)
        a_mode, a_arg = tma_operand(a, cfg["BLOCK_SIZE_M"], cfg["BLOCK_SIZE_K"]) if use_tma else (0, None)
        b_mode, b_arg = tma_operand(b, cfg["BLOCK_SIZE_K"], cfg["BLOCK_SIZE_N"]) if use_tma else (0, None)
        target = out if splits == 1 else alloc((splits, M, N), acc, dev)  # fp32 partials
        stride_cs = 0 if splits == 1 else target.stride(0)
        sums = None if row_sum is None else row_sum if splits == 1 else alloc((splits, M), acc, dev)
        stride_sums = sums.stride(0) if sums is not None and splits > 1 else 0
        with guarded(op, out=target, sums=sums) as w:
            bias_t = bias if bias is not None else w.out
            res_t = residual if residual is not None else w.out
            sums_t = w.sums if sums is not None else w.out
            _matmul_kernel[grid](
                a_arg if a_mode else a, b_arg if b_mode else b, w.out, bias_t, res_t, M, N, K,
                a.stride(0), a.stride(1), b.stride(0), b.stride(1), target.stride(-2), target.stride(-1),
                res_t.stride(-2), res_t.stride(-1), stride_cs, sums_t, stride_sums, SPLIT_K=splits,
                HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, APPLY_GELU=gelu,
                HAS_ROW_SUM=row_sum is not None, A_TMA=a_mode, B_TMA=b_mode, PERSISTENT=persistent,
                DOT_DTYPE=dot_dtype(op_dtype), ACC_DTYPE=tl_dtype(acc), DOT_PRECISION=dot_precision(op_dtype, dev),
                **launch_kwargs(cfg, group=True),
            )
        if splits > 1:
            for total, partials in ((out, target), (row_sum, sums)):
                if total is None:
                    continue
                if total.dtype == acc:
                    torch.sum(partials, dim=0, out=total)
                else:
                    total.copy_(partials.sum(0))  # the partials' sum, rounded once to the result's dtype

    # (out may be the residual itself: put it back after autotune's timing runs)
    launch(tune(site, M, dev, op_dtype, launch, restore=(out,) if residual is not None else (), n=N, k=K))
    return out
