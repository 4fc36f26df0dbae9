"""The `cuda` backend's Python side (geoalign.backends.cuda_backend) on CPU: custom ops, autograd wiring, what is
saved and recomputed, and torch.compile, with the compiled kernels replaced by a torch emulation of the binding's
5 functions (same signatures and output contracts as csrc/binding.cpp). The kernels themselves are tested on a GPU
in test_cuda_kernels.py; their compile check is test_cuda_csrc.py.

Parity is against the reference backend (paper eqs. 1-8) at the parity suite's shapes and tolerances."""
from __future__ import annotations

import pytest
import torch

from geoalign_kernels.cuda import extension as cuda_extension, ops as cuda_ops
from geoalign.backends.cuda_backend import CudaBackend, bank_rows_cuda
from geoalign.routing import bank_rows

from helpers import (SHAPES, TOL, EmulatedExt, Shape, assert_compiled_matches_eager, assert_parity, force_ties, make_fusion, make_inputs,
                          rel_err, run_backend, run_cuda_backend)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_parity_with_reference_emulated(emulated, dtype, shape):
    fusion = make_fusion(shape, dtype)
    q, layers, gather_index = make_inputs(shape, dtype)
    grad_out = torch.randn(q.shape, dtype=dtype, generator=torch.Generator().manual_seed(7))
    ref = run_backend(fusion, "reference", q, layers, gather_index, grad_out)
    fast = run_cuda_backend(fusion, q, layers, gather_index, grad_out)
    assert_parity(fast, ref, TOL[dtype], f"cuda-emulated/{dtype}/{shape}")
    # the CUDA pieces were used for routing and its backward, the row lists and the gather + normalisation
    for call in ("route", "route_backward", "bank_rows", "gather_layer_norm"):
        assert call in emulated.calls, call


def test_routing_matches_torch_backend_with_ties(emulated):
    shape = Shape(L=9, M=5, K=3, G=4)
    fusion = make_fusion(shape, torch.float64)
    force_ties(fusion, [1, 3, 4])
    q, layers, gather_index = make_inputs(shape, torch.float64)
    routing = CudaBackend().route(fusion, q)
    assert routing.topk_idx.tolist() == [[1, 3, 4]] * shape.L
    ref = run_backend(fusion, "reference", q, layers, gather_index, torch.ones_like(q))
    fast = run_cuda_backend(fusion, q, layers, gather_index, torch.ones_like(q))
    assert_parity(fast, ref, TOL[torch.float64], "cuda-emulated/ties")


def test_layers_in_any_order_and_int32_gather(emulated):
    shape = Shape(L=15, M=6, K=2, G=4)
    fusion = make_fusion(shape, torch.float64)
    q, layers, gather_index = make_inputs(shape, torch.float64)
    grad_out = torch.randn(q.shape, dtype=torch.float64)
    ref = run_backend(fusion, "reference", q, layers, gather_index, grad_out)
    fast = run_cuda_backend(fusion, q, layers, gather_index.to(torch.int32), grad_out, order=[3, 0, 5, 1, 4, 2])
    assert_parity(fast, ref, TOL[torch.float64], "cuda-emulated/order")


def test_only_q_requires_grad_saves_nothing(emulated):
    shape = Shape(L=7, M=3, K=2, G=4)
    fusion = make_fusion(shape, torch.float32)
    fusion.requires_grad_(False)
    q, layers, gather_index = make_inputs(shape, torch.float32)
    backend = CudaBackend()
    routing = backend.route(fusion, q)
    rows = backend.bank_rows(routing.topk_idx, shape.M)
    bank = backend.open_bank(fusion, routing.alpha.detach(), gather_index, rows, range(shape.M), fusion.projector.fc1)
    for i in range(shape.M):
        backend.add_layer(bank, i, layers[i])
    h_bar = backend.close_bank(bank)
    assert not bank.save and not bank.tape and not h_bar.requires_grad  # no parameter and no alpha needs a gradient: the bank is a constant
    backend.output(fusion, q, h_bar).sum().backward()
    assert q.grad is not None and emulated.calls.count("gather_layer_norm") == shape.M  # once per layer, none in backward


