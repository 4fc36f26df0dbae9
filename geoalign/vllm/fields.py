"""GeoAlign's vLLM fields, built from frames by the transformers model's processor (no vLLM import: the default
test suite checks them). Which item carries what, and why: geoalign.vllm.processing.

G = 4 (images), per image item k of a prompt with S frames, as ``image_fields`` returns them (each a list or a
tensor with one entry per item):

    image_grid_thw         int64 [3]: frame k's grid (vLLM's placeholders and M-RoPE positions)
    geoalign_item          int64 [4]: (request key high, low 64 bits, k, S)
    geoalign_pixel_values  float32 [L*4, 1176] for k = 0 (every frame's Qwen patches), [0, 1176] for k > 0
    geoalign_grid_thw      int64 [S, 3] for k = 0, [0, 3] for k > 0
    vggt_pixel_values      float32 [S, 3, H, W] for k = 0, [0, 3, H, W] for k > 0
    gather_index           int64 [L, 4] for k = 0, [0, 4] for k > 0

G = 8 (video), per video item: ``pixel_values_videos`` (its patches), ``video_grid_thw`` [3], ``second_per_grid_ts``,
``vggt_pixel_values`` [S, 3, H, W] and ``gather_index`` [L, 8].
"""
from __future__ import annotations

import uuid
from collections.abc import Mapping

import numpy as np
import torch

from ..geometry.frames import SampledFrames
from ..processing import GeoAlignProcessor

IMAGE_FIELDS = ("image_grid_thw", "geoalign_item", "geoalign_pixel_values", "geoalign_grid_thw", "vggt_pixel_values",
                "gather_index")


def image_fields(proc: GeoAlignProcessor, images: list, key: uuid.UUID) -> dict:
    """The G = 4 fields of one prompt's images (its S frames, in order), ``key`` naming the request."""
    enc = proc.encode_frames([_as_frame(im) for im in images])
    S = enc.num_items
    hi, lo = (int.from_bytes(key.bytes[i:i + 8], "little", signed=True) for i in (0, 8))
    empty = {"geoalign_pixel_values": enc.pixel_values[:0], "geoalign_grid_thw": enc.grid_thw[:0],
             "vggt_pixel_values": enc.vggt_pixel_values[:0], "gather_index": enc.gather_index[:0]}
    full = {"geoalign_pixel_values": enc.pixel_values, "geoalign_grid_thw": enc.grid_thw,
            "vggt_pixel_values": enc.vggt_pixel_values, "gather_index": enc.gather_index}
    out = {name: [full[name]] + [empty[name]] * (S - 1) for name in full}
    out["image_grid_thw"] = enc.grid_thw
    out["geoalign_item"] = torch.tensor([[hi, lo, k, S] for k in range(S)], dtype=torch.int64)
    return out


def video_fields(proc: GeoAlignProcessor, videos: list, metadata: list) -> dict:
    """The G = 8 fields of a prompt's videos (each [T, H, W, 3] uint8 frames, with vLLM's metadata or None)."""
    encoded = [proc.encode_frames(SampledFrames([_as_frame(f) for f in v], _sampled_fps(m)))
               for v, m in zip(videos, metadata)]
    return {"pixel_values_videos": torch.cat([e.pixel_values for e in encoded]),
            "video_grid_thw": torch.cat([e.grid_thw for e in encoded]),
            "second_per_grid_ts": torch.tensor([e.second_per_grid for e in encoded], dtype=torch.float32),
            "vggt_pixel_values": [e.vggt_pixel_values for e in encoded],
            "gather_index": [e.gather_index for e in encoded]}


def _as_frame(frame):
    """A frame as vLLM hands it over: a PIL image or a uint8 array [H, W, 3] (a tensor becomes an array); anything
    else is a ValueError naming what came."""
    if isinstance(frame, torch.Tensor):
        frame = frame.numpy()
    if isinstance(frame, np.ndarray) and frame.dtype != np.uint8:
        raise ValueError(f"a frame must be a PIL image or a uint8 array [H, W, 3], got a {frame.dtype} array of "
                         f"shape {frame.shape}")
    return frame


def _sampled_fps(metadata) -> float | None:
    """The rate of the frames vLLM hands over (transformers' VideoMetadata.sampled_fps: frames kept / frames in
    the file * the file's rate), or None without a rate."""
    if metadata is None:
        return None
    get = metadata.get if isinstance(metadata, Mapping) else (lambda k, d=None: getattr(metadata, k, d))
    fps, total, kept = get("fps"), get("total_num_frames"), get("frames_indices")
    if not fps or fps <= 0:
        return None
    if total and kept is not None and len(kept):
        return len(kept) / total * fps
    return float(fps)
