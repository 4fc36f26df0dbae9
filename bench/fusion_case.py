"""The fusion-op case: each backend against `reference` in the same run, in four modes.

  fwd     forward with autograd recording (what training runs)
  bwd     backward alone (its forward runs untimed before each repetition)
  fwdbwd  forward + backward
  infer   forward under no_grad (what generation runs)
  infer-fold  infer with W_out.W2 folded into one GEMM (fast backends only; compared with reference's infer)
"""
from __future__ import annotations

import gc

import torch

from geoalign import GeoAlignFusion
from geoalign.geometry import build_gather_index
from geoalign.memory import SavedTensorMeter, peak_rss_bytes, reset_peak_rss

from .shapes import BASELINE_MODE, FLOP_FACTOR, MODES, VGGT_GRID, FusionShape
from .timing import time_fn


def make_case(shape: FusionShape, frames: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """A random fusion module and inputs for `frames` frames: q [252*frames, D], M layers [frames*28*37, D'],
    gather_index from the real VGGT/Qwen alignment."""
    if shape.group_size != 4:
        raise ValueError("the benchmark builds frame-wise G=4 gather indices only")
    torch.manual_seed(seed)
    fusion = GeoAlignFusion(shape.config()).to(device=device, dtype=dtype)
    fusion.check_inputs = False
    gather_index = build_gather_index(frames, VGGT_GRID).to(device)
    L, N = gather_index.shape[0], frames * VGGT_GRID[0] * VGGT_GRID[1]
    q = torch.randn(L, shape.hidden_size, device=device, dtype=dtype, requires_grad=True)
    layers = [torch.randn(N, shape.geo_dim, device=device, dtype=dtype) for _ in range(shape.num_layers)]
    return fusion, q, layers, gather_index


def _mode_fns(model, fusion, q, layers, gather_index, backend, grad_out):
    def clear():
        q.grad = None
        for p in fusion.parameters():
            p.grad = None

    def fwd(_=None):
        return model(q, layers, gather_index, backend=backend)

    def infer(_=None):
        with torch.no_grad():
            return model(q, layers, gather_index, backend=backend)

    def infer_fold(_=None):
        with torch.no_grad():
            return model(q, layers, gather_index, backend=backend, fold_output=True)

    def fwdbwd(_=None):
        clear()
        model(q, layers, gather_index, backend=backend).backward(grad_out)

    def bwd_setup():
        clear()
        return model(q, layers, gather_index, backend=backend)

    def bwd(out):
        out.backward(grad_out)

    return {"fwd": (fwd, None), "bwd": (bwd, bwd_setup), "fwdbwd": (fwdbwd, None), "infer": (infer, None),
            "infer-fold": (infer_fold, None)}


def run_fusion_case(shape: FusionShape, frames: int, backends: list[str], dtype: torch.dtype,
                    device: torch.device, budget_s: float, modes=MODES, peak_tflops: float | None = None,
                    progress=None) -> list[dict]:
    """One row per (backend, mode): time percentiles, TFLOP/s of the sparse formula and % of the measured matmul
    peak, memory, and ratios to `reference` measured in this same call."""
    fusion, q, layers, gather_index = make_case(shape, frames, dtype, device)
    L = q.shape[0]
    grad_out = torch.randn_like(q)
    macs = shape.sparse_macs_per_token() * L
    rows = []
    for backend in backends:
        fn_backend = "reference" if backend == "compiled-reference" else backend
        model = torch.compile(fusion) if backend == "compiled-reference" else fusion
        fns = _mode_fns(model, fusion, q, layers, gather_index, fn_backend, grad_out)
        for mode in modes:
            if mode == "infer-fold" and fn_backend == "reference":
                continue  # eqs. 1-8 literally: nothing to fold
            if progress is not None:
                progress(f"fusion frames={frames} {backend} {mode}")
            fn, setup = fns[mode]
            row = {"case": "fusion", "shape": shape.name, "backend": backend, "mode": mode, "frames": frames,
                   "L": L, "dtype": str(dtype).replace("torch.", "")}
            try:  # the memory measurement is also the timing's warm-up call
                row.update(measure_memory(fn, setup, mode, fusion, q, layers, gather_index, fn_backend, device))
                row.update(time_fn(fn, device, setup=setup, budget_s=budget_s, warmup=0))
                row["tflops"] = 2 * macs * FLOP_FACTOR[mode] / (row["median_ms"] * 1e-3) / 1e12
                if peak_tflops:
                    row["pct_of_matmul_peak"] = 100.0 * row["tflops"] / peak_tflops
            except torch.cuda.OutOfMemoryError:
                row = {**{k: row[k] for k in ("case", "shape", "backend", "mode", "frames", "L", "dtype")},
                       "status": "out of memory"}
            rows.append(row)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict], baseline=lambda r: r["backend"] == "reference") -> None:
    """speedup_vs_reference and memory ratios, against the baseline row of the same case/mode/frames."""
    ref = {(r["case"], r["mode"], r["frames"]): r for r in rows if baseline(r) and "median_ms" in r}
    for r in rows:
        base = ref.get((r["case"], BASELINE_MODE.get(r["mode"], r["mode"]), r["frames"]))
        if base is None or "median_ms" not in r:
            continue
        r["speedup_vs_reference"] = base["median_ms"] / r["median_ms"]
        for key in ("saved_bytes", "peak_bytes"):
            if r.get(key) and base.get(key):
                r[f"{key}_ratio_vs_reference"] = r[key] / base[key]


def measure_memory(fn, setup, mode, fusion, q, layers, gather_index, backend, device) -> dict:
    """GPU: peak allocated during one call above what was allocated before it (inputs, weights). CPU: peak RSS
    above the RSS before the call. For fwd/fwdbwd also the bytes autograd saves for backward in one forward."""
    out: dict = {}
    if mode in ("fwd", "fwdbwd"):
        with SavedTensorMeter(exclude=fusion.parameters()) as meter:
            y = fusion(q, layers, gather_index, backend=backend)
        out["saved_bytes"] = meter.bytes
        del y
    arg = setup() if setup is not None else None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn(arg)
        torch.cuda.synchronize()
        out["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
    elif reset_peak_rss():
        base = peak_rss_bytes()
        fn(arg)
        peak = peak_rss_bytes()
        if base is not None and peak is not None:
            out["peak_bytes"] = peak - base
    return out
