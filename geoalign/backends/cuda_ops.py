"""Deprecated: the CUDA custom ops moved to geoalign_kernels.cuda.ops, bank_rows_cuda to
geoalign.backends.cuda_backend (these names go in the next release)."""
import warnings

from geoalign_kernels.cuda.ops import (cuda_bank_rows, cuda_gather_layer_norm, cuda_route,  # noqa: F401
                                       cuda_route_backward)

from .cuda_backend import bank_rows_cuda  # noqa: F401

warnings.warn("geoalign.backends.cuda_ops moved to geoalign_kernels.cuda.ops", DeprecationWarning, stacklevel=2)
