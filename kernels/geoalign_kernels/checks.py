"""Host-side argument checks of the exported launchers: shapes, dtypes, devices and strides, from tensor metadata only
(no device synchronisation). Each failure names the launcher, the argument, what was expected and what was received.

The index *values* a kernel follows (token ids, slot ids, gather rows) live on the device; reading them here would
cost a synchronisation per launch. The kernels instead bound every data-dependent address by the true extent of the
tensor it points into (an out-of-range id reads nothing, writes nothing, and turns what it feeds into NaN), and
``GEOALIGN_GUARD=1`` checks the values on the host (see guard.py).
"""
from __future__ import annotations

from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def _dtype_names(dtypes) -> str:
    dtypes = dtypes if isinstance(dtypes, (tuple, list)) else (dtypes,)
    return " or ".join(str(d).replace("torch.", "") for d in dtypes)


def _shape_text(shape: Sequence) -> str:
    return "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"


def check_tensor(op: str, name: str, t, *, shape: Sequence | None = None, dtype=None, device=None,
                 unit_stride: bool = False) -> None:
    """Raise TypeError/ValueError unless ``t`` is a tensor with ``shape`` (None entries match any size), a dtype in
    ``dtype`` (a dtype or a tuple), on ``device``, and (``unit_stride``) with unit stride in its last dim."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if shape is not None:
        ok = t.dim() == len(shape) and all(w is None or w == s for w, s in zip(shape, t.shape))
        if not ok:
            raise ValueError(f"{op}: {name} must have shape {_shape_text(shape)}, got {list(t.shape)}")
    if dtype is not None:
        allowed = dtype if isinstance(dtype, (tuple, list)) else (dtype,)
        if t.dtype not in allowed:
            raise TypeError(f"{op}: {name} must be {_dtype_names(allowed)}, got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{op}: {name} must be on {device} (where the other arguments are), got {t.device}")
    if unit_stride and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{op}: {name} must have unit stride in its last dim, got strides {list(t.stride())}")


def check_int(op: str, name: str, value, low: int, high: int) -> None:
    """``low <= value <= high`` for a Python int (bool refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{op}: {name} must be in [{low}, {high}], got {value}")
