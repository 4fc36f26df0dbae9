"""Test set-up: the Triton interpreter on machines without a GPU.

TRITON_INTERPRET must be set before any Triton kernel module is imported, so it is set here,
at collection time, when no CUDA device is present.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """Mark every test that runs a Triton kernel (`triton` in its id) so it can run in a process of its own.

    Seen on this CPU machine (torch 2.13.0, triton 3.9.0 interpreter), in roughly one full run in six: after the
    model/eval tests had run in the same process, every `geoalign::triton_*` op call failed with
    `ValueError: vector::reserve` (once the process died with a fatal error). The Triton tests always passed in a
    process without the model stack, so the README test command runs them separately (`-m triton`).
    Root cause not found; see the closing note.
    """
    import pytest

    for item in items:
        if "triton" in item.nodeid:
            item.add_marker(pytest.mark.triton)
