"""Test set-up: the Triton interpreter on machines without a GPU, and guard mode for every kernel launch.

Both variables must be set before any geoalign_kernels module is imported, so they are set here, at collection time:
  TRITON_INTERPRET=1  when no CUDA device is present (Triton kernels then run on the CPU, in process memory);
  GEOALIGN_GUARD=1    every buffer a kernel writes gets canary padding, checked after each launch, and index
                      tensors are range-checked on the host (geoalign_kernels.guard). Under the interpreter a stray
                      store would corrupt the heap silently; in guard mode it fails the test that made it.
Tests that run Triton kernels carry the `triton` mark explicitly (their module's pytestmark, or
helpers.backend_params for backend-parametrized tests), so `-m triton` selects them.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("GEOALIGN_GUARD", "1")


@pytest.fixture
def emulated(monkeypatch):
    """The cuda backend's compiled kernels replaced by their torch emulation (helpers.EmulatedExt); returns it."""
    from geoalign.backends import cuda_extension
    from helpers import EmulatedExt

    ext = EmulatedExt()
    monkeypatch.setattr(cuda_extension, "EXT_OVERRIDE", ext)
    return ext
