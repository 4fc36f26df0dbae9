"""Peak host memory of streaming (iter_layers) vs the full-list forward, each in a fresh subprocess.

    python -m geoalign.geometry.measure_memory [--frames 4] [--dim 256] [--heads 4] [--layers 12-23] [--json out]

Method: Linux ``VmHWM`` (peak RSS) minus ``VmRSS`` measured just before the forward, in a child process that has
already built the model and the input (random weights, a reduced width so that it runs on a CPU in seconds; the
layer count, token counts and layer selection are VGGT-1B's). Torch has no CPU allocator peak counter; large
tensors are mmap-backed and returned to the OS when freed, so RSS follows live tensor memory closely.
On CUDA use ``torch.cuda.max_memory_allocated`` instead (``--device cuda``).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _child(args: argparse.Namespace) -> dict:
    import torch

    from .aggregator import VGGTAggregator
    from .config import VGGTAggregatorConfig

    torch.manual_seed(0)
    cfg = VGGTAggregatorConfig(patch_embed_dim=args.dim, embed_dim=args.dim, patch_embed_heads=args.heads,
                               num_heads=args.heads, patch_embed_depth=args.pe_depth, depth=args.depth)
    dev = torch.device(args.device)
    model = VGGTAggregator(cfg).to(dev)
    x = torch.rand(1, args.frames, 3, args.height, 518, device=dev)
    lo, hi = (int(v) for v in args.layers.split("-"))
    layers = list(range(lo, hi + 1))
    # warm-up on one frame so one-off allocations (thread pools, kernels) are not counted
    for _ in model.iter_layers(x[:, :1], [0]):
        pass
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    base_kb = _status_kb("VmRSS")
    checksum = 0.0
    if args.mode == "stream":
        for i, t in model.iter_layers(x, layers):
            checksum += float(t[0, 0, 0, 0])      # consume the layer, then drop it
            del t
    else:
        outs = model(x)
        sel = [outs[i][:, :, model.patch_start_idx:] for i in layers]
        checksum = sum(float(t[0, 0, 0, 0]) for t in sel)
        del outs, sel
    res = {"mode": args.mode, "peak_delta_MB": (_status_kb("VmHWM") - base_kb) / 1024, "checksum": checksum}
    if dev.type == "cuda":
        torch.cuda.synchronize()
        res["cuda_peak_delta_MB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    tokens = args.frames * (5 + (args.height // 14) * 37)
    res["one_layer_full_MB"] = tokens * 2 * args.dim * 4 / 2**20
    return res


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--height", type=int, default=392)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--depth", type=int, default=24)
    p.add_argument("--pe-depth", type=int, default=2)
    p.add_argument("--layers", default="12-23")
    p.add_argument("--device", default="cpu")
    p.add_argument("--mode", choices=("stream", "full", "both"), default="both")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.mode != "both":
        res = _child(args)
        print(json.dumps(res))
        return res
    results = {}
    base = [f"--frames={args.frames}", f"--height={args.height}", f"--dim={args.dim}", f"--heads={args.heads}",
            f"--depth={args.depth}", f"--pe-depth={args.pe_depth}", f"--layers={args.layers}",
            f"--device={args.device}"]
    for mode in ("stream", "full"):
        out = subprocess.run([sys.executable, "-m", "geoalign.geometry.measure_memory", *base, "--mode", mode],
                             check=True, capture_output=True, text=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
    results["config"] = vars(args)
    print(json.dumps(results, indent=1))
    if args.json:
        from ..atomic_files import write_json

        write_json(args.json, results, indent=1)
    return results


if __name__ == "__main__":
    main()
