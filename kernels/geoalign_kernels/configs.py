"""Launch configurations (tile shapes, num_warps, num_stages) per device and shape class, and :func:`launch_kwargs`.

Keys are (device class, op, shape class). Device class comes from ``torch.cuda.get_device_name`` ("H100", "H200",
else "default"); shape class is "small" when the GEMM's row count is < 1024, else "large". Under the Triton
interpreter (TRITON_INTERPRET=1) every op uses small fixed blocks and no autotune, so CPU tests stay fast and
deterministic. The Hopper entries are starting points chosen from the usual Triton GEMM tutorial/Liger settings for
bf16 on sm90; they have NOT been tuned on a real H100/H200 from this repository (no GPU was available yet).

ops: "gemm" (the shared GEMM: output stage, router and weight gradients), "bank_fwd" (GEMM1 over the normalised
rows), "bank_dw1" (the weight-gradient GEMM dz^T x_hat and its epilogue), "rows" (row-wise kernels: gather +
normalise, dz / d alpha, routing; BLOCK_SIZE_M rows per program, BLOCK_SIZE_N the column chunk).
"""
from __future__ import annotations

import functools

import torch

from .runtime import INTERPRET

#: row blocks per group in the grouped launch order of the shared GEMM (Triton tutorial 03)
GROUP_SIZE_M = 8


def _cfg(m: int, n: int, k: int, warps: int, stages: int) -> dict:
    return {"BLOCK_SIZE_M": m, "BLOCK_SIZE_N": n, "BLOCK_SIZE_K": k, "num_warps": warps, "num_stages": stages}


_INTERPRETER = _cfg(32, 32, 32, 1, 1)

_HOPPER = {
    ("gemm", "small"): _cfg(64, 128, 64, 4, 4),
    ("gemm", "large"): _cfg(128, 128, 64, 8, 3),
    ("bank_fwd", "small"): _cfg(64, 128, 64, 4, 3),
    ("bank_fwd", "large"): _cfg(128, 128, 64, 8, 3),
    ("bank_dw1", "small"): _cfg(128, 128, 32, 8, 3),
    ("bank_dw1", "large"): _cfg(128, 128, 64, 8, 3),
    ("rows", "small"): _cfg(16, 256, 64, 4, 1),
    ("rows", "large"): _cfg(32, 256, 64, 4, 1),
}
_DEFAULT = {
    ("gemm", "small"): _cfg(64, 64, 32, 4, 3),
    ("gemm", "large"): _cfg(128, 64, 32, 4, 3),
    ("bank_fwd", "small"): _cfg(64, 64, 32, 4, 3),
    ("bank_fwd", "large"): _cfg(128, 64, 32, 4, 3),
    ("bank_dw1", "small"): _cfg(64, 64, 32, 4, 3),
    ("bank_dw1", "large"): _cfg(128, 64, 32, 4, 3),
    ("rows", "small"): _cfg(16, 128, 32, 4, 1),
    ("rows", "large"): _cfg(16, 128, 32, 4, 1),
}
CONFIGS = {"H100": _HOPPER, "H200": _HOPPER, "default": _DEFAULT}

#: test hook: force these values (e.g. {"BLOCK_SIZE_M": 16}) on every config, interpreter included
OVERRIDE: dict = {}


@functools.lru_cache(maxsize=None)
def device_class(index: int = 0) -> str:
    name = torch.cuda.get_device_name(index)
    for key in ("H200", "H100"):
        if key in name:
            return key
    return "default"


def get_config(op: str, rows: int, device: torch.device, dtype: torch.dtype | None = None) -> dict:
    """{BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K, num_warps, num_stages} for ``op`` with ``rows`` GEMM rows on
    ``device``; ``dtype`` is the operand dtype (fp64 tiles are halved in K and get 2 stages to fit shared memory)."""
    if INTERPRET or device.type != "cuda":
        cfg = dict(_INTERPRETER)
    else:
        shape = "small" if rows < 1024 else "large"
        cfg = dict(CONFIGS[device_class(device.index or 0)][(op, shape)])
        if dtype == torch.float64:
            cfg["BLOCK_SIZE_K"] = min(cfg["BLOCK_SIZE_K"], 32)
            cfg["num_stages"] = min(cfg["num_stages"], 2)
    cfg.update(OVERRIDE)
    return cfg


def launch_kwargs(cfg: dict, *, group: bool = False) -> dict:
    """The keyword arguments of a tiled kernel launch: the three block sizes, num_warps, num_stages (and
    GROUP_SIZE_M for kernels launched in grouped order)."""
    kw = {key: cfg[key] for key in ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "num_warps", "num_stages")}
    if group:
        kw["GROUP_SIZE_M"] = GROUP_SIZE_M
    return kw
