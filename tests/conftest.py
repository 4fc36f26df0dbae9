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
    """The cuda backend's compiled kernels replaced by their torch emulation (cuda_helpers.EmulatedExt); returns it."""
    from geoalign_kernels.cuda import extension as cuda_extension
    from cuda_helpers import EmulatedExt

    ext = EmulatedExt()
    monkeypatch.setattr(cuda_extension, "EXT_OVERRIDE", ext)
    return ext


@pytest.fixture
def one_thread():
    """One intra-op thread: on 2 shared cores oversubscribed threads make tiny matmuls 30x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    """A synthetic colour dataset of 8 records with 1-2 frames: (records path, media root)."""
    from geoalign.training.synthetic import make_colour_dataset

    root = str(tmp_path_factory.mktemp("synth"))
    return make_colour_dataset(root, 8, frame_counts=(1, 2), height=8), root


@pytest.fixture
def poison_outputs(monkeypatch):
    """Every buffer a Triton kernel must fully write is allocated NaN-filled (ints -7; geoalign_kernels.utils.POISON),
    so a row or column a kernel forgets to write fails the comparison (tests/test_triton_*.py use it)."""
    import geoalign_kernels.utils as kutils

    monkeypatch.setattr(kutils, "POISON", True)
    yield


@pytest.fixture(scope="module")
def tok():
    """The tiny model's offline tokenizer (geoalign.tiny.make_tokenizer), one per test module."""
    from geoalign.tiny import make_tokenizer

    return make_tokenizer()
