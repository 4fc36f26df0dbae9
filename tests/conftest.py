"""Test set-up: the Triton interpreter on machines without a GPU.

TRITON_INTERPRET must be set before any Triton kernel module is imported, so it is set here,
at collection time, when no CUDA device is present.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
