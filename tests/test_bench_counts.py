"""bench/counts.py: the counter itself (it must see kernels, syncs and Triton launches, and skip views), and the
figures issue 17 sets targets on: the torch backend's backward/forward matmul FLOPs equal the formula (no dx GEMM),
and a triton fusion step (forward + backward, input value checks off, guard off) makes no host sync, with two
launches per bank layer forward and two for the whole bank's backward."""
from __future__ import annotations

import pytest
import torch

from bench.counts import KernelCounter, count_backend, formula_flops
from bench.shapes import SHAPES

TINY = SHAPES["tiny"]


def test_counter_counts_kernels_and_syncs_and_skips_views():
    a, b = torch.randn(5, 6), torch.randn(6, 3)
    with KernelCounter() as c:
        y = a @ b  # one kernel
        y = (y + 1).view(-1)  # one kernel, one view
        _ = y[2:4]  # a view
        torch.empty(3)  # an allocation
    assert c.aten_kernels == 2, c.ops
    assert c.host_syncs == 0
    with KernelCounter() as c:
        float(y.sum())  # sum + _local_scalar_dense
        y.tolist()
        torch.nonzero(y > 0)
        torch.bincount(torch.tensor([0, 2, 2]))
    assert c.host_syncs == 4, c.syncs
    assert c.syncs["tolist"] == 1 and c.syncs["nonzero"] == 1 and c.syncs["bincount"] == 1


@pytest.mark.triton
def test_counter_counts_triton_launches_inside_custom_ops(monkeypatch):
    from geoalign_kernels import guard
    from geoalign_kernels.output import output_op

    monkeypatch.setattr(guard, "ENABLED", False)  # (guard mode's canary checks are kernels and syncs of their own)
    L, H, D = 5, 4, 6
    q, h_bar = torch.randn(L, D), torch.randn(L, H)
    w2, b2, w_out = torch.randn(D, H), torch.randn(D), torch.randn(D, D)
    with KernelCounter() as c:
        q_hat, _ = output_op(q, h_bar, w2, b2, w_out)
    assert c.triton_launches == 2, c.ops  # F_hat = W2 h_bar + b2, then Q_hat = Q + W_out F_hat
    assert c.ops.get("copy_", 0) == 0, "the interpreter's argument copies are not kernels"
    torch.testing.assert_close(q_hat, q + (h_bar @ w2.t() + b2) @ w_out.t(), rtol=1e-5, atol=1e-5)


def test_torch_backend_matmul_flops_equal_the_formula(monkeypatch):
    """Measured by FlopCounterMode: the forward is the sparse formula exactly, and so is the backward with one bank
    GEMM (dz^T x_hat), so the ratio is the formula's (1.17 at paper widths, <= 1.25; the reference's is 2.0)."""
    from geoalign_kernels import guard

    monkeypatch.setattr(guard, "ENABLED", False)
    row = count_backend(TINY, 1, "torch", torch.float32, torch.device("cpu"))
    f = formula_flops(TINY, row["L"])
    assert row["forward"]["matmul_flops_measured"] == f["forward"]
    # plus the torch backend's two small GEMMs for the beta terms (sum_j db1_j beta_j^T and dbeta = db1 (sum_g W1)),
    # 2 M H D' FLOPs each: 0.7% here, 0.02% at paper widths
    beta_gemms = 2 * 2 * TINY.num_layers * TINY.projector_hidden * TINY.geo_dim
    assert row["backward"]["matmul_flops_measured"] == f["backward"] + beta_gemms
    assert formula_flops(SHAPES["paper"], 252)["backward_over_forward"] <= 1.25
    ref = count_backend(TINY, 1, "reference", torch.float32, torch.device("cpu"))
    assert ref["backward_over_forward_matmul_flops"] == pytest.approx(2.0)
    assert row["forward"]["host_syncs"] == 1 and row["forward"]["syncs"] == {"tolist": 1}  # the layer offsets
    assert row["backward"]["host_syncs"] == 0


def test_counts_refuse_guard_mode(monkeypatch):
    from geoalign_kernels import guard

    monkeypatch.setattr(guard, "ENABLED", True)
    with pytest.raises(RuntimeError, match="GEOALIGN_GUARD"):
        count_backend(TINY, 1, "torch", torch.float32, torch.device("cpu"))


@pytest.mark.triton
def test_triton_fusion_step_makes_no_host_sync(monkeypatch):
    from geoalign_kernels import guard

    monkeypatch.setattr(guard, "ENABLED", False)
    M = TINY.num_layers
    row = count_backend(TINY, 1, "triton", torch.float32, torch.device("cpu"))
    fwd, bwd = row["forward"], row["backward"]
    assert fwd["host_syncs"] == 0, fwd["syncs"]
    assert bwd["host_syncs"] == 0, bwd["syncs"]
    # training: each streamed layer is normalised; GEMM1 runs once for every layer, then h_bar from z
    assert fwd["ops"]["triton::_gather_normalize_kernel"] == M and fwd["ops"]["triton::_bank_gemm1_kernel"] == 1
    assert fwd["ops"]["triton::_bank_combine_kernel"] == 1 and fwd["ops"]["triton::_bank_rows_kernel"] == 1
    for kernel in ("_bank_dz_kernel", "_bank_weight_grad_kernel", "_bank_backward_finish_kernel"):
        assert bwd["ops"][f"triton::{kernel}"] == 1, kernel
    assert "zeros" not in bwd["ops"], bwd["ops"]  # no zero-filled gradient for the unused f_hat / topk_idx
    assert row["launches_per_step"] <= 40, (fwd["ops"], bwd["ops"])  # 36 measured (bench/results/cpu/counts.json)


@pytest.mark.triton
def test_triton_inference_runs_gemm1_per_layer(monkeypatch):
    """Without a gradient nothing is taped: each layer's GEMM1 runs as the layer arrives (memory: one layer's
    pairs), so the forward launches M GEMM1s and no combine."""
    from bench.fusion_case import make_case
    from geoalign_kernels import guard

    monkeypatch.setattr(guard, "ENABLED", False)
    fusion, q, layers, gi = make_case(TINY, 1, torch.float32, torch.device("cpu"))
    with torch.no_grad(), KernelCounter() as c:
        fusion(q, layers, gi, backend="triton")
    M = TINY.num_layers
    assert c.ops["triton::_bank_gemm1_kernel"] == M and "triton::_bank_combine_kernel" not in c.ops, c.ops
    assert c.host_syncs == 0, c.syncs


@pytest.mark.triton
def test_value_checks_are_the_only_forward_syncs(monkeypatch):
    """With fusion.check_inputs on, the counter sees the checks' syncs (so a zero above is not blindness)."""
    from bench.fusion_case import make_case
    from geoalign_kernels import guard

    monkeypatch.setattr(guard, "ENABLED", False)
    fusion, q, layers, gi = make_case(TINY, 1, torch.float32, torch.device("cpu"))
    fusion.check_inputs = True
    with torch.no_grad(), KernelCounter() as c:
        fusion(q, layers, gi, backend="triton")
    assert c.host_syncs >= 3, c.syncs  # q finite, gather_index min and max, each layer finite
