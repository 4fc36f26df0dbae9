"""Time, throughput and memory of every fusion backend against the reference, measured in one run on this machine.

cases:
  fusion   the GeoAlign op: every backend against reference, in the modes fwd, bwd, fwdbwd, infer and infer-fold
  encoder  the VGGT aggregator with the fusion: streaming the bank layers against keeping VGGT's layer list
  train    one training step of a small model, streaming + sparse against all layers + dense (--case train)
The device's matmul and copy ceilings are measured first. Writes OUT/results.json and one PNG per case (the PNGs
need matplotlib: pip install "geoalign[plots]"). `python -m bench` from the repository root runs the same.
"""
from __future__ import annotations

import argparse
import os
import sys

from geoalign.backends import SPARSE_BACKENDS
from geoalign.cli_args import (ArgumentParser, UsageError, fail, has_module, output_dir, positive_float,
                               positive_int, resolve_device, use_device)

from .shapes import MODES, SHAPES, shape_dict

DTYPES = ("bfloat16", "float16", "float32", "float64")
CASES = ("fusion", "encoder", "train")
DEFAULT_CASES = ("fusion", "encoder")  # `train` spawns a process per variant: ask for it with --case train
BACKENDS = ("reference", "compiled-reference") + SPARSE_BACKENDS


def default_backends(device) -> list[str]:
    """Every backend that runs natively here. Triton under the CPU interpreter is a correctness tool, not a fast
    path, so it is left out on CPU unless named with --backends; torch.compile(reference) is on GPU by default."""
    from geoalign.backends import available_backends

    names = available_backends(device)
    if device.type != "cuda":
        return [n for n in names if n != "triton"]
    return names[:1] + ["compiled-reference"] + names[1:]


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or ArgumentParser(prog="geoalign bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if present, else cpu)")
    p.add_argument("--case", choices=CASES, action="append",
                   help="case(s) to run, repeatable (default: fusion and encoder; 'train' = one training step of a "
                        "small model, streaming+sparse vs all layers+dense, each in a fresh process)")
    p.add_argument("--frames", type=positive_int, nargs="+",
                   help="frame counts to sweep, 252 visual tokens per frame (default: 8 16 32 on GPU, 1 2 3 on CPU)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None,
                   help="fusion widths: 'paper' (D=D'=2048, H=4096; the GPU default), 'cpu' (1/4 of the paper's "
                        "widths; the CPU default) or 'tiny' (D=64, D'=48, H=96: for counting launches, not timing)")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=None, metavar="BACKEND",
                   help="fusion backends (reference is always added): " + ", ".join(BACKENDS)
                        + " (default: every one that runs natively here)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=None, help="fusion modes (default: all)")
    p.add_argument("--quick", action="store_true", help="one small frame count, short timing budget")
    p.add_argument("--budget", type=positive_float, default=None,
                   help="seconds of timing per measurement (default 1.0 on GPU, 0.5 on CPU, 0.3 with --quick)")
    p.add_argument("--out", default="bench_out", type=output_dir,
                   help="directory for results.json and the PNG plots (default bench_out)")
    p.set_defaults(func=run)
    return p


def _check_backends(names: list[str] | None, device) -> None:
    """Every backend named with --backends must run on ``device`` here (UsageError naming what can)."""
    if not names:
        return
    from geoalign.backends import backend_runs_on

    missing = [n for n in names if n != "compiled-reference" and not backend_runs_on(n, device)]
    if missing:
        raise UsageError(f"--backends {' '.join(missing)}: cannot run on {device} here (triton runs on CUDA, or on "
                         "the CPU under TRITON_INTERPRET=1; cuda needs a CUDA device and its extension)")


