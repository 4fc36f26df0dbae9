"""Compile checks of csrc/ that run without a GPU.

- .ci/check_csrc (every csrc/*.cu compiled for sm_90 with nvcc, in parallel): where nvcc exists. ~35 s on 2 cores,
  so it is marked slow; CI runs the script itself anyway (.ci/run).
- the script's "skipped: nvcc not found" path (fast, always).
- csrc/binding.cpp against this torch's C++ headers with the host compiler (-fsyntax-only; no CUDA header is needed
  by design): slow (~50 s, torch/extension.h is large).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "check_csrc"


def test_check_csrc_is_executable():
    assert SCRIPT.is_file() and os.access(SCRIPT, os.X_OK)
    assert sorted(p.name for p in (ROOT / "csrc").glob("*.cu")), "no CUDA sources in csrc/"


def test_check_csrc_skips_without_nvcc(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "NVCC": str(tmp_path / "no-nvcc")}
    out = subprocess.run([str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "skipped: nvcc not found"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_check_csrc_compiles_every_cu_for_sm90():
    out = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    for cu in (ROOT / "csrc").glob("*.cu"):
        assert f"ok      csrc/{cu.name}" in out.stdout, out.stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None, reason="no host C++ compiler")
def test_binding_compiles_against_torch_headers():
    torch_utils = pytest.importorskip("torch.utils.cpp_extension")
    includes = [f"-I{p}" for p in torch_utils.include_paths()]
    py_include = sysconfig.get_paths()["include"]
    if not (Path(py_include) / "Python.h").is_file():
        pytest.skip("Python headers not installed")
    cmd = ["c++", "-std=c++17", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=geoalign_cuda_ops",
           "-DTORCH_API_INCLUDE_EXTENSION_H", *includes, f"-I{py_include}", f"-I{ROOT / 'csrc'}",
           str(ROOT / "csrc" / "binding.cpp")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    errors = [line for line in out.stderr.splitlines() if "error" in line]
    assert out.returncode == 0 and not errors, "\n".join(errors) or out.stderr[-4000:]
