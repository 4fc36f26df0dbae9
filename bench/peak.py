"""The device's ceilings, measured in the same run as the cases: a large matmul and a large copy."""
from __future__ import annotations

import torch

from .timing import time_fn


def measure_ceilings(device: torch.device, dtype: torch.dtype, quick: bool = False) -> dict:
    """matmul TFLOP/s (square GEMM in `dtype`) and device-to-device copy GB/s (read + write counted)."""
    gpu = device.type == "cuda"
    n = 8192 if gpu else 2048  # smaller GEMMs underestimate the peak (and quick mode must not inflate % of peak)
    mm_dtype = dtype if (gpu or dtype in (torch.float32, torch.float64)) else torch.float32
    a = torch.randn(n, n, device=device, dtype=mm_dtype)
    b = torch.randn(n, n, device=device, dtype=mm_dtype)
    t = time_fn(lambda: torch.mm(a, b), device, budget_s=0.5 if quick else 1.0, min_reps=3)
    matmul_tflops = 2 * n**3 / (t["median_ms"] * 1e-3) / 1e12
    del a, b
    nbytes = (1 << 30 if gpu else 1 << 28) // (2 if quick else 1)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t_copy = time_fn(lambda: dst.copy_(src), device, budget_s=0.3 if quick else 0.6, min_reps=3)
    copy_gbs = 2 * nbytes / (t_copy["median_ms"] * 1e-3) / 1e9
    return {"matmul_n": n, "matmul_dtype": str(mm_dtype).replace("torch.", ""), "matmul_tflops": matmul_tflops,
            "copy_bytes": nbytes, "copy_gbs": copy_gbs}
