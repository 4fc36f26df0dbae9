"""Launch configurations (tile shapes, num_warps, num_stages) per device and shape class.

Keys are (device class, op, shape class). Device class comes from ``torch.cuda.get_device_name`` ("H100", "H200",
else "default"); shape class is "small" when the GEMM's row count is < 1024, else "large". Under the Triton
interpreter (TRITON_INTERPRET=1) every op uses small fixed blocks and no autotune, so CPU tests stay fast and
deterministic. The Hopper entries are starting points chosen from the usual Triton GEMM tutorial/Liger settings for
bf16 on sm90; they have NOT been tuned on a real H100/H200 from this repository (no GPU was available).
"""
from __future__ import annotations

import functools

import torch

from .runtime import INTERPRET

_INTERPRETER = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 1, "num_stages": 1}

# op names: "gemm" (shared GEMM: router, output stage), "bank_fwd" (gathered GEMM1), "bank_dx" (dz @ W1 + LN grads),
# "bank_dw1" (dz^T @ LN(raw)), "rows" (row-wise kernels: LN stats, dz/dalpha, routing; BLOCK_N is the column chunk)
_HOPPER = {
    ("gemm", "small"): {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
    ("gemm", "large"): {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
    ("bank_fwd", "small"): {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
    ("bank_fwd", "large"): {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
    ("bank_dx", "small"): {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
    ("bank_dx", "large"): {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
    ("bank_dw1", "small"): {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3},
    ("bank_dw1", "large"): {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
    ("rows", "small"): {"BLOCK_M": 16, "BLOCK_N": 256, "BLOCK_K": 64, "num_warps": 4, "num_stages": 1},
    ("rows", "large"): {"BLOCK_M": 32, "BLOCK_N": 256, "BLOCK_K": 64, "num_warps": 4, "num_stages": 1},
}
_DEFAULT = {
    ("gemm", "small"): {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3},
    ("gemm", "large"): {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3},
    ("bank_fwd", "small"): {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3},
    ("bank_fwd", "large"): {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3},
    ("bank_dx", "small"): {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3},
    ("bank_dx", "large"): {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3},
    ("bank_dw1", "small"): {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3},
    ("bank_dw1", "large"): {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3},
    ("rows", "small"): {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1},
    ("rows", "large"): {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1},
}
CONFIGS = {"H100": _HOPPER, "H200": _HOPPER, "default": _DEFAULT}

#: test hook: force these values (e.g. {"BLOCK_M": 16}) on every config, interpreter included
OVERRIDE: dict = {}


@functools.lru_cache(maxsize=None)
def device_class(index: int = 0) -> str:
    name = torch.cuda.get_device_name(index)
    for key in ("H200", "H100"):
        if key in name:
            return key
    return "default"


def get_config(op: str, rows: int, device: torch.device, dtype: torch.dtype | None = None) -> dict:
    """{BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages} for `op` with `rows` GEMM rows on `device`; `dtype` is the
    operand dtype (fp64 tiles are halved in K and get 2 stages so they fit shared memory)."""
    if INTERPRET or device.type != "cuda":
        cfg = dict(_INTERPRETER)
    else:
        shape = "small" if rows < 1024 else "large"
        cfg = dict(CONFIGS[device_class(device.index or 0)][(op, shape)])
        if dtype == torch.float64:
            cfg["BLOCK_K"] = min(cfg["BLOCK_K"], 32)
            cfg["num_stages"] = min(cfg["num_stages"], 2)
    cfg.update(OVERRIDE)
    return cfg
