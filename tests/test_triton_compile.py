"""torch.compile over the Triton backend's torch.library custom ops (namespace geoalign): one graph, no breaks
(fullgraph=True), and the compiled forward/backward equals eager exactly. backend="aot_eager" traces forward and
backward through the ops' fake impls and needs no C compiler, so it runs on CPU under the Triton interpreter."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.triton

import torch._dynamo  # noqa: E402
import torch._dynamo.testing  # noqa: E402
from geoalign.routing import bank_rows  # noqa: E402
from geoalign.backends.triton_backend import TritonBackend  # noqa: E402

from test_triton_kernels import make_fusion  # noqa: E402


def test_ops_registered():
    for name in ("triton_route", "triton_route_backward", "triton_bank_accumulate", "triton_bank_backward",
                 "triton_output", "triton_output_backward", "triton_output_folded"):
        assert hasattr(torch.ops.geoalign, name), name
    schema = str(torch.ops.geoalign.triton_bank_accumulate.default._schema)
    assert "Tensor(a0!) h_bar" in schema  # the in-place h_bar update is declared


def test_compiled_matches_eager():
    M = 3
    fusion, q, layers, gather_index = make_fusion(torch.float32, L=20, D=24, Dg=20, H=24, M=M, K=2, G=4, R=16, seed=1)
    backend = TritonBackend()
    per_layer = [bank_rows(backend.route(fusion, q).topk_idx, M).layer(i) for i in range(M)]  # host-side grouping

    def fused(q, layers, gather_index):
        routing = backend.route(fusion, q)
        h_bar = backend.new_accumulator(fusion, q)
        for i in range(M):
            tokens, slots = per_layer[i]
            h_bar = backend.accumulate(fusion, h_bar, routing.alpha, i, layers[i], tokens, slots, gather_index)
        return backend.output(fusion, q, h_bar), routing.alpha

    def run(fn):
        fusion.zero_grad(set_to_none=True)
        q_leaf = q.clone().requires_grad_()
        q_hat, alpha = fn(q_leaf, layers, gather_index)
        (q_hat.sum() + alpha[:, 0].sum()).backward()
        return [q_hat.detach(), alpha.detach(), q_leaf.grad] + [p.grad for p in fusion.parameters()]

    eager = run(fused)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = run(torch.compile(fused, backend=counter, fullgraph=True))
    assert counter.frame_count == 1
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.slow  # ~90 s on 2 cores with a cold Triton cache (a few seconds warm)
def test_kernels_compile_for_sm90():
    """Every kernel builds for sm_90 (H100/H200) at the Hopper tile configs, bf16/fp16/fp32, without a GPU:
    catches GPU-only compile errors (tl.dot shapes/dtypes, layouts, shared memory) the interpreter cannot see."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "geoalign_kernels.aot_check", "90"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("OK") == 24, proc.stdout
