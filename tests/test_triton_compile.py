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


@pytest.mark.slow  # ~6 min on 2 cores (106 builds, each through ptxas -v as well)
def test_kernels_compile_for_sm90():
    """Every kernel builds for sm_90 (H100/H200) at the H200 tile configs, bf16/fp16/fp32/fp64, without a GPU, both
    generic and specialised as a paper-scale launch: catches GPU-only compile errors (tl.dot shapes/dtypes, layouts,
    shared memory) the interpreter cannot see; the launch builds of the GEMMs must be software-pipelined (the check
    exits non-zero otherwise) and, in bf16, the GEMM kernels of the forward must not spill registers."""
    import os
    import re
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "geoalign_kernels.aot_check", "90"], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 14 builds x bf16, fp16, fp32, fp64 (the shared GEMM as fc2, out_proj, a weight gradient with row sums and the
    # router's split-K; gather + normalise and GEMM1 each with and without the tape; combine, dz, weight gradient,
    # finish, route, route backward) + the counting sort, each built generic and launch-specialised
    lines = [line for line in proc.stdout.splitlines() if line.startswith("OK ")]
    assert len(lines) == 114, proc.stdout
    launch = {}
    for line in lines:
        _, name, dtype, build, *rest = line.split()
        numbers = dict(re.findall(r"([a-z ]+?) (-?\d+)", " ".join(rest)))
        if build == "launch":
            launch.setdefault((name, dtype), []).append({k.strip(): int(v) for k, v in numbers.items()})
    gemms = [name for name, dtype in launch if dtype == "bf16" and name.startswith("_matmul_kernel")]
    assert len(gemms) == 4, gemms
    for name in gemms + ["_bank_gemm1_kernel[tape]", "_bank_gemm1_kernel[layer]", "_bank_weight_grad_kernel"]:
        for build in launch[(name, "bf16")]:
            assert build["async copies"] > 0, (name, build)
    # no register spills in bf16 in the shared GEMM (output stage, weight gradients, router), training's GEMM1 and
    # the row kernels. (Not asserted: inference's GEMM1 (254-255 registers, triton 3.6 / 3.9 spill 0 / 24 bytes) and
    # the bank's weight gradient (two fp32 accumulators, ~270 bytes spilled in its per-layer epilogue, outside the K
    # loop).)
    for name in gemms + ["_bank_gemm1_kernel[tape]", "_gather_normalize_kernel[tape]", "_gather_normalize_kernel[layer]",
                         "_bank_combine_kernel", "_bank_dz_kernel", "_route_kernel", "_route_backward_kernel"]:
        for build in launch[(name, "bf16")]:
            assert build["registers"] > 0 and build["spill bytes"] == 0, (name, build)  # registers -1: no ptxas
