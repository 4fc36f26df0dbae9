"""Where a question's video/frames are on disk, and lazy frame loading.

Kept self-contained on purpose (``geoalign.geometry`` frame loading is being written
in parallel); the model adapter only calls :func:`load_frames`.

Sampling: ``num_frames`` indices ``numpy.linspace(0, n - 1, num_frames)`` truncated to
int (uniform over the whole clip, first and last frame included, as lmms-eval's
uniform sampling); all frames when the clip is shorter.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

VIDEO_EXTS = (".mp4", ".mkv", ".avi", ".mov", ".webm")
IMAGE_EXTS = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class MediaRef:
    """A video file (``kind='video'``) or a folder of frame images (``kind='frames'``)."""

    path: str
    kind: str  # "video" | "frames"


def sample_indices(total: int, num_frames: int) -> list[int]:
    """Uniform frame indices (see module docstring)."""
    if total <= 0:
        return []
    if num_frames <= 0 or total <= num_frames:
        return list(range(total))
    return np.linspace(0, total - 1, num_frames).astype(int).tolist()


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
    """First match of ``{root}/{scene_id}{.mp4,...}`` or ``{root}/{scene_id}/`` (frames)."""
    tried = []
    for root in roots:
        for ext in VIDEO_EXTS:
            p = os.path.join(root, scene_id + ext)
            if os.path.isfile(p):
                return MediaRef(p, "video")
        d = os.path.join(root, scene_id)
        if os.path.isdir(d) and list_frame_files(d):
            return MediaRef(d, "frames")
        tried.append(os.path.join(root, scene_id) + "{" + ",".join(VIDEO_EXTS) + ",/}")
    raise FileNotFoundError(f"no video or frame folder for scene {scene_id!r}; tried: " + "; ".join(tried))


def _count_frames(path: str) -> int:
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        return stream.frames or sum(1 for _ in container.decode(stream))


def _video_frames(path: str, num_frames: int) -> list:
    """Decode the sampled frames in one sequential pass (no seeking)."""
    import av

    wanted = sample_indices(_count_frames(path), num_frames)
    if not wanted:
        return []
    repeats: dict[int, int] = {}
    for i in wanted:
        repeats[i] = repeats.get(i, 0) + 1
    frames: list = []
    with av.open(path) as container:
        stream = container.streams.video[0]
        for i, frame in enumerate(container.decode(stream)):
            if i in repeats:
                frames.extend([frame.to_image().convert("RGB")] * repeats[i])
            if i >= wanted[-1]:
                break
    if frames and len(frames) < len(wanted):  # the header over-counted: pad with the last frame
        frames += [frames[-1]] * (len(wanted) - len(frames))
    return frames


def load_frames(media: MediaRef, num_frames: int = 32) -> list:
    """Decode ``num_frames`` uniformly sampled RGB frames as ``PIL.Image`` objects."""
    from PIL import Image

    if media.kind == "video":
        frames = _video_frames(media.path, num_frames)
    elif media.kind == "frames":
        files = list_frame_files(media.path)
        frames = [Image.open(files[i]).convert("RGB") for i in sample_indices(len(files), num_frames)]
    else:
        raise ValueError(f"unknown media kind {media.kind!r}")
    if not frames:
        raise RuntimeError(f"no frames could be read from {media.path}")
    return frames
