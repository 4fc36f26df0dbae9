"""Parity of every fast backend against the reference (paper eqs. 1-8): outputs, routing, and the gradients of q
and of every parameter, on fresh random inputs at several shapes, including the odd ones.

Tolerances (max |fast - ref| divided by max |ref| over each tensor):
  float64: 1e-12. Both paths do the same arithmetic in a different order and on different row subsets, so the
           difference is a few ulps (eps 2.2e-16) times the depth of the sums (<= G*D' = 160 terms, 4 chained GEMMs).
  float32: 5e-5. The same argument with eps 1.2e-7: ~sqrt(160) * 4 chained reductions ~ 1e-5 typical; 5e-5 leaves
           headroom for the worst tensor (dW1 sums over every routed pair) without hiding a wrong row or a dropped
           term, which shows up at O(1).
The Top-K indices must match exactly: the inputs are spread so no logit tie is within rounding, and exact ties are
tested separately.
"""
from __future__ import annotations

import random
import weakref

import pytest
import torch

from helpers import (backend_params, SHAPES, TOL, Shape, assert_parity, fast_backends, force_ties, make_fusion, make_inputs,
                          rel_err, run_backend, spy_on)

@pytest.mark.parametrize("backend", backend_params(fast_backends()))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_parity_with_reference(backend, dtype, shape):
    fusion = make_fusion(shape, dtype)
    q, layers, gather_index = make_inputs(shape, dtype)
    grad_out = torch.randn(q.shape, dtype=dtype, generator=torch.Generator().manual_seed(7))
    ref = run_backend(fusion, "reference", q, layers, gather_index, grad_out)
    fast = run_backend(fusion, backend, q, layers, gather_index, grad_out)
    assert_parity(fast, ref, TOL[dtype], f"{backend}/{dtype}/{shape}")


@pytest.mark.parametrize("backend", backend_params(fast_backends()))
def test_layers_as_iterator(backend):
    shape = Shape(L=11, M=4, K=2, G=4)
    fusion = make_fusion(shape, torch.float64)
    q, layers, gather_index = make_inputs(shape, torch.float64)
    grad_out = torch.randn(q.shape, dtype=torch.float64)
    ref = run_backend(fusion, "reference", q, layers, gather_index, grad_out)
    fast = run_backend(fusion, backend, q, layers, gather_index, grad_out, as_iterator=True)
    assert_parity(fast, ref, TOL[torch.float64], f"{backend}/iterator")


