"""The csrc/ CUDA kernels on a GPU, against torch and the reference backend (paper eqs. 1-8).

GPU-only: skipped cleanly where there is no CUDA device or the extension cannot be built/loaded
(geoalign_kernels.cuda.extension.extension_error() says why). Run with `pytest -m gpu tests/test_cuda_kernels.py`.
Edge cases: L=1, exact ties, K=M, M not a power of two, M=32, M=1, -inf logits, unaligned and odd-width rows (the
scalar fallback), int32 gather_index, every input/parameter dtype pair, pairs spanning several row-list blocks.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from geoalign_kernels.cuda import extension as cuda_extension, ops as cuda_ops
from geoalign_kernels import guard
from geoalign_kernels.runtime import acc_dtype
from geoalign.routing import bank_rows, topk_lower_index

from helpers import (SHAPES, TOL, Shape, assert_parity, force_ties, make_fusion, make_inputs, rel_err,
                          run_backend, run_cuda_backend)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEV = "cuda"
FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
ALPHA_TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-6, torch.bfloat16: 1e-6}


@pytest.fixture(scope="module", autouse=True)
def extension():
    if not cuda_extension.cuda_backend_available():
        pytest.skip(f"the geoalign CUDA extension is unavailable: {cuda_extension.extension_error()}")


def gen(seed):
    return torch.Generator(device="cpu").manual_seed(seed)


# ------------------------------------------------------------------------------------------------- routing
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("L,M,K", [(1, 3, 1), (1, 12, 2), (37, 12, 2), (1000, 13, 3), (65, 32, 5), (9, 1, 1),
                                   (17, 4, 4), (33, 7, 7), (300, 17, 2), (5, 32, 32)])
def test_route_matches_torch(dtype, L, M, K):
    logits = (torch.randn(L, M, generator=gen(L * 100 + M)) * 3).to(dtype).to(DEV)
    idx, alpha = cuda_ops.cuda_route(logits, K)
    want_idx = topk_lower_index(logits, K)
    want_alpha = torch.softmax(logits.gather(1, want_idx).to(acc_dtype(dtype)), dim=-1)
    assert idx.dtype == torch.int64 and alpha.dtype == want_alpha.dtype
    assert torch.equal(idx, want_idx)
    assert rel_err(alpha, want_alpha) <= ALPHA_TOL[dtype]


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("M,K", [(12, 2), (12, 12), (5, 3), (32, 4), (3, 3)])
def test_route_ties_lower_index_wins(dtype, M, K):
    # few distinct values: most rows have ties at the cut, and equal values inside the kept set
    logits = torch.randint(-2, 3, (513, M), generator=gen(M)).to(dtype).to(DEV)
    logits[0] = 1.0  # a row of all-equal logits: 0..K-1 win
    logits[1, : M // 2] = float("-inf")  # -inf logits are still candidates, ranked last
    idx, alpha = cuda_ops.cuda_route(logits, K)
    want_idx = topk_lower_index(logits, K)
    assert torch.equal(idx, want_idx)
    assert idx[0].tolist() == list(range(K))
    want_alpha = torch.softmax(logits.gather(1, want_idx).to(alpha.dtype), dim=-1)
    assert torch.equal(torch.isnan(alpha), torch.isnan(want_alpha))
    ok = ~torch.isnan(want_alpha)
    assert rel_err(alpha[ok], want_alpha[ok]) <= ALPHA_TOL[dtype]


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_route_special_logits_follow_the_policy(dtype):
    """-inf, +inf and NaN logits (geoalign.routing's policy): ids distinct and < M, NaN first, ties -> lower index;
    alpha as torch.softmax over the kept logits (NaN rows included)."""
    inf, nan = float("inf"), float("nan")
    rows = [[0.5, -inf, -inf, -inf, -inf, -inf], [-inf] * 6, [nan, 1.0, 2.0, nan, 3.0, -inf], [nan] * 6,
            [inf, 1.0, inf, nan, -inf, 2.0], [1.0, 1.0, 1.0, -inf, 1.0, 1.0], [-inf, 2.0, -inf, 2.0, -inf, -inf]]
    logits = torch.tensor(rows, dtype=torch.float64).to(dtype).to(DEV)
    for K in range(1, 7):
        idx, alpha = cuda_ops.cuda_route(logits, K)
        want_idx = topk_lower_index(logits, K)
        assert torch.equal(idx, want_idx), (K, idx.tolist(), want_idx.tolist())
        assert all(len(set(r)) == K for r in idx.tolist())
        want_alpha = torch.softmax(logits.gather(1, want_idx).to(alpha.dtype), dim=-1)
        assert torch.equal(alpha.isnan(), want_alpha.isnan())
        ok = ~want_alpha.isnan()
        assert rel_err(alpha[ok], want_alpha[ok]) <= ALPHA_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("L,M,K", [(1, 3, 2), (40, 12, 2), (31, 13, 13), (70, 32, 3)])
def test_route_backward_matches_autograd(dtype, L, M, K):
    logits = (torch.randn(L, M, generator=gen(M)) * 3).to(dtype).to(DEV).requires_grad_()
    d_alpha = torch.randn(L, K, generator=gen(1)).to(acc_dtype(dtype)).to(DEV)
    _idx, alpha = cuda_ops.cuda_route(logits, K)
    (got,) = torch.autograd.grad(alpha, logits, d_alpha)
    ref_logits = logits.detach().clone().requires_grad_()
    ref_alpha = torch.softmax(ref_logits.gather(1, topk_lower_index(ref_logits, K)).to(alpha.dtype), dim=-1)
    (want,) = torch.autograd.grad(ref_alpha, ref_logits, d_alpha)
    assert got.dtype == dtype
    assert rel_err(got, want) <= (1e-12 if dtype == torch.float64 else 1e-6)
    assert torch.equal(got == 0, want == 0)  # exact zeros off the Top-K


# ------------------------------------------------------------------------------------------------- row lists
@pytest.mark.parametrize("L,M,K", [(1, 3, 1), (1, 12, 12), (37, 12, 2), (5000, 12, 2), (20000, 13, 3),
                                   (777, 32, 32), (64, 5, 5), (9, 1, 1)])
def test_bank_rows_matches_torch(L, M, K):
    logits = torch.randn(L, M, generator=gen(L + M)).to(DEV)
    logits[:, M // 2:] -= 5.0  # some layers empty or nearly so
    topk_idx = topk_lower_index(logits, K)
    got = cuda_ops.bank_rows_cuda(topk_idx, M)
    want = bank_rows(topk_idx, M)
    assert torch.equal(got.offsets, want.offsets)
    assert torch.equal(got.tokens, want.tokens)
    assert torch.equal(got.slots, want.slots)
    _tok, _sl, counts, offsets = cuda_ops.cuda_bank_rows(topk_idx, M)
    assert counts.tolist() == torch.bincount(topk_idx.reshape(-1), minlength=M).tolist()
    assert torch.equal(offsets, want.offsets)


def test_bank_rows_out_of_range_ids(monkeypatch):
    """Guard mode rejects ids outside [0, M); without it they are dropped (the offsets count only placed pairs),
    never written anywhere."""
    topk_idx = torch.tensor([[0, 1], [5, 1]], device=DEV)
    with pytest.raises(guard.GuardError, match=r"topk_idx must lie in \[0, 3\)"):
        cuda_ops.bank_rows_cuda(topk_idx, 3)
    monkeypatch.setattr(guard, "ENABLED", False)
    rows = cuda_ops.bank_rows_cuda(topk_idx, 3)
    assert rows.offsets.tolist() == [0, 1, 3, 3]


# ------------------------------------------------------------------------------------------------- gather + LN
def ln_reference(layer, gather_index, tokens, weight, bias, eps):
    rows = layer[gather_index.long()[tokens]].reshape(-1, layer.shape[1])
    x = F.layer_norm(rows.to(weight.dtype), (layer.shape[1],), weight, bias, eps)
    return x.reshape(tokens.numel(), -1), rows


def x_tol(dtype):
    return {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]


@pytest.mark.parametrize("in_dtype", FLOATS, ids=str)
@pytest.mark.parametrize("out_dtype", FLOATS, ids=str)
def test_gather_layer_norm_dtypes(in_dtype, out_dtype):
    N, D, L, G, n = 300, 2048, 96, 4, 50
    layer = (torch.randn(N, D, generator=gen(0)) * 3 + 1).to(in_dtype).to(DEV)
    gather_index = torch.randint(0, N, (L, G), generator=gen(1)).to(DEV)
    tokens = torch.randperm(L, generator=gen(2))[:n].sort().values.to(DEV)
    weight = (1 + 0.5 * torch.randn(D, generator=gen(3))).to(out_dtype).to(DEV)
    bias = (0.5 * torch.randn(D, generator=gen(4))).to(out_dtype).to(DEV)
    x, mean, rstd, raw = cuda_ops.cuda_gather_layer_norm(layer, gather_index, tokens, weight, bias, 1e-5, True)
    want, rows = ln_reference(layer, gather_index, tokens, weight, bias, 1e-5)
    assert x.dtype == out_dtype and x.shape == (n, G * D)
    assert rel_err(x, want) <= x_tol(out_dtype)
    assert torch.equal(raw, rows)
    v = rows.to(out_dtype).to(mean.dtype)
    assert rel_err(mean, v.mean(1)) <= 1e-5 and rel_err(rstd, torch.rsqrt(v.var(1, unbiased=False) + 1e-5)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", ["odd_width", "unaligned_rows", "strided_layer", "int32_index", "one_token"])
def test_gather_layer_norm_scalar_paths(dtype, case):
    N, D, L, G = 200, 2048, 40, 8
    if case == "odd_width":
        D = 1001  # not a multiple of the vector width: scalar path
    base = torch.randn(N, D + 3, generator=gen(5)).to(dtype).to(DEV)
    if case == "unaligned_rows":
        layer = base[:, 1:D + 1]  # rows start 1 element past a 16-byte boundary
    elif case == "strided_layer":
        layer = base[:, :D]  # aligned rows with a padded row stride
    else:
        layer = base[:, :D].contiguous()
    gather_index = torch.randint(0, N, (L, G), generator=gen(6)).to(DEV)
    if case == "int32_index":
        gather_index = gather_index.to(torch.int32)
    tokens = torch.arange(0, L, 3, device=DEV) if case != "one_token" else torch.tensor([L - 1], device=DEV)
    weight = (1 + 0.5 * torch.randn(D, generator=gen(7))).to(dtype).to(DEV)
    bias = (0.5 * torch.randn(D, generator=gen(8))).to(dtype).to(DEV)
    x, _mean, _rstd, raw = cuda_ops.cuda_gather_layer_norm(layer, gather_index, tokens, weight, bias, 1e-5, True)
    want, rows = ln_reference(layer, gather_index, tokens, weight, bias, 1e-5)
    assert rel_err(x, want) <= x_tol(dtype)
    assert torch.equal(raw, rows)


def test_gather_layer_norm_large_offsets():
    """Row offsets past 2^31 elements (int64 index maths): 1.1M rows of 2048 bf16 = 4.5 GB."""
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2 ** 30:
        pytest.skip("needs ~6 GB free")
    N, D = 1_100_000, 2048
    layer = torch.empty(N, D, dtype=torch.bfloat16, device=DEV)
    layer[-5:] = torch.randn(5, D, generator=gen(9)).to(torch.bfloat16).to(DEV)
    gather_index = torch.tensor([[N - 1, N - 2, N - 3, N - 5]], device=DEV)
    tokens = torch.tensor([0], device=DEV)
    weight = torch.ones(D, dtype=torch.bfloat16, device=DEV)
    bias = torch.zeros(D, dtype=torch.bfloat16, device=DEV)
    x, *_ = cuda_ops.cuda_gather_layer_norm(layer, gather_index, tokens, weight, bias, 1e-5, False)
    want, _ = ln_reference(layer, gather_index, tokens, weight, bias, 1e-5)
    assert rel_err(x, want) <= x_tol(torch.bfloat16)


# ------------------------------------------------------------------------------------------------- the backend
def run_cuda(fusion, q, layers, gather_index, grad_out):
    return run_cuda_backend(fusion, q, layers, gather_index, grad_out)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_parity_with_reference(dtype, shape):
    fusion = make_fusion(shape, dtype, device=DEV)
    q, layers, gather_index = make_inputs(shape, dtype, device=DEV)
    grad_out = torch.randn(q.shape, dtype=dtype, generator=gen(7)).to(DEV)
    ref = run_backend(fusion, "reference", q, layers, gather_index, grad_out)
    fast = run_cuda(fusion, q, layers, gather_index, grad_out)
    assert_parity(fast, ref, TOL[dtype], f"cuda/{dtype}/{shape}")


def test_parity_with_ties_and_k_equals_m():
    shape = Shape(L=21, M=6, K=6, G=8)
    fusion = make_fusion(shape, torch.float64, device=DEV)
    force_ties(fusion, [0, 2, 5])
    q, layers, gather_index = make_inputs(shape, torch.float64, device=DEV)
    grad_out = torch.randn(q.shape, dtype=torch.float64, generator=gen(3)).to(DEV)
    ref = run_backend(fusion, "reference", q, layers, gather_index, grad_out)
    fast = run_cuda(fusion, q, layers, gather_index, grad_out)
    assert_parity(fast, ref, TOL[torch.float64], "cuda/ties")


def test_bf16_paper_widths_close_to_torch_backend():
    shape = Shape(L=256, M=12, K=2, G=4, D=2048, Dg=2048, H=4096, R=512)
    fusion = make_fusion(shape, torch.bfloat16, device=DEV)
    q, layers, gather_index = make_inputs(shape, torch.bfloat16, device=DEV)
    grad_out = torch.randn(q.shape, generator=gen(11)).to(torch.bfloat16).to(DEV)
    ref = run_backend(fusion, "torch", q, layers, gather_index, grad_out)
    fast = run_cuda(fusion, q, layers, gather_index, grad_out)
    assert torch.equal(fast[1].topk_idx, ref[1].topk_idx)
    assert rel_err(fast[0], ref[0]) <= 2e-2 and rel_err(fast[2], ref[2]) <= 5e-2
    for name, g in fast[3].items():
        assert rel_err(g, ref[3][name]) <= 5e-2, name
