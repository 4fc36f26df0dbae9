"""Synthetic media: videos and ScanNet-style frame folders whose frame i is a solid grey of a known value (so sampled
indices can be checked), and the mean grey value of loaded frames."""
from __future__ import annotations

import os

import numpy as np


def write_video(path, n=12, size=32, width=None, codec="mpeg4", pix_fmt="yuv420p", step=20):
    """Frame i is a solid grey of value (step*i) % 256 (so sampled indices can be checked); size x width px (height x
    width). codec="ffv1", pix_fmt="bgr0" is lossless, so values read back exactly; n=0 writes a container whose
    stream has no frame. Creates the folder; returns the path (a str)."""
    import av
    width = width or size
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(path, "w") as c:
        s = c.add_stream(codec, rate=10)
        s.width, s.height = width, size
        s.pix_fmt = pix_fmt
        if n == 0:
            c.start_encoding()
        for i in range(n):
            f = av.VideoFrame.from_ndarray(np.full((size, width, 3), (step * i) % 256, np.uint8), format="rgb24")
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def write_frames(folder, n=10, size=16, width=None):
    """ScanNet posed_images layout: 00000.jpg colour + 00000.png depth + 00000.txt pose."""
    from PIL import Image
    width = width or size
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((size, width, 3), 20 * i, np.uint8)).save(os.path.join(folder, f"{i:05d}.jpg"))
        Image.fromarray(np.full((size, width), 255, np.uint8)).save(os.path.join(folder, f"{i:05d}.png"))
        open(os.path.join(folder, f"{i:05d}.txt"), "w").write("1 0 0 0\n")


def frame_means(frames):
    """Mean grey value of each frame (write_video and write_frames paint frame i with 20*i by default)."""
    return [float(np.asarray(f).mean()) for f in frames]


def random_uint8_frames(n: int, height: int = 90, width: int = 120, seed: int = 0) -> list:
    """``n`` random RGB frames (uint8 arrays [height, width, 3]), as a decoder or vLLM hands them over."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(n)]
