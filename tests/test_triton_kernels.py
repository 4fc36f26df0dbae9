"""The Triton kernels on a GPU (`pytest -m gpu`; bench/gpu_proof.py runs this file first): the whole fusion at
moderate shapes in bf16, int64 offsets into layers of more than 2^31 elements, and a fusion step captured in one
CUDA graph, each against the torch sparse backend. Skipped without a CUDA device; the per-kernel tests that run
under the interpreter are tests/test_triton_{fusion,routing,bank,output,gemm}.py.

Every buffer a kernel must fully write is allocated NaN-filled (ints -7) here (geoalign_kernels.utils.POISON, the
`poison_outputs` fixture in tests/conftest.py), so a row or column a kernel forgets to write fails the comparison.
"""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("poison_outputs")]

from helpers import TRITON_TOL, rel_err  # noqa: E402
from triton_helpers import fusion_case, run_fusion  # noqa: E402


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_parity_gpu():
    """bf16 on a real GPU at a moderate shape. bf16 unit roundoff is 3.9e-3; tolerance 3e-2 (a few ulps through the
    chained roundings, as for fp16 in helpers.TRITON_TOL)."""
    dtype = torch.bfloat16
    fusion, q, layers, gather_index = fusion_case(dtype, L=515, D=256, Dg=264, H=384, M=6, K=2, G=4, R=64, seed=21)
    fusion, q = fusion.cuda(), q.cuda()
    layers, gather_index = [x.cuda() for x in layers], gather_index.cuda()
    ref = run_fusion(fusion, q, layers, gather_index, "torch")
    out = run_fusion(fusion, q, layers, gather_index, "triton")
    agree = (out[1].topk_idx == ref[1].topk_idx).all(1)
    assert agree.float().mean() > 0.99  # bf16 logits may round differently in near-ties
    tol = 3e-2
    assert rel_err(out[0], ref[0]) < tol
    assert rel_err(out[2], ref[2]) < tol
    for name in ref[3]:
        assert rel_err(out[3][name], ref[3][name]) < tol, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_int64_offsets_gpu():
    """Layers with more than 2^31 elements (N * D' > 2^31, 4.3 GB each in fp16); gather_index points past element
    2^31, so an int32 row * stride product would wrap. Compared with the torch backend."""
    dtype, Dg = torch.float16, 2048
    N = (1 << 31) // Dg + 257
    fusion, q, _, _ = fusion_case(dtype, L=64, D=64, Dg=Dg, H=64, M=2, K=1, G=4, R=32, seed=23, n_rows_extra=0)
    fusion, q = fusion.cuda(), q.cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)
    layers = [torch.randn(N, Dg, device="cuda", dtype=dtype, generator=gen) for _ in range(2)]
    gather_index = torch.randint(N - 4096, N, (64, 4), device="cuda", generator=gen)
    ref = run_fusion(fusion, q, layers, gather_index, "torch")
    out = run_fusion(fusion, q, layers, gather_index, "triton")
    assert torch.equal(out[1].topk_idx, ref[1].topk_idx)
    assert rel_err(out[0], ref[0]) < TRITON_TOL[dtype]
    for name in ("projector.fc1.weight", "layer_norms.0.weight", "layer_norms.1.bias"):
        assert rel_err(out[3][name], ref[3][name]) < TRITON_TOL[dtype], name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fusion_step_in_a_cuda_graph_gpu(monkeypatch):
    """Forward + backward of the triton fusion with input value checks off and guard mode off: no host sync
    (torch.cuda.set_sync_debug_mode("error") raises on one), so the whole step is captured in one CUDAGraph; a
    replay on new inputs copied into the static ones gives the eager torch backend's output and gradients."""
    from geoalign_kernels import guard

    monkeypatch.setattr(guard, "ENABLED", False)
    dtype = torch.float32
    fusion, q, layers, gather_index = fusion_case(dtype, L=301, D=128, Dg=96, H=160, M=6, K=2, G=4, R=64, seed=31)
    fusion = fusion.cuda()
    fusion.check_inputs = False
    static_q = q.cuda().requires_grad_()
    static_layers, static_gi = [x.cuda() for x in layers], gather_index.cuda()
    static_g = torch.randn_like(static_q)

    def step():
        fusion.zero_grad(set_to_none=True)
        static_q.grad = None
        out = fusion(static_q, static_layers, static_gi, backend="triton")
        out.backward(static_g)
        return out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (Triton compiles) on a side stream, as CUDA graph capture requires
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()  # eager, no sync
        fusion.zero_grad(set_to_none=True)
        static_q.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = fusion(static_q, static_layers, static_gi, backend="triton")
            static_out.backward(static_g)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    _, q2, layers2, gi2 = fusion_case(dtype, L=301, D=128, Dg=96, H=160, M=6, K=2, G=4, R=64, seed=32)
    with torch.no_grad():
        static_q.copy_(q2.cuda())
        for s, x in zip(static_layers, layers2):
            s.copy_(x.cuda())
        static_gi.copy_(gi2.cuda())
    graph.replay()
    torch.cuda.synchronize()
    got = (static_out.detach().clone(), static_q.grad.clone(),
           {n: p.grad.clone() for n, p in fusion.named_parameters() if p.grad is not None})
    fusion.check_inputs = True
    fusion.zero_grad(set_to_none=True)
    q_ref = q2.cuda().requires_grad_()
    out_ref = fusion(q_ref, [x.cuda() for x in layers2], gi2.cuda(), backend="torch")
    out_ref.backward(static_g)
    assert rel_err(got[0], out_ref.detach()) < TRITON_TOL[dtype]
    assert rel_err(got[1], q_ref.grad) < TRITON_TOL[dtype]
    for name, p in fusion.named_parameters():
        assert rel_err(got[2][name], p.grad) < TRITON_TOL[dtype], name
