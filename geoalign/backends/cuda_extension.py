"""Deprecated: moved to geoalign_kernels.cuda.extension (this name goes in the next release). The module object is
the same, so setting an attribute here (e.g. EXT_OVERRIDE) sets it there."""
import sys
import warnings

from geoalign_kernels.cuda import extension as _moved

warnings.warn("geoalign.backends.cuda_extension moved to geoalign_kernels.cuda.extension", DeprecationWarning,
              stacklevel=2)
sys.modules[__name__] = _moved
