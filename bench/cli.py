"""`geoalign bench` / `python -m bench`: time and memory of each backend against `reference`, in one run."""
from __future__ import annotations

import argparse
import os
import sys

import torch

from .fusion_case import SHAPES, run_fusion_case, shape_dict
from .report import environment, format_table, write_json, write_plots

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
CASES = ("fusion",)


def default_backends(device: torch.device) -> list[str]:
    """Every backend that runs natively here. Triton under the CPU interpreter is a correctness tool, not a fast
    path, so it is left out on CPU unless named with --backends."""
    from geoalign.backends import available_backends

    names = available_backends(device)
    if device.type != "cuda":
        names = [n for n in names if n != "triton"]
    else:
        names.insert(1, "compiled-reference")
    return names


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="geoalign bench", description=__doc__)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if present, else cpu)")
    p.add_argument("--case", choices=CASES, action="append", help="case(s) to run (default: all)")
    p.add_argument("--frames", type=int, nargs="+", help="frame counts to sweep (252 visual tokens per frame)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None,
                   help="fusion widths: 'paper' (D=D'=2048, H=4096; GPU default) or 'cpu' (1/4 width; CPU default)")
    p.add_argument("--backends", nargs="+", default=None,
                   help="backends to compare (reference is always added); also 'compiled-reference'")
    p.add_argument("--quick", action="store_true", help="one small frame count, short timing budget")
    p.add_argument("--budget", type=float, default=None, help="seconds of timing per measurement")
    p.add_argument("--out", default="bench_out", help="directory for results.json and the PNG plots")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda given, but no CUDA device is available", file=sys.stderr)
        return 2
    gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bfloat16" if gpu else "float32")]
    shape = SHAPES[args.shape or ("paper" if gpu else "cpu")]
    frames = args.frames or (([8] if args.quick else [8, 16, 32]) if gpu else ([1] if args.quick else [1, 2, 4]))
    budget = args.budget if args.budget is not None else (0.5 if args.quick else (1.0 if gpu else 2.0))
    backends = args.backends or default_backends(device)
    if "reference" not in backends:
        backends = ["reference"] + backends
    cases = args.case or list(CASES)

    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    jobs = [(case, f) for case in cases for f in frames]
    bar = tqdm(jobs, desc="bench", file=sys.stderr, disable=tqdm is None or not sys.stderr.isatty()) if tqdm else jobs
    rows: list[dict] = []
    for case, f in bar:
        if tqdm and hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"{case} frames={f}")
        rows += run_fusion_case(shape, f, backends, dtype, device, budget)

    env = environment(device)
    title = f"{env['device']} | {shape.name} widths, {str(dtype).replace('torch.', '')} | torch {env['torch']}"
    print(title)
    print(f"shape: {shape_dict(shape)}; 252 visual tokens per frame; times are medians (p20-p80 shown); "
          "x vs ref = reference time / backend time; memory: "
          + ("peak allocated above the inputs" if gpu else
             "saved-for-backward bytes, and peak RSS above the RSS before the call"))
    print(format_table(rows))
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "results.json"),
               {"environment": env, "shape": shape_dict(shape), "dtype": str(dtype), "frames": frames, "rows": rows})
    plotted = write_plots(os.path.join(args.out, "fusion.png"), [r for r in rows if r["case"] == "fusion"], title)
    print(f"wrote {os.path.join(args.out, 'results.json')}" + (" and fusion.png" if plotted else
                                                              " (install matplotlib for the PNG plots)"))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
