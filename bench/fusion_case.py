"""The fusion-op case: forward and forward+backward of each backend, against `reference` in the same run."""
from __future__ import annotations

import gc
from dataclasses import asdict, dataclass

import torch

from geoalign import GeoAlignConfig, GeoAlignFusion
from geoalign.memory import SavedTensorMeter

from .timing import peak_rss_bytes, reset_peak_rss, time_fn

TOKENS_GRID = (14, 18)  # merged tokens per frame (rows, cols): a 640x480 frame -> 518x392 -> 28x36 patches -> 252


@dataclass(frozen=True)
class FusionShape:
    """Widths of the fusion op. `paper` is Qwen2.5-VL-3B + VGGT-1B; `cpu` keeps the paper's ratios at 1/4 width."""

    name: str
    hidden_size: int
    geo_dim: int
    projector_hidden: int
    router_hidden: int
    num_layers: int = 12
    top_k: int = 2
    group_size: int = 4

    def config(self) -> GeoAlignConfig:
        return GeoAlignConfig(hidden_size=self.hidden_size, geo_dim=self.geo_dim,
                              bank_layers=tuple(range(24 - self.num_layers, 24)), top_k=self.top_k,
                              group_size=self.group_size, projector_hidden=self.projector_hidden,
                              router_hidden=self.router_hidden)

    def tokens(self, frames: int) -> int:
        return frames * TOKENS_GRID[0] * TOKENS_GRID[1]

    def sparse_macs_per_token(self) -> int:
        """Multiply-adds per visual token of the sparse path (design.md section 2), router included."""
        c = self
        return (c.top_k * c.group_size * c.geo_dim * c.projector_hidden + c.projector_hidden * c.hidden_size
                + c.hidden_size * c.hidden_size + c.hidden_size * c.router_hidden + c.router_hidden * c.num_layers)


SHAPES = {
    "paper": FusionShape("paper", 2048, 2048, 4096, 512),
    "cpu": FusionShape("cpu", 512, 512, 1024, 128),
}


def frame_gather_index(frames: int, device) -> torch.Tensor:
    """[L, 4] int64: token (f, r, c) owns patches (2r+dy, 2c+dx) of frame f, in Qwen's merge order."""
    th, tw = TOKENS_GRID
    f, r, c = torch.meshgrid(torch.arange(frames), torch.arange(th), torch.arange(tw), indexing="ij")
    dy = torch.tensor([0, 0, 1, 1])
    dx = torch.tensor([0, 1, 0, 1])
    rows = (2 * r.reshape(-1, 1) + dy) * (2 * tw) + (2 * c.reshape(-1, 1) + dx)
    return (f.reshape(-1, 1) * (4 * th * tw) + rows).to(device)


def make_case(shape: FusionShape, frames: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    torch.manual_seed(seed)
    fusion = GeoAlignFusion(shape.config()).to(device=device, dtype=dtype)
    fusion.check_finite = False
    L = shape.tokens(frames)
    N = 4 * L
    q = torch.randn(L, shape.hidden_size, device=device, dtype=dtype, requires_grad=True)
    layers = [torch.randn(N, shape.geo_dim, device=device, dtype=dtype) for _ in range(shape.num_layers)]
    gather_index = frame_gather_index(frames, device)
    if shape.group_size != 4:
        raise ValueError("the benchmark builds frame-wise G=4 gather indices only")
    return fusion, q, layers, gather_index


def run_fusion_case(shape: FusionShape, frames: int, backends: list[str], dtype: torch.dtype,
                    device: torch.device, budget_s: float, modes=("fwd", "fwdbwd")) -> list[dict]:
    """One row per (backend, mode): time percentiles, TFLOP/s of the sparse formula, memory, ratio to reference."""
    fusion, q, layers, gather_index = make_case(shape, frames, dtype, device)
    L = q.shape[0]
    grad_out = torch.randn_like(q)
    macs = shape.sparse_macs_per_token() * L
    rows = []
    for backend in backends:
        model = fusion
        if backend == "compiled-reference":
            fn_backend = "reference"
            model = torch.compile(fusion)
        else:
            fn_backend = backend

        def fwd():
            with torch.no_grad():
                return model(q, layers, gather_index, backend=fn_backend)

        def fwdbwd():
            q.grad = None
            for p in fusion.parameters():
                p.grad = None
            model(q, layers, gather_index, backend=fn_backend).backward(grad_out)

        for mode in modes:
            fn = fwd if mode == "fwd" else fwdbwd
            row = {"case": "fusion", "shape": shape.name, "backend": backend, "mode": mode, "frames": frames, "L": L,
                   "dtype": str(dtype).replace("torch.", "")}
            try:
                row.update(time_fn(fn, device, budget_s=budget_s))
                flops = 2 * macs * (3 if mode == "fwdbwd" else 1)
                row["tflops"] = flops / (row["median_ms"] * 1e-3) / 1e12
                row.update(measure_memory(fn, fusion, q, layers, gather_index, fn_backend, device, mode))
            except torch.cuda.OutOfMemoryError:
                row["status"] = "out of memory"
            except RuntimeError as e:  # CPU allocation failure
                if "alloc" not in str(e).lower():
                    raise
                row["status"] = f"out of memory ({e})"
            rows.append(row)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    ref = {(r["mode"]): r for r in rows if r["backend"] == "reference" and "median_ms" in r}
    for r in rows:
        base = ref.get(r["mode"])
        if base and "median_ms" in r:
            r["speedup_vs_reference"] = base["median_ms"] / r["median_ms"]
            for key in ("saved_bytes", "peak_bytes"):
                if r.get(key) and base.get(key):
                    r[f"{key}_ratio_vs_reference"] = r[key] / base[key]
    return rows


def measure_memory(fn, fusion, q, layers, gather_index, backend, device, mode) -> dict:
    """GPU: peak allocated during fn above what was allocated before. CPU: peak RSS above the RSS before, and the
    bytes saved for backward by one forward (fwdbwd only)."""
    out: dict = {}
    if mode == "fwdbwd":
        with SavedTensorMeter() as meter:
            y = fusion(q, layers, gather_index, backend=backend)
        out["saved_bytes"] = meter.bytes
        del y
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize()
        out["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
    elif reset_peak_rss():
        base = peak_rss_bytes()
        fn()
        peak = peak_rss_bytes()
        if base is not None and peak is not None:
            out["peak_bytes"] = peak - base
    return out


def shape_dict(shape: FusionShape) -> dict:
    return asdict(shape)