def test_compiled_matches_eager(emulated):
    """The custom ops' fake impls and autograd trace under torch.compile (aot_eager) in one graph, and agree."""
    shape = Shape(L=12, M=3, K=2, G=4)
    fusion = make_fusion(shape, torch.float32)
    q, layers, gather_index = make_inputs(shape, torch.float32)
    assert_compiled_matches_eager(CudaBackend(), fusion, q, layers, gather_index)


def test_ops_registered():
    for name in ("cuda_route", "cuda_route_backward", "cuda_bank_rows", "cuda_gather_layer_norm"):
        assert hasattr(torch.ops.geoalign, name), name


def test_input_validation(emulated):
    with pytest.raises(ValueError, match="1..32 bank layers"):
        cuda_ops.cuda_route(torch.randn(3, 33), 2)
    with pytest.raises(ValueError, match="1 <= K <= M"):
        cuda_ops.cuda_route(torch.randn(3, 4), 5)
    with pytest.raises(TypeError, match="float32, float16, bfloat16 or float64"):
        cuda_ops.cuda_route(torch.randint(0, 3, (3, 4)), 2)
    with pytest.raises(ValueError, match="LayerNorm weight/bias"):
        cuda_ops.cuda_gather_layer_norm(torch.randn(8, 6), torch.zeros(2, 4, dtype=torch.int64),
                                  torch.zeros(1, dtype=torch.int64), torch.ones(5), torch.zeros(5), 1e-5, False)


def test_unavailable_extension_is_a_clear_error(monkeypatch):
    if cuda_extension.load_extension() is not None:
        pytest.skip("the CUDA extension is available here")
    assert not cuda_extension.cuda_backend_available()
    assert cuda_extension.extension_error()
    with pytest.raises(RuntimeError, match="backend='cuda' is unavailable"):
        CudaBackend()


def test_cpu_tensors_rejected_by_real_extension_path(monkeypatch):
    class Compiled(EmulatedExt):
        requires_cuda = True

    monkeypatch.setattr(cuda_extension, "EXT_OVERRIDE", Compiled())
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        cuda_ops.cuda_route(torch.randn(3, 4), 2)


def test_bank_rows_emulated_matches(emulated):
    topk = torch.tensor([[2, 0], [0, 1], [2, 1], [1, 2]])
    got = bank_rows_cuda(topk, 4)
    want = bank_rows(topk, 4)
    assert torch.equal(got.offsets, want.offsets)
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.slots, want.slots)
    assert rel_err(got.tokens.double(), want.tokens.double()) == 0


def test_output_stage_notice_once(emulated, monkeypatch, caplog):
    """A non-torch sparse backend on a Table 4 variant (anything but projector='shared', fusion='add') runs only the
    bank itself and says so once per (backend, projector, fusion), at INFO; the torch backend (whose output stage is
    torch anyway) and the paper's default path never say it. torch.cuda.is_available is faked so that backend='cuda'
    builds on CPU with the emulated kernels; the backend cache is cleared around it."""
    import logging

    import geoalign.backends.base as base_module
    from geoalign.backends import get_backend

    monkeypatch.setattr(base_module, "_NOTICED", set())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    get_backend.cache_clear()
    caplog.set_level(logging.INFO, logger="geoalign.fusion")
    shape = Shape(L=5, M=3, K=2, G=4)

    def notices(backend, **options):
        caplog.clear()
        fusion = make_fusion(shape, torch.float32, **options)
        q, layers, gather_index = make_inputs(shape, torch.float32)
        with torch.no_grad():
            fusion(q, layers, gather_index, backend=backend)
        return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "geoalign.fusion"]

    def notice(projector, fusion):
        return [(logging.INFO, f"geoalign: backend 'cuda' runs the bank for projector={projector!r}, "
                               f"fusion={fusion!r}; the output stage (W2 / eq. 8 variant, L rows) runs in torch")]

    try:
        assert notices("torch", projector="split") == []
        assert notices("torch", fusion="film") == []
        assert notices("cuda") == []  # the paper's default path: the backend runs it all
        assert notices("cuda", projector="split") == notice("split", "add")
        assert notices("cuda", projector="split") == []  # once
        assert notices("cuda", fusion="film") == notice("shared", "film")
        assert notices("cuda") == []
    finally:
        get_backend.cache_clear()
