"""Peak memory of one GeoAlign training step: streaming VGGT + sparse fusion vs the dense reference bank with all
VGGT layers kept (and the two mixed cases), at the same settings, on CPU at a small size.

    python -m bench.train_step --out bench/results/cpu/train_step.json [--frames 4 --height 280 ...]

Each variant runs in a fresh subprocess: it builds a small random GeoAlign model (tiny Qwen2.5-VL, a VGGT aggregator
with the paper's 24 layers and bank 12..23 at a reduced width, the fusion with M=12, K=2), a synthetic video
dataset, and a GeoAlignTrainer (accelerate, AdamW, gradient checkpointing, the same config for every variant).
After set-up it resets the process's peak RSS (``/proc/self/clear_refs`` <- 5) and runs one optimizer step; the
figure is VmHWM (peak resident set) during that step, read from /proc/self/status, minus the RSS before it.

Variants (VGGT layers x fusion bank):
  streaming_sparse   iter_layers: one bank layer alive at a time; sparse torch backend (K of M layers per token)
  streaming_dense    iter_layers; reference backend (the paper's dense L x M x D bank, eq. 2)
  all_layers_sparse  VGGT's forward: the list of all 24 layers is kept; sparse backend
  all_layers_dense   all 24 layers kept + dense reference bank (the baseline)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from geoalign import atomic_files

VARIANTS = {
    "streaming_sparse": ("stream", "torch"),
    "streaming_dense": ("stream", "reference"),
    "all_layers_sparse": ("all", "torch"),
    "all_layers_dense": ("all", "reference"),
}
BASELINE = "all_layers_dense"


def _status(field: str) -> int:
    """A memory field of /proc/self/status in bytes (-1 where unavailable)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return -1


def _all_layers_first(model, images, layer_ids, dtype):
    """geoalign.visual_fusion.stream_vggt_layers, but VGGT returns (and keeps) all of its layers before the first
    bank layer reaches the fusion: the dense baseline's memory."""
    vp = next(model.vggt.parameters())
    layers = model.vggt(images[None].to(device=vp.device, dtype=vp.dtype))      # all `depth` layers, kept
    ps = model.vggt.patch_start_idx
    model.vggt_calls += 1
    for position, layer_id in enumerate(layer_ids):
        yield position, layers[layer_id][:, :, ps:].reshape(-1, layers[layer_id].shape[-1]).to(dtype)
    del layers


def run_child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from geoalign.config import GeoAlignConfig
    from geoalign.geometry.config import VGGTAggregatorConfig
    from geoalign.modeling import GeoAlignForConditionalGeneration
    from geoalign.processing import GeoAlignProcessor
    from geoalign.tiny import make_tokenizer, tiny_qwen_config
    from geoalign.training.config import TrainConfig
    from geoalign.training.synthetic import make_colour_dataset
    from geoalign.training.trainer import GeoAlignTrainer

    from geoalign.memory import reset_peak_rss

    layers_mode, backend = VARIANTS[args.variant]
    torch.manual_seed(0)
    tok = make_tokenizer()
    vcfg = VGGTAggregatorConfig.tiny(embed_dim=args.embed_dim, patch_embed_dim=args.embed_dim, depth=24,
                                     num_heads=4, patch_embed_heads=4)
    fcfg = GeoAlignConfig(hidden_size=64, geo_dim=2 * args.embed_dim, bank_layers=tuple(range(12, 24)), top_k=2,
                          group_size=4, projector_hidden=args.projector_hidden, router_hidden=64, backend=backend)
    model = GeoAlignForConditionalGeneration.from_config(tiny_qwen_config(tok), vcfg, fcfg)
    if layers_mode == "all":
        from geoalign import visual_fusion

        if not callable(getattr(visual_fusion, "stream_vggt_layers", None)):
            raise RuntimeError("geoalign.visual_fusion.stream_vggt_layers is gone: the all-layers baseline would "
                               "silently measure the streaming path")
        visual_fusion.stream_vggt_layers = _all_layers_first
    width = 518
    src_h = max(1, round(args.height * 148 / width))        # source frames 148 px wide -> VGGT height args.height
    data = make_colour_dataset(args.workdir, 1, kinds=("video",), frame_counts=(args.frames,),
                               height=src_h + src_h % 2, width=148, multi_turn_every=0)
    proc = GeoAlignProcessor(tok, None, group_size=4, num_frames=args.frames)
    cfg = TrainConfig(train_data=[data], media_root=args.workdir, output_dir=os.path.join(args.workdir, "out"),
                      precision="no", distributed="ddp", global_batch_size=1, per_device_batch_size=1,
                      learning_rate=1e-5, max_steps=1, num_workers=0, logging_steps=1, save_steps=0,
                      progress_bar=False, save_final_model=False, fusion_backend=backend,
                      gradient_checkpointing=True, num_frames=args.frames)
    records = []
    trainer = GeoAlignTrainer(cfg, model=model, processor=proc, log_fn=lambda r: records.append(
        (r, _status("VmHWM"), time.perf_counter())))
    trainer._setup()
    sample = trainer.train_dataset[0]
    import gc

    gc.collect()
    rss_before = _status("VmRSS")
    reset_ok = reset_peak_rss()
    t0 = time.perf_counter()
    res = trainer.train()
    rec, hwm, t1 = records[0]
    return {"variant": args.variant, "vggt_layers": layers_mode, "fusion_backend": backend,
            "rss_before_step_bytes": rss_before, "peak_rss_step_bytes": hwm,
            "step_peak_over_before_bytes": hwm - rss_before, "peak_reset": reset_ok,
            "step_time_s": t1 - t0, "loss": res.losses[1],
            "shapes": {"frames": args.frames, "vggt_image": list(sample["vggt_pixel_values"].shape[-2:]),
                       "visual_tokens_L": int(sample["gather_index"].shape[0]),
                       "seq_len": int(sample["input_ids"].numel()), "vggt_depth": 24,
                       "vggt_layer_width_Dprime": 2 * args.embed_dim, "bank_layers": list(fcfg.bank_layers),
                       "top_k": fcfg.top_k, "group_size": 4, "projector_hidden": args.projector_hidden,
                       "hidden_D": 64}}


