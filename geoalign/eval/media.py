"""Where a question's video/frames are on disk, and lazy frame loading through ``geoalign.geometry``.

Decoding and sampling are :mod:`geoalign.geometry.frames`' (the code ``GeoAlignProcessor`` and
``geoalign answer`` use): ``num_frames`` indices ``round(linspace(0, n - 1, num_frames))`` over the
whole clip (first and last frame included; ``sampling="linspace-floor"`` truncates instead, as VG-LLM),
all frames when the clip is shorter; videos are decoded in one sequential pass with PyAV.

The one thing added here is the benchmarks' folder layout: which files of a ScanNet scene folder are
its colour frames (:func:`list_frame_files`; ``posed_images`` keeps depth ``.png`` next to the colour
``.jpg``, which a plain image-folder loader would mix in).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Sequence

from ..local_paths import resolve_inside

VIDEO_EXTS = (".mp4", ".mkv", ".avi", ".mov", ".webm")


@dataclass(frozen=True)
class MediaRef:
    """A video file (``kind='video'``) or a folder of frame images (``kind='frames'``)."""

    path: str
    kind: str  # "video" | "frames"


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def list_frame_files(folder: str) -> list[str]:
    """Colour frames of a scene folder in natural order.

    Uses ``folder/color`` when present (ScanNet SensReader export); prefers ``.jpg`` over
    ``.png`` because ScanNet "posed_images" folders keep depth maps as ``.png`` next to
    the ``.jpg`` colour frames.
    """
    if os.path.isdir(os.path.join(folder, "color")):
        folder = os.path.join(folder, "color")
    names = os.listdir(folder)
    for exts in ((".jpg", ".jpeg"), (".png",)):
        picked = [n for n in names if n.lower().endswith(exts)]
        if picked:
            return [os.path.join(folder, n) for n in sorted(picked, key=_natural_key)]
    return []


def find_scene_media(scene_id: str, roots: Sequence[str]) -> MediaRef:
    """First match of ``{root}/{scene_id}{.mp4,...}`` or ``{root}/{scene_id}/`` (frames); a scene id that climbs out of
    a root (``..``) is a ValueError."""
    tried = []
    for root in roots:
        for ext in VIDEO_EXTS:
            p = resolve_inside(root, scene_id + ext, "scene")
            if os.path.isfile(p):
                return MediaRef(p, "video")
        d = resolve_inside(root, scene_id, "scene")
        if os.path.isdir(d) and list_frame_files(d):
            return MediaRef(d, "frames")
        tried.append(os.path.join(root, scene_id) + "{" + ",".join(VIDEO_EXTS) + ",/}")
    raise FileNotFoundError(f"no video or frame folder for scene {scene_id!r}; tried: " + "; ".join(tried))


def load_frames(media: MediaRef, num_frames: int | None = 32, sampling: str = "linspace-round") -> list:
    """``num_frames`` uniformly sampled RGB frames (uint8 ``[H, W, 3]`` arrays for videos, ``PIL``
    images for frame folders), ready for ``GeoAlignProcessor``; None: all frames; ``sampling``: one of
    ``geoalign.geometry.sampling.FRAME_SAMPLING``. A video's frames come as :class:`SampledFrames`, which keeps
    their rate."""
    from geoalign.geometry.frames import SampledFrames, load_image, load_video_frames
    from geoalign.geometry.sampling import sample_frame_indices

    if media.kind == "video":
        frames, _, sampled_fps = load_video_frames(media.path, num_frames, sampling)
        return SampledFrames(frames, sampled_fps)        # the rate goes on to Qwen's video path (G = 8)
    if media.kind == "frames":
        files = list_frame_files(media.path)
        if not files:
            raise ValueError(f"frame folder {media.path!r} holds no .jpg/.png colour frames")
        return [load_image(files[i]) for i in sample_frame_indices(len(files), num_frames, sampling)]
    raise ValueError(f"unknown media kind {media.kind!r}")