@pytest.mark.parametrize("backend", ["reference"] + backend_params(fast_backends()))
def test_stream_routes_are_known_before_the_first_layer(backend):
    """FusionStream.routing (and gather_index) are readable as soon as the stream opens, and are the routes the
    finished stream returns."""
    shape = Shape(L=11, M=4, K=2, G=4)
    fusion = make_fusion(shape, torch.float64)
    q, layers, gather_index = make_inputs(shape, torch.float64)
    stream = fusion.begin(q, gather_index, backend=backend)
    early = stream.routing
    assert stream.gather_index is gather_index
    for i, layer in enumerate(layers):
        stream.add(i, layer)
    _, routing = stream.finish()
    assert torch.equal(early.topk_idx, routing.topk_idx)
    torch.testing.assert_close(early.alpha, routing.alpha, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", backend_params(fast_backends()))
def test_consumed_layers_are_released(backend):
    """Neither the stream nor the autograd graph keeps a layer once it has been consumed."""
    shape = Shape(L=10, M=5, K=2, G=4)
    fusion = make_fusion(shape, torch.float32)
    q, layers, gather_index = make_inputs(shape, torch.float32)
    refs = []

    def produce():
        for i in range(shape.M):
            layer = layers[i].clone()
            refs.append(weakref.ref(layer))
            yield layer
            if i > 0:  # the previous layer must already be gone while the encoder produces the next one
                assert refs[i - 1]() is None, f"layer {i - 1} still referenced after it was consumed"

    layers_copy = produce()
    q_hat = fusion(q, layers_copy, gather_index, backend=backend)
    assert all(r() is None for r in refs)
    q_hat.sum().backward()  # the graph works without the layers
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("backend", backend_params(["reference"] + fast_backends()))
def test_streaming_api_equals_one_shot(backend):
    shape = Shape(L=15, M=6, K=2, G=4)
    fusion = make_fusion(shape, torch.float64)
    q, layers, gather_index = make_inputs(shape, torch.float64)
    grad_out = torch.randn(q.shape, dtype=torch.float64)
    one_shot = run_backend(fusion, backend, q, layers, gather_index, grad_out)

    fusion.zero_grad(set_to_none=True)
    q.grad = None
    stream = fusion.begin(q, gather_index, backend=backend)
    order = list(range(shape.M))
    random.Random(3).shuffle(order)  # layers may arrive in any order
    for i in order:
        stream.add(i, layers[i])
    q_hat, routing = stream.finish()
    q_hat.backward(grad_out)
    streamed = (q_hat.detach(), routing, q.grad.clone(), {n: p.grad.clone() for n, p in fusion.named_parameters()})
    assert_parity(streamed, one_shot, 1e-12, f"{backend}/stream")


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_fusion_stream_built_directly(backend):
    """FusionStream is public: built directly, with fold_output left at its default (off), it gives exactly what
    fusion(...) gives, for the reference backend (which refuses fold_output) and without a gradient (where a fold
    would apply and round differently)."""
    from geoalign import FusionStream

    shape = Shape(L=9, M=3, K=2, G=4)
    fusion = make_fusion(shape, torch.float32)
    q, layers, gather_index = make_inputs(shape, torch.float32)
    with torch.no_grad():
        stream = FusionStream(fusion, q, gather_index, backend)
        for i, layer in enumerate(layers):
            stream.add(i, layer)
        q_hat, _routing = stream.finish()
        assert torch.equal(q_hat, fusion(q, layers, gather_index, backend=backend))


@pytest.mark.parametrize("backend", backend_params(["reference"] + fast_backends()))
@pytest.mark.parametrize("K", [1, 2, 3])
def test_router_ties_go_to_lower_index(backend, K):
    shape = Shape(L=9, M=6, K=K, G=4)
    fusion = make_fusion(shape, torch.float32)
    tied = [1, 3, 4]
    force_ties(fusion, tied)
    q, layers, gather_index = make_inputs(shape, torch.float32)
    routing = fusion.route(q, backend=backend)
    expected = torch.tensor(tied[:K]).expand(shape.L, K)
    assert torch.equal(routing.topk_idx, expected)
    assert torch.allclose(routing.alpha, torch.full((shape.L, K), 1.0 / K))


@pytest.mark.parametrize("backend", backend_params(fast_backends()))
def test_ties_parity_with_reference(backend):
    """With exact ties the selected set is fixed by the tie rule, so outputs and gradients still match."""
    shape = Shape(L=12, M=5, K=2, G=4)
    fusion = make_fusion(shape, torch.float64)
    force_ties(fusion, [0, 2, 3])
    q, layers, gather_index = make_inputs(shape, torch.float64)
    grad_out = torch.randn(q.shape, dtype=torch.float64)
    ref = run_backend(fusion, "reference", q, layers, gather_index, grad_out)
    fast = run_backend(fusion, backend, q, layers, gather_index, grad_out)
    assert_parity(fast, ref, TOL[torch.float64], f"{backend}/ties")


@pytest.mark.parametrize("backend", backend_params(["reference"] + fast_backends()))
def test_route_matches_forward_routing(backend):
    shape = Shape(L=21, M=7, K=3, G=4)
    fusion = make_fusion(shape, torch.float32)
    q, layers, gather_index = make_inputs(shape, torch.float32)
    routing = fusion.route(q, backend=backend)
    _, routing_fwd = fusion(q, layers, gather_index, backend=backend, return_routing=True)
    assert torch.equal(routing.topk_idx, routing_fwd.topk_idx)
    assert torch.equal(routing.alpha, routing_fwd.alpha)
    # the Top-K really are the K largest logits, in descending order
    logits = fusion.router(q)
    picked = logits.gather(1, routing.topk_idx)
    assert (picked[:, :-1] >= picked[:, 1:]).all()
    kth = picked[:, -1:]
    others = logits.scatter(1, routing.topk_idx, float("-inf"))
    assert (others <= kth).all()
    torch.testing.assert_close(routing.alpha.sum(1), torch.ones(shape.L), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", backend_params(fast_backends()))
def test_no_grad_inference_matches(backend):
    shape = Shape(L=8, M=4, K=2, G=4)
    fusion = make_fusion(shape, torch.float64)
    q, layers, gather_index = make_inputs(shape, torch.float64)
    with torch.no_grad():
        ref = fusion(q, layers, gather_index, backend="reference")
        out = fusion(q, layers, gather_index, backend=backend)
    assert rel_err(out, ref) <= 1e-12, backend


@pytest.mark.parametrize("backend", backend_params(fast_backends()))
def test_layer_dtype_differs_from_parameters(backend):
    """bf16 VGGT layers into an fp32 fusion: every backend casts the layer to the parameter dtype first."""
    shape = Shape(L=10, M=3, K=2, G=4)
    fusion = make_fusion(shape, torch.float32)
    q, layers, gather_index = make_inputs(shape, torch.float32)
    layers = [x.to(torch.bfloat16) for x in layers]
    ref = fusion(q, layers, gather_index, backend="reference")
    assert rel_err(fusion(q, layers, gather_index, backend=backend), ref) <= TOL[torch.float32], backend


@pytest.mark.parametrize("backend", backend_params(fast_backends()))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_folded_output_at_inference(backend, dtype):
    """W_out.W2 folded into one GEMM equals the unfolded output (same maths, one rounding order changed)."""
    shape = Shape(L=19, M=5, K=2, G=4)
    fusion = make_fusion(shape, dtype)
    q, layers, gather_index = make_inputs(shape, dtype)
    with torch.no_grad():
        ref = fusion(q, layers, gather_index, backend="reference")
        folded = fusion(q, layers, gather_index, backend=backend, fold_output=True)
        fusion.out_proj.weight.mul_(0.5)  # the fold must follow weight updates
        ref2 = fusion(q, layers, gather_index, backend="reference")
        folded2 = fusion(q, layers, gather_index, backend=backend, fold_output=True)
    assert rel_err(folded, ref) <= TOL[dtype]
    assert rel_err(folded2, ref2) <= TOL[dtype]
    # with a gradient needed the unfolded path runs, so training is unaffected by the flag
    out = fusion(q, layers, gather_index, backend=backend, fold_output=True)
    out.sum().backward()
    assert fusion.projector.fc2.weight.grad is not None


def test_fold_output_refused_by_reference():
    shape = Shape(L=4, M=3, K=2, G=4)
    fusion = make_fusion(shape, torch.float32)
    q, layers, gather_index = make_inputs(shape, torch.float32)
    with pytest.raises(ValueError, match=r"^fold_output is a fast-path option \(torch, triton\); the reference backend "
                                         r"computes eqs\. 1-8 literally$"):
        fusion(q, layers, gather_index, backend="reference", fold_output=True)


def test_fold_output_reaches_the_backend(monkeypatch):
    """fold_output=True reaches the backend: at inference the output GEMM uses the fold W_out.W2 (computed once per
    weight version); with fold_output off (the default) no fold is ever computed."""
    from geoalign.backends.base import SparseBackend

    calls = spy_on(monkeypatch, SparseBackend, "fold", lambda backend, *weights: backend.fold_output)
    shape = Shape(L=4, M=3, K=2, G=4)
    fusion = make_fusion(shape, torch.float64)
    q, layers, gather_index = make_inputs(shape, torch.float64)
    with torch.no_grad():
        unfolded = fusion(q, layers, gather_index, backend="torch")
        assert calls == []
        folded = fusion(q, layers, gather_index, backend="torch", fold_output=True)
    assert calls == [True]
    assert rel_err(folded, unfolded) <= TOL[torch.float64]
