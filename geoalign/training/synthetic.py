"""Small synthetic training sets (videos via PyAV, image folders, image lists) for tests, smoke runs and benchmarks.

Frames default to 16x148 px: VGGT resizes them to 56x518 (4x37 patches), Qwen sees 56x504 (36 visual tokens per
frame), which keeps CPU runs fast while exercising the real preprocessing.
"""
from __future__ import annotations

import json
import os

import numpy as np

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def _frames(colour: tuple[int, int, int], n: int, height: int, width: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for t in range(n):
        f = np.empty((height, width, 3), dtype=np.uint8)
        f[:] = colour
        noise = rng.integers(0, 30, size=(height, width, 3), dtype=np.uint8)
        f = np.clip(f.astype(np.int16) + noise - 15, 0, 255).astype(np.uint8)
        f[:, (t * 7) % width: (t * 7) % width + 4] = 255           # a moving bar
        out.append(f)
    return out


def write_video(path: str, frames: list[np.ndarray], fps: int = 4) -> None:
    """Write uint8 RGB frames [H, W, 3] (even H and W) to an MPEG-4 file with PyAV."""
    import av

    h, w = frames[0].shape[:2]
    with av.open(path, mode="w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for f in frames:
            for pkt in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)


def write_image_folder(path: str, frames: list[np.ndarray]) -> list[str]:
    from PIL import Image

    os.makedirs(path, exist_ok=True)
    names = []
    for i, f in enumerate(frames):
        name = f"{i:04d}.png"
        Image.fromarray(f).save(os.path.join(path, name))
        names.append(name)
    return names


def make_colour_dataset(root: str, num_records: int = 8, *, kinds=("video", "folder", "images"),
                        frame_counts=(2, 3, 4), height: int = 16, width: int = 148, seed: int = 0,
                        multi_turn_every: int = 3, filename: str = "train.jsonl") -> str:
    """Write media + a JSONL of records asking for the clip's colour under ``root``; returns the JSONL path.
    Records cycle through ``kinds`` (a video file, an image folder, a list of image files) and ``frame_counts``;
    every ``multi_turn_every``-th record has two question/answer turns. Paths in the JSONL are relative to root."""
    os.makedirs(root, exist_ok=True)
    names = list(COLOURS)
    lines = []
    for i in range(num_records):
        colour = names[i % len(names)]
        n = frame_counts[i % len(frame_counts)]
        frames = _frames(COLOURS[colour], n, height, width, seed + i)
        kind = kinds[i % len(kinds)]
        rec: dict = {"id": f"sample{i:03d}"}
        if kind == "video":
            rel = f"media/v{i:03d}.mp4"
            write_video(os.path.join(root, rel), frames) if os.path.isdir(os.path.join(root, "media")) else (
                os.makedirs(os.path.join(root, "media"), exist_ok=True), write_video(os.path.join(root, rel), frames))
            rec["video"] = rel
        elif kind == "folder":
            rel = f"media/f{i:03d}"
            write_image_folder(os.path.join(root, rel), frames)
            rec["video"] = rel
        else:
            rel = f"media/i{i:03d}"
            files = write_image_folder(os.path.join(root, rel), frames)
            rec["images"] = [f"{rel}/{f}" for f in files]
        conv = [{"from": "human", "value": "<video>\nWhat colour is the scene?"},
                {"from": "gpt", "value": f"It is {colour}."}]
        if multi_turn_every and i % multi_turn_every == multi_turn_every - 1:
            conv += [{"from": "human", "value": "How many frames?"}, {"from": "gpt", "value": f"{n} frames."}]
        rec["conversations"] = conv
        lines.append(json.dumps(rec))
    path = os.path.join(root, filename)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
