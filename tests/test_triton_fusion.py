"""The Triton backend end to end (geoalign.backends.triton_backend: every kernel of geoalign_kernels in one fusion
forward + backward) against the torch sparse backend and the dense reference.

Routing indices must match exactly (the kernel rounds logits to the parameter dtype as nn.Linear does).
Conventions shared by every tests/test_triton_*.py (interpreter shapes, error metric, tolerances, poisoned outputs):
tests/triton_helpers.py.
"""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("poison_outputs")]

from helpers import TRITON_TOL, assert_close  # noqa: E402
from triton_helpers import DTYPES, fusion_case, run_fusion  # noqa: E402
from geoalign_kernels import configs  # noqa: E402


def check_fusion_parity(fusion, q, layers, gather_index, dtype, zero_grads=()):
    """zero_grads: parameter names whose gradient is mathematically 0 here (both sides are rounding noise: checked
    against an absolute bound relative to the scale of dq)."""
    ref = run_fusion(fusion, q, layers, gather_index, "torch")
    out = run_fusion(fusion, q, layers, gather_index, "triton")
    assert out[1].topk_idx.dtype == torch.int64
    assert torch.equal(out[1].topk_idx, ref[1].topk_idx)
    assert out[1].alpha.dtype == ref[1].alpha.dtype
    assert_close(out[1].alpha, ref[1].alpha, TRITON_TOL[dtype], "alpha")
    assert_close(out[0], ref[0], TRITON_TOL[dtype], "q_hat")
    assert_close(out[2], ref[2], TRITON_TOL[dtype], "dq")
    scale = ref[2].abs().max().item()
    for name in ref[3]:
        if name in zero_grads:
            for grads in (out[3], ref[3]):
                assert grads[name].abs().max().item() <= TRITON_TOL[dtype] * scale, name
        else:
            assert_close(out[3][name], ref[3][name], TRITON_TOL[dtype], f"grad {name}")
    return ref, out


