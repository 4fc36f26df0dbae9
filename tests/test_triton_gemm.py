"""The GEMM kernel (geoalign_kernels.gemm: split-K matmul with a row-sum output, and the split-K rule) against torch.

Conventions shared by every tests/test_triton_*.py (interpreter shapes, error metric, tolerances, poisoned outputs):
tests/triton_helpers.py.
"""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("poison_outputs")]

from helpers import rel_err  # noqa: E402


@pytest.mark.parametrize("split_k", [1, 2, 3, 7, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_split_k_matmul(split_k, dtype):
    """C = A @ B with K split into ranges reduced by a sum, against torch in fp64: odd sizes, K not a multiple of the
    block (32 under the interpreter), strided (transposed) operands as the router's dW2 = dS^T H, and more splits
    than K-steps (40 > 517/32: the last ranges are empty and must add zero). Into a poisoned output, with A's row
    sums (the router's d_b2 = sum_l dS) from the same launch into a poisoned vector."""
    from geoalign_kernels.gemm import matmul

    gen = torch.Generator().manual_seed(split_k)
    ds = torch.randn(517, 12, generator=gen, dtype=torch.float64).to(dtype)  # [L, M]
    hid = torch.randn(517, 37, generator=gen, dtype=torch.float64).to(dtype)  # [L, R]
    out = torch.full((12, 37), float("nan"), dtype=dtype)
    sums = torch.full((12,), float("nan"), dtype=dtype)
    got = matmul(ds.t(), hid, out=out, split_k=split_k, row_sum=sums)
    assert got is out
    expected = ds.double().t() @ hid.double()
    tol = {torch.float32: 1e-6, torch.float16: 1e-3}[dtype]
    assert rel_err(got, expected) < tol
    assert rel_err(sums, ds.double().sum(0)) < tol


def test_split_k_with_an_epilogue_is_refused():
    from geoalign_kernels.gemm import matmul

    a, b = torch.randn(4, 64), torch.randn(64, 5)
    with pytest.raises(ValueError, match="split_k"):
        matmul(a, b, bias=torch.randn(5), split_k=2)
    with pytest.raises(ValueError, match="split_k"):
        matmul(a, b, split_k=0)


def test_split_k_rule():
    """Split only when C's tiles fill less than half the SMs; about one program per SM, >= 4 K-steps each, <= 32."""
    from geoalign_kernels.gemm import split_k_for

    cfg = dict(BLOCK_SIZE_M=64, BLOCK_SIZE_N=128, BLOCK_SIZE_K=64)
    assert split_k_for(12, 512, 8064, cfg, 132) == 31  # router dW2 at paper scale: 4 tiles, 126 K-steps // 4
    assert split_k_for(12, 512, 1024, cfg, 132) == 4  # 16 K-steps: 4 of 4 each
    assert split_k_for(2048, 2048, 8064, cfg, 132) == 1  # 512 tiles: no split
    assert split_k_for(12, 512, 100, cfg, 132) == 1  # too short to split