def run_variant(variant: str, frames: int, height: int = 280, embed_dim: int = 128, projector_hidden: int = 1024,
                threads: int = 1) -> dict:
    """One training step of `variant` in a fresh subprocess; returns its result dict."""
    import tempfile

    with tempfile.TemporaryDirectory() as wd:
        cmd = [sys.executable, "-m", __spec__.name, "--child", variant, "--workdir", wd, "--frames", str(frames),
               "--height", str(height), "--embed-dim", str(embed_dim), "--projector-hidden", str(projector_hidden),
               "--threads", str(threads)]
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=repo, env=env)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if r.returncode != 0 or line is None:
        print(r.stdout[-2000:], r.stderr[-4000:], file=sys.stderr)
        raise RuntimeError(f"train-step variant {variant} failed (exit {r.returncode})")
    return json.loads(line[len("RESULT "):])


def run_train_case(frames: int, variants=("streaming_sparse", "all_layers_dense"), progress=None) -> list[dict]:
    """`geoalign bench --case train` rows: one training step per variant (a single measurement, reps=1): its time
    and its peak RSS above the RSS before the step, with ratios against all_layers_dense."""
    from .fusion_case import add_ratios

    rows = []
    for v in variants:
        if progress is not None:
            progress(f"train frames={frames} {v}")
        r = run_variant(v, frames)
        ms = r["step_time_s"] * 1e3
        rows.append({"case": "train", "backend": v, "mode": "step", "frames": frames,
                     "L": r["shapes"]["visual_tokens_L"], "dtype": "float32", "median_ms": ms, "p20_ms": ms,
                     "p80_ms": ms, "reps": 1, "peak_bytes": r["step_peak_over_before_bytes"], "loss": r["loss"],
                     "shapes": r["shapes"]})
    add_ratios(rows, baseline=lambda r: r["backend"] == BASELINE)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.train_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--height", type=int, default=280, help="VGGT frame height (width is 518)")
    p.add_argument("--embed-dim", type=int, default=128, help="VGGT width (layer rows are 2x this)")
    p.add_argument("--projector-hidden", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.variant = args.child
        print("RESULT " + json.dumps(run_child(args)))
        return 0
    import torch

    for v in args.variants.split(","):
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; choose from {list(VARIANTS)}")
    results = [run_variant(v, args.frames, args.height, args.embed_dim, args.projector_hidden, args.threads)
               for v in args.variants.split(",")]
    base = next((r for r in results if r["variant"] == BASELINE), None)
    mb = 2 ** 20
    print(f"{'variant':<20} {'RSS before':>11} {'peak (step)':>12} {'step delta':>11} {'vs baseline':>12} "
          f"{'time':>7} {'loss':>8}")
    for r in results:
        ratio = (r["step_peak_over_before_bytes"] / base["step_peak_over_before_bytes"]) if base else float("nan")
        r["delta_vs_baseline"] = ratio
        print(f"{r['variant']:<20} {r['rss_before_step_bytes'] / mb:>9.0f}MB {r['peak_rss_step_bytes'] / mb:>10.0f}MB "
              f"{r['step_peak_over_before_bytes'] / mb:>9.0f}MB {ratio:>11.2f}x {r['step_time_s']:>6.1f}s "
              f"{r['loss']:>8.4f}")
    if results:
        print("shapes:", json.dumps(results[0]["shapes"]))
    if args.out:
        import platform

        import transformers

        out = {"benchmark": "train_step_peak_rss", "device": "cpu", "platform": platform.platform(),
               "cpu_count": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
               "python": sys.version.split()[0], "baseline": BASELINE, "settings": vars(args) | {"child": None},
               "results": results}
        atomic_files.write_json(args.out, out)
        print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
