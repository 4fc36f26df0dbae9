"""torch.compile over the Triton backend's torch.library custom ops (namespace geoalign): one graph, no breaks
(fullgraph=True), and the compiled forward/backward equals eager exactly. backend="aot_eager" traces forward and
backward through the ops' fake impls and needs no C compiler, so it runs on CPU under the Triton interpreter."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.triton

from geoalign.backends.triton_backend import TritonBackend  # noqa: E402

from helpers import Shape, assert_compiled_matches_eager, make_fusion, make_inputs  # noqa: E402


def test_ops_registered():
    for name in ("triton_route", "triton_route_backward", "triton_bank_rows", "triton_bank_layer_forward",
                 "triton_bank_tape_forward", "triton_bank_backward", "triton_output", "triton_output_backward",
                 "triton_output_folded"):
        assert hasattr(torch.ops.geoalign, name), name
    # the in-place updates of h_bar and the tape are declared
    schema = str(torch.ops.geoalign.triton_bank_layer_forward.default._schema)
    for arg in ("Tensor(a0!) h_bar", "Tensor(a13!) x_hat", "Tensor(a14!) affine"):
        assert arg in schema, schema
    schema = str(torch.ops.geoalign.triton_bank_tape_forward.default._schema)
    for arg in ("Tensor(a0!) h_bar", "Tensor(a8!) z"):
        assert arg in schema, schema


def test_compiled_matches_eager():
    shape = Shape(L=20, M=3, K=2, G=4, D=24, Dg=20, H=24, R=16)
    fusion = make_fusion(shape, torch.float32, seed=1)
    q, layers, gather_index = make_inputs(shape, torch.float32, seed=2)
    assert_compiled_matches_eager(TritonBackend(), fusion, q, layers, gather_index)


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
    # 13 builds x bf16, fp16, fp32 (the GEMM plain, with row sums and split-K; gather + normalise and GEMM1 each
    # with and without the tape; combine, dz, weight gradient, finish, route, route backward) + the counting sort
    assert proc.stdout.count("OK") == 40, proc.stdout
