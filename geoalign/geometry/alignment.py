"""Mapping VGGT patch rows to Qwen2.5-VL visual tokens: ``gather_index`` (docs/architecture.md, "Frames and gather_index").

Conventions (all index maths in int64):

* One sample's VGGT layer output ``patch_tokens`` [1, S, h_v*w_v, D'] is flattened to rows
  ``R = patch_tokens.reshape(-1, D')``; patch (y, x) of frame f is row ``(f*h_v + y)*w_v + x``.
* Qwen's token grid is h_q x w_q patches of 14 px (both even), the top-left crop of VGGT's grid:
  ``h_q = h_v - h_v % 2``, ``w_q = w_v - w_v % 2``. Anything else is a mismatch and raises ValueError.
* Merged cell (r, c) owns patches (2r+dy, 2c+dx) in Qwen's merge order (dy, dx) = (0,0), (0,1), (1,0), (1,1)
  (checked against transformers' Qwen2VLImageProcessorPil in the tests).
* G = 4 (frames as separate images, as VG-LLM does): token l = (f*(h_q/2) + r)*(w_q/2) + c, and
  ``gather_index[l, 2*dy + dx]`` is the row of patch (2r+dy, 2c+dx) of frame f.
* G = 8 (Qwen's video path, temporal patch 2): token l = (t*(h_q/2) + r)*(w_q/2) + c for t < ceil(S/2), and
  ``gather_index[l, 4*dt + 2*dy + dx]`` is that patch in frame ``min(2t + dt, S - 1)``. An odd frame count is
  handled as Qwen2-VL's video processor does it (transformers ``Qwen2VLVideoProcessor.patchify``): the last frame
  is repeated to fill the final temporal pair, so the last token group reads the last frame twice.
"""
from __future__ import annotations

from typing import Sequence

import torch

PATCH_SIZE = 14           # pixels per patch side, VGGT's and Qwen2.5-VL's vision tower alike
MERGE_SIZE = 2            # Qwen2.5-VL merges 2x2 patches into one visual token
TEMPORAL_PATCH_SIZE = 2   # Qwen2.5-VL's video path pairs consecutive frames


def _check_grid(name: str, grid: Sequence[int]) -> tuple[int, int]:
    if len(grid) != 2 or any(isinstance(v, bool) or int(v) != v or int(v) <= 0 for v in grid):
        raise ValueError(f"{name} must be (height, width) in patches, two positive ints, got {tuple(grid)}")
    return int(grid[0]), int(grid[1])


def _check_num_frames(num_frames: int) -> int:
    if isinstance(num_frames, bool) or int(num_frames) != num_frames or num_frames < 1:
        raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
    return int(num_frames)


def qwen_grid_for_vggt(vggt_grid: Sequence[int], merge_size: int = MERGE_SIZE) -> tuple[int, int]:
    """Qwen's patch grid (h_q, w_q) for a VGGT patch grid: each side cropped down to a multiple of merge_size."""
    h_v, w_v = _check_grid("vggt_grid", vggt_grid)
    h_q, w_q = h_v - h_v % merge_size, w_v - w_v % merge_size
    if h_q == 0 or w_q == 0:
        raise ValueError(
            f"VGGT patch grid {h_v}x{w_v} is too small for Qwen: each side needs at least {merge_size} patches"
        )
    return h_q, w_q


def check_grids(vggt_grid: Sequence[int], qwen_grid: Sequence[int], merge_size: int = MERGE_SIZE) -> None:
    """Raise ValueError unless ``qwen_grid`` is exactly VGGT's grid cropped top-left to multiples of merge_size."""
    h_v, w_v = _check_grid("vggt_grid", vggt_grid)
    h_q, w_q = _check_grid("qwen_grid", qwen_grid)
    exp = qwen_grid_for_vggt((h_v, w_v), merge_size)
    if (h_q, w_q) != exp:
        raise ValueError(
            f"Qwen token grid {h_q}x{w_q} patches does not match VGGT's patch grid {h_v}x{w_v}: expected the top-left "
            f"crop {exp[0]}x{exp[1]} (did Qwen's processor resize the frames? feed it the crop from "
            "crop_for_qwen with do_resize=False, or check smart_resize's min/max pixels)"
        )


