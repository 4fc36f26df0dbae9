"""The encoder case: VGGT aggregator + fusion, streaming the bank layers vs keeping VGGT's full layer list.

  vggt-list    VGGT's own way: run all 24 layers, keep them as a list, then fuse the bank layers from it
  vggt-stream  route first, then feed each bank layer to the fusion as the aggregator yields it; nothing holds
               more than one layer, and no block past the last bank layer runs

Modes: `infer` (everything under no_grad) and `fwdbwd` (VGGT frozen under no_grad, fusion forward + backward).
On CPU the aggregator is a reduced config (width 128, 4 heads, 24 layers, 2-block backbone) on 224x168 frames; on
GPU it is VGGT-1B's architecture (random weights) on 518x392 frames.
"""
from __future__ import annotations

import gc

import torch

from geoalign import GeoAlignConfig, GeoAlignFusion
from geoalign.geometry import VGGTAggregator, VGGTAggregatorConfig, build_gather_index
from geoalign.memory import peak_rss_bytes, reset_peak_rss

from .fusion_case import add_ratios
from .timing import time_fn

BANK = tuple(range(12, 24))


def encoder_setup(device: torch.device, dtype: torch.dtype):
    """(aggregator config, frame (H, W), fusion config) for this device."""
    if device.type == "cuda":
        agg = VGGTAggregatorConfig.vggt_1b()
        frame = (392, 518)
        fusion = GeoAlignConfig(hidden_size=2048, geo_dim=agg.out_dim, bank_layers=BANK)
    else:
        agg = VGGTAggregatorConfig(img_size=224, patch_embed_dim=128, patch_embed_depth=2, patch_embed_heads=4,
                                   embed_dim=128, depth=24, num_heads=4)
        frame = (168, 224)
        fusion = GeoAlignConfig(hidden_size=256, geo_dim=agg.out_dim, bank_layers=BANK, projector_hidden=512,
                                router_hidden=64)
    return agg, frame, fusion


def run_encoder_case(frames: int, fusion_backend: str, dtype: torch.dtype, device: torch.device, budget_s: float,
                     modes=("infer", "fwdbwd"), progress=None) -> list[dict]:
    agg_cfg, (H, W), fcfg = encoder_setup(device, dtype)
    torch.manual_seed(0)
    aggregator = VGGTAggregator(agg_cfg).to(device)  # fp32 weights; bf16 autocast on GPU inside iter_layers
    fusion = GeoAlignFusion(fcfg).to(device=device, dtype=dtype)
    fusion.check_inputs = False
    images = torch.rand(1, frames, 3, H, W, device=device)
    grid = (H // agg_cfg.patch_size, W // agg_cfg.patch_size)
    gather_index = build_gather_index(frames, grid).to(device)
    q = torch.randn(gather_index.shape[0], fcfg.hidden_size, device=device, dtype=dtype, requires_grad=True)
    ps = agg_cfg.num_register_tokens + 1

    def fuse_list():
        all_layers = aggregator(images)  # 24 x [1, S, P, 2C], special tokens included
        bank = [all_layers[i][:, :, ps:].reshape(-1, fcfg.geo_dim).to(dtype) for i in BANK]
        return fusion(q, bank, gather_index, backend=fusion_backend)

    def fuse_stream():
        stream = fusion.begin(q, gather_index, backend=fusion_backend)
        for pos, (_, tokens) in enumerate(aggregator.iter_layers(images, BANK, out_dtype=dtype)):
            stream.add(pos, tokens.reshape(-1, fcfg.geo_dim))
        return stream.finish()[0]

    rows = []
    for name, fuse in (("vggt-list", fuse_list), ("vggt-stream", fuse_stream)):
        for mode in modes:
            if progress is not None:
                progress(f"encoder frames={frames} {name} {mode}")

            def fn(_=None, fuse=fuse, mode=mode):
                if mode == "infer":
                    with torch.no_grad():
                        return fuse()
                q.grad = None
                for p in fusion.parameters():
                    p.grad = None
                fuse().sum().backward()

            row = {"case": "encoder", "backend": f"{name}+{fusion_backend}", "mode": mode, "frames": frames,
                   "L": q.shape[0], "dtype": str(dtype).replace("torch.", ""), "image_hw": [H, W]}
            try:  # the memory measurement is also the timing's warm-up call
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    base = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    fn()
                    torch.cuda.synchronize()
                    row["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
                elif reset_peak_rss():
                    base = peak_rss_bytes()
                    fn()
                    row["peak_bytes"] = peak_rss_bytes() - base
                else:
                    fn()
                row.update(time_fn(fn, device, budget_s=budget_s, min_reps=3, warmup=0))
            except torch.cuda.OutOfMemoryError:
                row = {k: row[k] for k in ("case", "backend", "mode", "frames", "L", "dtype")}
                row["status"] = "out of memory"
            rows.append(row)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    # ratios against the list way, same mode and frames
    for r in rows:
        r["_base"] = r["backend"].startswith("vggt-list")
    add_ratios(rows, baseline=lambda r: r["_base"])
    for r in rows:
        del r["_base"]
    return rows