SHAPES = {
    # odd L and D' crossing the 32-wide blocks, H=48 crosses too
    "odd": dict(L=37, D=40, Dg=37, H=48, M=4, K=2, G=4),
    # L=1, K=1, G=8 (video path)
    "L1_K1_G8": dict(L=1, D=24, Dg=20, H=40, M=3, K=1, G=8),
    # K = M: every token uses every layer; 39 pairs per layer cross the 32-row pair block
    "K_eq_M": dict(L=39, D=24, Dg=33, H=24, M=2, K=2, G=4),
    # a single bank layer
    "M1": dict(L=5, D=16, Dg=16, H=16, M=1, K=1, G=4),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_fusion_parity(shape, dtype):
    fusion, q, layers, gather_index = fusion_case(dtype, **SHAPES[shape], seed=list(SHAPES).index(shape))
    check_fusion_parity(fusion, q, layers, gather_index, dtype)


def test_fusion_parity_fp64_matches_reference():
    """fp64 against the dense reference (the oracle), forward and every gradient."""
    dtype = torch.float64
    fusion, q, layers, gather_index = fusion_case(dtype, L=11, D=24, Dg=19, H=24, M=3, K=2, G=4, seed=3)
    ref = run_fusion(fusion, q, layers, gather_index, "reference")
    out = run_fusion(fusion, q, layers, gather_index, "triton")
    assert torch.equal(out[1].topk_idx, ref[1].topk_idx)
    assert_close(out[1].alpha, ref[1].alpha, TRITON_TOL[dtype], "alpha")
    assert_close(out[0], ref[0], TRITON_TOL[dtype], "q_hat")
    assert_close(out[2], ref[2], TRITON_TOL[dtype], "dq")
    for name in ref[3]:
        assert_close(out[3][name], ref[3][name], TRITON_TOL[dtype], f"grad {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fusion_forced_ties_and_empty_layers(dtype):
    """All router logits equal: lower index wins, so layers >= K get no routed pairs (their LN grads are zero)."""
    fusion, q, layers, gather_index = fusion_case(dtype, L=12, D=24, Dg=20, H=24, M=4, K=2, G=4, seed=5)
    with torch.no_grad():
        fusion.router.fc2.weight.copy_(fusion.router.fc2.weight[:1].expand_as(fusion.router.fc2.weight))
        fusion.router.fc2.bias.fill_(0.25)
    # identical router rows: d_hid = (sum_m dS_m) * V2[0] = 0, so router.fc1's gradient is exactly 0
    ref, out = check_fusion_parity(fusion, q, layers, gather_index, dtype,
                                   zero_grads=("router.fc1.weight", "router.fc1.bias"))
    assert torch.equal(out[1].topk_idx, torch.arange(2).expand(12, 2))
    for i in (2, 3):
        assert torch.count_nonzero(out[3][f"layer_norms.{i}.weight"]) == 0
        assert torch.count_nonzero(out[3][f"layer_norms.{i}.bias"]) == 0


def test_fusion_parity_bf16_interpreter():
    """bf16 parameters and layers (on CPU the kernels upcast bf16 dot operands to fp32; see utils.dot_dtype)."""
    dtype = torch.bfloat16
    fusion, q, layers, gather_index = fusion_case(dtype, L=21, D=24, Dg=20, H=40, M=3, K=2, G=4, seed=7)
    check_fusion_parity(fusion, q, layers, gather_index, dtype)


def test_small_blocks_cross_pair_boundary():
    """Force 16-wide blocks everywhere (pairs, H, D', router rows) at the 'odd' shape."""
    configs.OVERRIDE.update(BLOCK_SIZE_M=16, BLOCK_SIZE_N=16, BLOCK_SIZE_K=16)
    try:
        fusion, q, layers, gather_index = fusion_case(torch.float32, **SHAPES["odd"], seed=11)
        check_fusion_parity(fusion, q, layers, gather_index, torch.float32)
    finally:
        configs.OVERRIDE.clear()


def test_streaming_any_order_no_grad():
    """Streaming under no_grad (nothing saved), layers added in reverse order: same Q_hat as the torch backend."""
    dtype = torch.float32
    fusion, q, layers, gather_index = fusion_case(dtype, L=21, D=24, Dg=20, H=40, M=3, K=2, G=4, seed=7)
    with torch.no_grad():
        expected = fusion(q, layers, gather_index, backend="torch")
        stream = fusion.begin(q, gather_index, backend="triton")
        for i in reversed(range(3)):
            stream.add(i, layers[i])
        q_hat, _ = stream.finish()
    assert_close(q_hat, expected, TRITON_TOL[dtype], "q_hat")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", ["aligned", "odd"])
def test_tma_path_matches_the_torch_backend(monkeypatch, shape, dtype):
    """GEOALIGN_TMA=1: the shared GEMM, GEMM1 (training and inference) and the weight-gradient kernel read their
    operands through TMA descriptors where the operand allows it (rows 16-byte aligned), under the interpreter's
    emulation of TMA: forward, inference and every gradient against the torch backend. "aligned": D' = 36, H = 48,
    D = 40 (every operand takes TMA; K and N tails read the zero fill); "odd": G*D' = 3 * 37 (rows of 444 / 222
    bytes: GEMM1 and the weight gradient fall back to pointer loads, the output GEMMs keep TMA where they can)."""
    from geoalign_kernels import bank

    monkeypatch.setattr(configs, "TMA", "1")
    taken = {"gemm1": [], "weight_grad": []}
    real = bank._tma_operands

    def spy(a, a_box, b, b_box, dev):
        result = real(a, a_box, b, b_box, dev)
        taken["gemm1" if b.shape[0] == 48 else "weight_grad"].append(result[2])  # b: W1 [H = 48, ...] or x_hat
        return result
    monkeypatch.setattr(bank, "_tma_operands", spy)
    Dg, G = (36, 4) if shape == "aligned" else (37, 3)
    fusion, q, layers, gather_index = fusion_case(dtype, L=37, D=40, Dg=Dg, H=48, M=3, K=2, G=G, seed=13)
    _, out = check_fusion_parity(fusion, q, layers, gather_index, dtype)
    # the weight gradient's TMA loop and its masked tail both ran: some layer has a whole 32-pair step (the
    # interpreter's BLOCK_SIZE_K) and some layer a partial one
    pairs = torch.bincount(out[1].topk_idx.flatten(), minlength=3)
    assert (pairs >= 32).any() and (pairs % 32 != 0).any(), pairs
    with torch.no_grad():  # inference: GEMM1 per layer into h_bar
        expected = fusion(q, layers, gather_index, backend="torch")
        got = fusion(q, layers, gather_index, backend="triton")
    assert_close(got, expected, TRITON_TOL[dtype], "q_hat (inference)")
    # aligned: GEMM1 (training and every inference layer) and the weight gradient took TMA; odd: neither could
    assert taken["gemm1"] and taken["weight_grad"]
    assert set(taken["gemm1"]) | set(taken["weight_grad"]) == {shape == "aligned"}, taken
