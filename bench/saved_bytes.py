"""Bytes saved for backward by one forward of each backend, at the paper's widths by default.

    python -m bench.saved_bytes --tokens 2048 --dtype float32 [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from geoalign import GeoAlignFusion
from geoalign.memory import SavedTensorMeter

from .shapes import SHAPES
from .report import environment, write_json


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=2048, help="L, visual tokens")
    p.add_argument("--shape", choices=sorted(SHAPES), default="paper")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--backends", nargs="+", default=["reference", "torch"])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    shape, dtype = SHAPES[args.shape], getattr(torch, args.dtype)
    torch.manual_seed(0)
    fusion = GeoAlignFusion(shape.config()).to(dtype)
    L, G = args.tokens, shape.group_size
    N = L * G
    q = torch.randn(L, shape.hidden_size, dtype=dtype, requires_grad=True)
    layers = [torch.randn(N, shape.geo_dim, dtype=dtype) for _ in range(shape.num_layers)]
    gather_index = torch.randperm(N).reshape(L, G)
    rows = []
    for backend in args.backends:
        t0 = time.perf_counter()
        with SavedTensorMeter(exclude=fusion.parameters()) as meter:
            y = fusion(q, layers, gather_index, backend=backend)
        t1 = time.perf_counter()
        y.sum().backward()
        t2 = time.perf_counter()
        del y
        rows.append({"backend": backend, "saved_bytes": meter.bytes, "fwd_s": t1 - t0, "bwd_s": t2 - t1})
        print(f"{backend:>10}: saved for backward {meter.bytes / 2**20:10.1f} MiB   fwd {t1 - t0:6.2f} s   "
              f"bwd {t2 - t1:6.2f} s", flush=True)
    ref = rows[0]["saved_bytes"]
    for r in rows:
        r["ratio_vs_" + rows[0]["backend"]] = r["saved_bytes"] / ref
    print("ratios:", {r["backend"]: round(r["saved_bytes"] / ref, 4) for r in rows})
    if args.out:
        write_json(args.out, {"environment": environment(torch.device("cpu")), "shape": vars(shape) | {"L": L},
                              "dtype": args.dtype, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