def num_visual_tokens(num_frames: int, qwen_grid: Sequence[int], group_size: int = 4,
                      merge_size: int = MERGE_SIZE) -> int:
    """L: S*(h_q/2)*(w_q/2) for G=4; ceil(S/2)*(h_q/2)*(w_q/2) for G=8."""
    num_frames = _check_num_frames(num_frames)
    h_q, w_q = _check_grid("qwen_grid", qwen_grid)
    per = (h_q // merge_size) * (w_q // merge_size)
    if group_size == 4:
        return num_frames * per
    if group_size == 8:
        return -(-num_frames // 2) * per
    raise ValueError(f"group_size must be 4 (images) or 8 (video, temporal patch 2), got {group_size}")


def qwen_grid_thw(num_frames: int, qwen_grid: Sequence[int], group_size: int = 4) -> torch.Tensor:
    """The ``image_grid_thw`` (G=4: S rows of [1, h_q, w_q]) or ``video_grid_thw`` (G=8: one row
    [ceil(S/2), h_q, w_q]) Qwen2.5-VL's processor produces for these frames; int64."""
    num_frames = _check_num_frames(num_frames)
    h_q, w_q = _check_grid("qwen_grid", qwen_grid)
    if group_size == 4:
        return torch.tensor([[1, h_q, w_q]] * num_frames, dtype=torch.int64)
    if group_size == 8:
        return torch.tensor([[-(-num_frames // 2), h_q, w_q]], dtype=torch.int64)
    raise ValueError(f"group_size must be 4 (images) or 8 (video, temporal patch 2), got {group_size}")


def check_grid_thw(grid_thw: torch.Tensor | Sequence[Sequence[int]], num_frames: int, qwen_grid: Sequence[int],
                   group_size: int = 4) -> None:
    """Raise ValueError unless Qwen's ``image_grid_thw`` / ``video_grid_thw`` for one sample is what these frames
    should give (see :func:`qwen_grid_thw`)."""
    got = torch.as_tensor(grid_thw)
    if got.is_floating_point() or got.is_complex() or got.dtype == torch.bool:
        raise ValueError(f"Qwen grid_thw must hold integers (t, h, w), got dtype {got.dtype}: {got.tolist()}")
    got = got.to(torch.int64).reshape(-1, 3)
    exp = qwen_grid_thw(num_frames, qwen_grid, group_size)
    if got.shape != exp.shape or not torch.equal(got, exp):
        raise ValueError(
            f"Qwen grid_thw {got.tolist()} does not match the VGGT-aligned frames: expected {exp.tolist()} "
            f"for {num_frames} frames, grid {tuple(qwen_grid)}, G={group_size}"
        )


def build_gather_index(num_frames: int, vggt_grid: Sequence[int], qwen_grid: Sequence[int] | None = None,
                       group_size: int = 4, merge_size: int = MERGE_SIZE) -> torch.Tensor:
    """gather_index [L, G] int64 into one sample's flattened layer rows [S*h_v*w_v, D'] (see module docstring).

    num_frames: S >= 1. vggt_grid: (h_v, w_v) patches. qwen_grid: (h_q, w_q) patches, default the even top-left
    crop of vggt_grid; any other value raises ValueError. group_size: 4 or 8.
    """
    num_frames = _check_num_frames(num_frames)
    if isinstance(merge_size, bool) or not isinstance(merge_size, int) or merge_size != 2:
        raise ValueError(f"only Qwen2.5-VL's 2x2 merge is supported, got merge_size={merge_size!r}")
    h_v, w_v = _check_grid("vggt_grid", vggt_grid)
    if qwen_grid is None:
        qwen_grid = qwen_grid_for_vggt((h_v, w_v), merge_size)
    check_grids((h_v, w_v), qwen_grid, merge_size)
    h_q, w_q = int(qwen_grid[0]), int(qwen_grid[1])
    hm, wm = h_q // merge_size, w_q // merge_size
    i64 = torch.int64
    r = torch.arange(hm, dtype=i64).view(hm, 1, 1)
    c = torch.arange(wm, dtype=i64).view(1, wm, 1)
    dy = torch.tensor([0, 0, 1, 1], dtype=i64).view(1, 1, 4)        # Qwen merge order (0,0),(0,1),(1,0),(1,1)
    dx = torch.tensor([0, 1, 0, 1], dtype=i64).view(1, 1, 4)
    in_frame = (2 * r + dy) * w_v + (2 * c + dx)                     # [hm, wm, 4] row inside one frame
    frame_rows = int(h_v) * int(w_v)
    if group_size == 4:
        f = torch.arange(num_frames, dtype=i64).view(-1, 1, 1, 1)
        idx = f * frame_rows + in_frame                              # [S, hm, wm, 4]
        return idx.reshape(-1, 4).contiguous()
    if group_size == 8:
        t = torch.arange(-(-num_frames // 2), dtype=i64).view(-1, 1)
        frames = torch.clamp(2 * t + torch.arange(2, dtype=i64).view(1, 2), max=num_frames - 1)  # [T, 2]
        idx = frames.view(-1, 1, 1, 2, 1) * frame_rows + in_frame.view(1, hm, wm, 1, 4)       # [T, hm, wm, 2, 4]
        return idx.reshape(-1, 8).contiguous()
    raise ValueError(f"group_size must be 4 (images) or 8 (video, temporal patch 2), got {group_size}")


def check_token_count(gather_index: torch.Tensor, num_tokens: int) -> None:
    """Raise ValueError unless gather_index has one row per Qwen visual token."""
    if gather_index.shape[0] != num_tokens:
        raise ValueError(
            f"VGGT/Qwen token mismatch: gather_index has {gather_index.shape[0]} rows (VGGT-aligned visual tokens), "
            f"but Qwen produced {num_tokens} visual tokens"
        )


def concat_gather_indices(indices: Sequence[torch.Tensor], rows_per_sample: Sequence[int]) -> torch.Tensor:
    """Concatenate per-sample gather_index tensors for a batch whose layer rows are concatenated (flat over the
    batch): sample b's indices are offset by the total rows of samples 0..b-1. Returns [sum L_b, G] int64.

    rows_per_sample[b] = S_b * h_v * w_v (rows of sample b's flattened layer). For a [B, S, h*w, D'] layer of
    equal samples use ``[S*h*w] * B``; the result then indexes ``layer.reshape(-1, D')``.
    """
    if len(indices) != len(rows_per_sample):
        raise ValueError(f"got {len(indices)} gather_index tensors but {len(rows_per_sample)} row counts")
    if len(indices) == 0:
        raise ValueError("need at least one gather_index")
    g = indices[0].shape[-1]
    out = []
    offset = 0
    for b, (gi, rows) in enumerate(zip(indices, rows_per_sample)):
        if gi.dim() != 2 or gi.shape[-1] != g:
            raise ValueError(f"gather_index {b} must be [L, {g}], got {tuple(gi.shape)}")
        if gi.numel() and (int(gi.min()) < 0 or int(gi.max()) >= rows):
            raise ValueError(f"gather_index {b} holds rows outside [0, {rows}) (max {int(gi.max())})")
        out.append(gi.to(torch.int64) + offset)
        offset += int(rows)
    return torch.cat(out, dim=0)


def gather_rows(layer: torch.Tensor, gather_index: torch.Tensor) -> torch.Tensor:
    """Reference gather: ``layer`` [..., D'] (flattened to rows) -> [L, G*D'] (the G rows concatenated)."""
    rows = layer.reshape(-1, layer.shape[-1])
    return rows[gather_index.reshape(-1)].reshape(gather_index.shape[0], -1)
