"""``geoalign routes``: where the router sends each input's visual tokens (the paper's Figure 3, for your scenes)."""
from __future__ import annotations

import argparse
import os
import sys

from .backends import ALL_BACKENDS
from .cli_args import UsageError, fail, has_module, local_path, output_dir, positive_int
from .model_cli import add_model_arguments, check_model_arguments, load_model_and_processor, move_to

ROUTES_HELP = """Where GeoAlign's router sends each input's visual tokens: the mean routing weight per VGGT bank layer,
per input and per frame (the paper's Figure 3, for your own scenes).

example:
  geoalign routes --model DIR --video a.mp4 b.mp4 --images frames/ --out routes/

For each input, one prefill forward (the router reads only Qwen's visual tokens, so the question does not change the
routing; it is asked for completeness). Writes into --out:
  routing.json          per input: mean routing weight per bank layer in % (sums to 100), selection frequency per
                        layer, per-frame per-layer means, token and frame counts (geoalign/routing_analysis.py)
  routing_layers.png    Figure 3 style bars: per bank layer, one bar per input
  routing_heatmap.png   per input (rows) and frame: the highest-alpha bank layer at every token, over the faded frame
The PNGs need matplotlib (pip install "geoalign[plots]"); without it routing.json alone is written.
"""


def add_routes_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("routes", help="routing analysis: mean routing weight per VGGT bank layer, per input "
                              "and per frame, as JSON and PNGs", description=ROUTES_HELP,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--video", nargs="+", type=local_path, default=[], help="video files")
    p.add_argument("--images", nargs="+", type=local_path, default=[], help="folders of frames (natural sort order)")
    p.add_argument("--out", required=True, type=output_dir, help="output directory (created if missing)")
    p.add_argument("--num-frames", type=positive_int, default=32,
                   help="frames sampled uniformly per input (default 32)")
    p.add_argument("--question", default="Describe the scene.", help="the prompt of the prefill forward")
    p.add_argument("--max-frames", type=positive_int, default=4, help="frames per input in the heat map (default 4)")
    p.add_argument("--backend", default=None, choices=ALL_BACKENDS,
                   help="fusion backend (default: the model's own)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_routes)
    return p


def input_names(sources: list[str]) -> list[str]:
    """Short unique labels: the file / folder names, numbered where they repeat."""
    base = [os.path.basename(os.path.normpath(s)) or s for s in sources]
    return [b if base.count(b) == 1 else f"{b} ({i})" for i, b in enumerate(base)]


def run_routes(args: argparse.Namespace) -> int:
    sources = list(args.video) + list(args.images)
    try:
        if not sources:
            raise UsageError("give at least one --video FILE or --images DIR")
        for path in args.video:
            if not os.path.isfile(path):
                raise UsageError(f"--video {path!r} is not a file")
        for path in args.images:
            if not os.path.isdir(path):
                raise UsageError(f"--images {path!r} is not a folder")
        device = check_model_arguments(args)
        model, processor = load_model_and_processor(args, device)
    except (FileNotFoundError, ValueError) as e:
        return fail("routes", e)
    import torch

    from .atomic_files import write_json
    from .routing_analysis import plot_heatmaps, plot_layer_bars

    plots = has_module("matplotlib")
    if not plots:
        print("geoalign routes: matplotlib is not installed, so no PNGs will be drawn (routing.json is written): "
              "pip install \"geoalign[plots]\"", file=sys.stderr)

    names = input_names(sources)
    samples, frames, records = [], [], []
    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(sources), desc="routes", unit="input")
    try:
        for source, name in zip(sources, names):
            try:
                inputs = processor(source, args.question)
            except (FileNotFoundError, ValueError, OSError) as e:
                return fail("routes", f"{source}: {e}")
            inputs = move_to(inputs, device)
            try:
                with torch.no_grad(), model.record_routing(keep_tensors=True) as recorder:
                    model(**inputs, fusion_backend=args.backend)
            except ValueError as e:
                return fail("routes", e)
            sample = recorder.samples[0]
            samples.append(sample)
            frames.append(inputs["vggt_pixel_values"][0])
            records.append({"name": name, "source": os.path.abspath(source), **sample.summary()})
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "routing.json"),
               {"model": args.model or {"qwen": args.qwen, "vggt": args.vggt, "fusion": args.fusion},
                "question": args.question, "num_frames": args.num_frames, "inputs": records})
    if plots:
        plot_layer_bars(records, names, os.path.join(args.out, "routing_layers.png"))
        plot_heatmaps(samples, frames, names, os.path.join(args.out, "routing_heatmap.png"),
                      max_frames=args.max_frames)
    for r in records:
        top = max(range(len(r["bank_layers"])), key=lambda i: r["mean_alpha_pct"][i])
        print(f"{r['name']}: {r['num_tokens']} tokens, {r['num_frames']} frames; most weight on layer "
              f"{r['bank_layers'][top]} ({r['mean_alpha_pct'][top]:.1f}%)")
    print(f"wrote {os.path.join(args.out, 'routing.json')}"
          + (", routing_layers.png, routing_heatmap.png" if plots else " (no PNGs: matplotlib is not installed)"))
    return 0
