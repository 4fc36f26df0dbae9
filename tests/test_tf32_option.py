"""The fp32 tl.dot precision choice (geoalign_kernels.utils.dot_precision): exact "ieee" by default, TF32 only when
geoalign_kernels.runtime.TF32 is on (env GEOALIGN_TF32=1), never under the interpreter, and a one-time warning the
first time an fp32 launch takes the "ieee" path on a CUDA device. The GPU side is emulated here by switching the
module's interpreter flag off (dot_precision only decides; nothing is launched)."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("triton")

from geoalign_kernels import runtime, utils  # noqa: E402

CUDA = torch.device("cuda", 0)  # (a device object only: no GPU is touched)


@pytest.fixture
def gpu_rules(monkeypatch):
    """dot_precision as on a GPU (not the interpreter), TF32 off, the warning not yet given in this process."""
    monkeypatch.setattr(utils, "INTERPRET", False)
    monkeypatch.setattr(runtime, "TF32", False)
    monkeypatch.setattr(utils, "_IEEE_WARNED", False)


def test_fp32_on_cuda_warns_once_naming_the_option(gpu_rules):
    with pytest.warns(UserWarning, match=r"GEOALIGN_TF32=1 .*geoalign_kernels\.runtime\.TF32"):
        assert utils.dot_precision(torch.float32, CUDA) == "ieee"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert utils.dot_precision(torch.float32, CUDA) == "ieee"  # once per process
        assert utils.dot_precision(torch.float32, "cuda:1") == "ieee"


def test_no_warning_off_cuda_or_for_other_dtypes(gpu_rules):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert utils.dot_precision(torch.float32, torch.device("cpu")) == "ieee"
        assert utils.dot_precision(torch.float32) == "ieee"  # no device named (aot_check's constexprs)
        assert utils.dot_precision(torch.float64, CUDA) == "ieee"  # fp64 has no TF32: nothing to suggest
        assert utils.dot_precision(torch.bfloat16, CUDA) is None  # 16-bit operands: the tensor cores already
        assert utils.dot_precision(torch.float16, CUDA) is None
    assert not utils._IEEE_WARNED


def test_tf32_switch_on_a_gpu(gpu_rules, monkeypatch):
    monkeypatch.setattr(runtime, "TF32", True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert utils.dot_precision(torch.float32, CUDA) == "tf32"
        assert utils.dot_precision(torch.float64, CUDA) == "ieee"
        assert utils.dot_precision(torch.bfloat16, CUDA) is None


def test_interpreter_keeps_ieee(monkeypatch):
    """Under the interpreter (these tests' CPU runs) fp32 and the upcast bf16 stay exact, TF32 switch or not, and
    nothing warns."""
    monkeypatch.setattr(utils, "INTERPRET", True)
    monkeypatch.setattr(utils, "_IEEE_WARNED", False)
    for tf32 in (False, True):
        monkeypatch.setattr(runtime, "TF32", tf32)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert utils.dot_precision(torch.float32, CUDA) == "ieee"
            assert utils.dot_precision(torch.bfloat16, CUDA) == "ieee"


@pytest.mark.parametrize("value,expected", [("1", True), ("0", False), (None, False)])
def test_environment_variable(value, expected):
    env = {k: v for k, v in os.environ.items() if k != "GEOALIGN_TF32"}
    if value is not None:
        env["GEOALIGN_TF32"] = value
    proc = subprocess.run([sys.executable, "-c", "import geoalign_kernels.runtime as r; print(r.TF32)"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(expected)


@pytest.mark.triton
def test_every_launch_names_its_device(monkeypatch):
    """The launchers hand dot_precision their device (so the warning can fire on the first CUDA launch): a triton
    fusion forward + backward on the CPU calls it only with a device."""
    from geoalign_kernels import bank, gemm, routing
    from helpers import Shape, make_fusion, make_inputs

    calls = []
    real = utils.dot_precision

    def spy(dtype, device=None):
        calls.append(device)
        return real(dtype, device)

    for module in (bank, gemm, routing):
        monkeypatch.setattr(module, "dot_precision", spy)
    shape = Shape(L=9, M=3, K=2, G=4, D=16, Dg=8, H=16, R=8)
    fusion = make_fusion(shape, torch.float32, seed=0)
    q, layers, gather_index = make_inputs(shape, torch.float32, seed=1)
    q.requires_grad_()
    fusion(q, layers, gather_index, backend="triton").sum().backward()
    assert calls and all(d is not None and torch.device(d).type == "cpu" for d in calls), calls