def run(args: argparse.Namespace) -> int:
    try:
        device = resolve_device(args.device)
        _check_backends(args.backends, device)
    except UsageError as e:
        return fail("bench", e)
    use_device(device)
    import torch

    from .encoder_case import run_encoder_case
    from .fusion_case import run_fusion_case
    from .peak import measure_ceilings
    from .report import environment, format_table, write_json, write_plots

    gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    shape = SHAPES[args.shape or ("paper" if gpu else "cpu")]
    if args.frames:
        frames = args.frames
    elif gpu:
        frames = [8] if args.quick else [8, 16, 32]
    else:
        frames = [1] if args.quick else [1, 2, 3]
    budget = args.budget if args.budget is not None else (0.3 if args.quick else (1.0 if gpu else 0.5))
    backends = args.backends or default_backends(device)
    if "reference" not in backends:
        backends = ["reference"] + backends
    modes = tuple(args.modes or MODES)
    cases = args.case or list(DEFAULT_CASES)
    encoder_backend = [b for b in backends if b not in ("reference", "compiled-reference")][-1:] or ["reference"]
    plots = has_module("matplotlib")
    if not plots:
        print("geoalign bench: matplotlib is not installed, so no PNG plots will be drawn (results.json and the "
              "table are written): pip install \"geoalign[plots]\"", file=sys.stderr)

    steps = [(c, f) for c in cases for f in frames]
    total = len(steps)
    bar = _progress(total)
    ceilings = measure_ceilings(device, dtype, quick=args.quick)
    rows: list[dict] = []
    for c, f in steps:
        note = bar.describe if bar else None
        if c == "fusion":
            rows += run_fusion_case(shape, f, backends, dtype, device, budget, modes=modes,
                                    peak_tflops=ceilings["matmul_tflops"], progress=note)
        elif c == "encoder":
            rows += run_encoder_case(f, encoder_backend[0], dtype, device, budget, progress=note)
        else:
            from .train_step import run_train_case

            rows += run_train_case(f, progress=note)
        if bar:
            bar.update()
    if bar:
        bar.close()

    env = environment(device)
    title = f"{env['device']} | fusion widths '{shape.name}', {str(dtype).replace('torch.', '')} | torch {env['torch']}"
    print(title)
    print(f"ceilings: matmul {ceilings['matmul_tflops']:.3f} TFLOP/s ({ceilings['matmul_dtype']}, "
          f"n={ceilings['matmul_n']}), copy {ceilings['copy_gbs']:.1f} GB/s")
    print(f"fusion shape: {shape_dict(shape)}")
    print("times: median (p20-p80) ms; TFLOP/s by the sparse FLOP formula; x vs ref = baseline time / time "
          "(baseline: reference for fusion, vggt-list for encoder, all_layers_dense for train); memory: "
          + ("peak allocated above the inputs" if gpu else "peak RSS above the RSS before the call")
          + "; saved = bytes autograd saves for backward")
    print(format_table(rows))
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "results.json"),
               {"environment": env, "ceilings": ceilings, "fusion_shape": shape_dict(shape),
                "dtype": str(dtype).replace("torch.", ""), "frames": frames, "rows": rows})
    written = ["results.json"]
    for c in cases:
        if plots and write_plots(os.path.join(args.out, f"{c}.png"), [r for r in rows if r["case"] == c],
                                 f"{c} | {title}"):
            written.append(f"{c}.png")
    print(f"wrote {', '.join(written)} to {args.out}" + ("" if plots else " (no PNGs: matplotlib is not installed)"))
    return 0


class _progress:
    """A tqdm progress bar on stderr when it is a terminal (no-op otherwise)."""

    def __new__(cls, total):
        try:
            from tqdm import tqdm
        except ImportError:
            return None
        self = super().__new__(cls)
        self.bar = tqdm(total=total, desc="bench", file=sys.stderr, disable=not sys.stderr.isatty())
        return self

    def describe(self, text: str) -> None:
        self.bar.set_postfix_str(text)

    def update(self) -> None:
        self.bar.update()

    def close(self) -> None:
        self.bar.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
