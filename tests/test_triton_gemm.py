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


def _operand(rows, cols, layout, gen, dtype):
    """A [rows, cols] operand: "row" row-major, "col" a transposed row-major tensor (unit row stride), "odd" rows of
    an odd width (a row stride TMA cannot take), all with fresh random values."""
    if layout == "row":
        return torch.randn(rows, cols, generator=gen, dtype=torch.float64).to(dtype)
    if layout == "col":
        return torch.randn(cols, rows, generator=gen, dtype=torch.float64).to(dtype).t()
    return torch.randn(rows, cols + 3, generator=gen, dtype=torch.float64).to(dtype)[:, :cols]


@pytest.mark.parametrize("persistent", [False, True], ids=["grid", "persistent"])
@pytest.mark.parametrize("tma", ["0", "1"], ids=["pointers", "tma"])
@pytest.mark.parametrize("layouts", [("row", "row"), ("col", "col"), ("row", "col"), ("odd", "row")],
                         ids=lambda v: "-".join(v))
def test_tma_and_persistent_paths_match_the_pointer_path(monkeypatch, tma, persistent, layouts):
    """The shared GEMM through TMA descriptors (A / B row-major: a descriptor of the operand; column-major: of its
    transpose, transposed in registers) and on a persistent grid, against torch in fp64: M, N, K not multiples of the
    block (boxes past the edge read zeros), the epilogue (bias, GELU, residual) and, without it, split-K ranges with
    A's row sums, into poisoned outputs. Under the interpreter the descriptors run through Triton's own emulation of
    TMA loads (bounds and zero fill included); the sm_90 build is aot_check's."""
    from geoalign_kernels import configs
    from geoalign_kernels.gemm import matmul, tma_operand

    monkeypatch.setattr(configs, "TMA", tma)
    monkeypatch.setattr(configs, "PERSISTENT", persistent)
    gen = torch.Generator().manual_seed(3)
    M, N, K = 68, 52, 100  # not multiples of the 32-wide blocks; row strides of 16-byte multiples for TMA
    a = _operand(M, K, layouts[0], gen, torch.float32)
    b = _operand(K, N, layouts[1], gen, torch.float32)
    expected_modes = {"row": 1, "col": 2, "odd": 0}
    assert tma_operand(a, 32, 32)[0] == expected_modes[layouts[0]]
    assert tma_operand(b, 32, 32)[0] == expected_modes[layouts[1]]
    bias = torch.randn(N, generator=gen)
    residual = torch.randn(M, N, generator=gen)
    ref = a.double() @ b.double()
    got = matmul(a, b, bias=bias, residual=residual, gelu=True)
    assert rel_err(got, torch.nn.functional.gelu(ref + bias.double()) + residual.double()) < 1e-6
    for split_k in (1, 3):
        sums = torch.full((M,), float("nan"))
        got = matmul(a, b, split_k=split_k, row_sum=sums)
        assert rel_err(got, ref) < 1e-6, split_k
        assert rel_err(sums, a.double().sum(1)) < 1e-6


def test_tma_choice_by_capability_and_flag(monkeypatch):
    """GEOALIGN_TMA=auto takes TMA on sm_90+ only (never under the interpreter), for the tensor-core dtypes; 1 / 0
    force it; anything else is refused. The persistent grid has at most one program per SM, and is off unless asked
    for."""
    from geoalign_kernels import configs
    from geoalign_kernels.gemm import tma_operand

    cpu = torch.device("cpu")
    monkeypatch.setattr(configs, "TMA", "auto")
    assert configs.tma_enabled(cpu, torch.bfloat16) is False  # the interpreter
    monkeypatch.setattr(configs, "INTERPRET", False)
    monkeypatch.setattr(configs, "PLANNING", ("NVIDIA H100 80GB HBM3", 132, 9))
    assert configs.tma_enabled(cpu, torch.bfloat16) is True and configs.tma_enabled(cpu, torch.float16) is True
    # the exact fp32 / fp64 FMA path keeps pointer loads (its TMA builds spill); fp32 on TF32 tensor cores takes TMA
    assert configs.tma_enabled(cpu, torch.float32) is False and configs.tma_enabled(cpu, torch.float64) is False
    monkeypatch.setattr(configs.runtime, "TF32", True)
    assert configs.tma_enabled(cpu, torch.float32) is True
    monkeypatch.setattr(configs.runtime, "TF32", False)
    monkeypatch.setattr(configs, "PLANNING", ("NVIDIA A100", 108, 8))
    assert configs.tma_enabled(cpu, torch.bfloat16) is False
    monkeypatch.setattr(configs, "TMA", "0")
    monkeypatch.setattr(configs, "PLANNING", ("NVIDIA H100 80GB HBM3", 132, 9))
    assert configs.tma_enabled(cpu, torch.bfloat16) is False
    monkeypatch.setattr(configs, "TMA", "yes")
    with pytest.raises(ValueError, match="GEOALIGN_TMA must be auto, 0 or 1; got 'yes'"):
        configs.tma_enabled(cpu, torch.bfloat16)
    assert configs.persistent_programs(cpu, 1000) == 1000  # off by default
    monkeypatch.setattr(configs, "PERSISTENT", True)
    assert configs.persistent_programs(cpu, 1000) == 132 and configs.persistent_programs(cpu, 5) == 5
    # TMA needs a 16-byte aligned base and row stride and one contiguous dimension
    x = torch.randn(64, 64)
    assert tma_operand(x, 32, 32)[0] == 1 and tma_operand(x.t(), 32, 32)[0] == 2
    assert tma_operand(x[:, 1:], 32, 32)[0] == 0  # base 4 bytes past an aligned address
    assert tma_operand(x[::2, ::2], 32, 32)[0] == 0  # no unit stride
