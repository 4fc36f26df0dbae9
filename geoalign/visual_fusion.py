"""The routed bank fusion of a batch's visual tokens (the paper's GeoAlign): per sample, route Q_b first, then run VGGT
on that sample's frames and feed each bank layer to the fusion stream as it is produced; no layer list is ever held.
GeoAlignModel calls these from get_image_features / get_video_features (geoalign.modeling); in-LLM injection and the
progressive fusion have their own modules (geoalign.injection, geoalign.progressive).
"""
from __future__ import annotations

from typing import Iterator

import torch

from .model_inputs import SampleGeometry, as_samples, frame_groups, split_by_sample


def fuse_visual_tokens(model, q: torch.Tensor, grid_thw: torch.Tensor, samples, gather_index=None,
                       backend: str | None = None) -> torch.Tensor:
    """Q [L_total, D] (the vision tower's merged output for the whole batch, sample-major) -> Q_hat, for ``model``
    (a GeoAlignModel). ``samples``: per-sample VGGT frames (as ``vggt_pixel_values``). One fusion stream per sample
    and one VGGT pass per distinct frames tensor (generate's beam copies share theirs). Raises ValueError when Qwen's
    grids / token counts do not match the VGGT frames. Not for the progressive fusion (it also needs the tower's
    intermediate blocks: use forward)."""
    if model.fusion.config.is_progressive:
        raise ValueError("fuse_visual_tokens runs the routed bank fusion; this model uses the progressive "
                         "fusion, which also needs the vision tower's intermediate blocks: call the model's "
                         "forward")
    if not (isinstance(samples, list) and samples and isinstance(samples[0], SampleGeometry)):
        samples = as_samples(samples, gather_index)
    parts = split_by_sample(q, grid_thw, samples, model.group_size)
    out: list = [None] * len(parts)
    routings: list = [None] * len(parts)
    for members in frame_groups([s for _, s, _ in parts]):
        fused = fuse_with_frames(model, [parts[b][0] for b in members], parts[members[0]][1].images,
                                 [parts[b][2] for b in members], backend)
        for b, (q_hat, routing) in zip(members, fused):
            out[b], routings[b] = q_hat, routing
    if model.routing_recorder is not None:  # in sample order, each sample once (generate's copies share theirs)
        seen: set[int] = set()
        for (_, s, gi), routing in zip(parts, routings):
            if id(s) not in seen:
                seen.add(id(s))
                model.routing_recorder.add(routing, gi, s.images, model.fusion.config.bank_layers)
    return torch.cat(out, dim=0) if len(out) > 1 else out[0]


def stream_vggt_layers(model, images: torch.Tensor, layer_ids,
                       dtype: torch.dtype) -> Iterator[tuple[int, torch.Tensor]]:
    """(position in ``layer_ids``, layer rows [N, D']) for one sample's frames [S, 3, H, W]: one pass of
    ``model.vggt``, each layer yielded as VGGT produces it (ascending ids); counts the pass in model.vggt_calls."""
    position = {layer: i for i, layer in enumerate(layer_ids)}
    vp = next(model.vggt.parameters())
    images = images.to(device=vp.device, dtype=vp.dtype)
    model.vggt_calls += 1
    for layer_id, tokens in model.vggt.iter_layers(images[None], layer_ids, out_dtype=dtype):
        yield position[layer_id], tokens.reshape(-1, tokens.shape[-1])


def fuse_with_frames(model, queries: list[torch.Tensor], images: torch.Tensor, gather_indices: list[torch.Tensor],
                     backend: str | None) -> list[tuple[torch.Tensor, object]]:
    """(Q_hat, Routing) for each of ``queries`` (Q_b [L_b, D]) whose sample has the frames ``images``: route each
    first, then stream one VGGT pass over the frames into every stream."""
    fp = model.fusion.weight_like
    streams = [model.fusion.begin(q.to(device=fp.device, dtype=fp.dtype),
                                  gi.to(device=fp.device, dtype=torch.int64), backend=backend)
               for q, gi in zip(queries, gather_indices)]
    # the routers read only Q: the routes are known before the first bank layer arrives
    for position, rows in stream_vggt_layers(model, images, model.fusion.config.bank_layers, fp.dtype):
        rows = rows.to(fp.device)
        for stream in streams:
            stream.add(position, rows)
        del rows
    return [stream.finish() for stream in streams]
