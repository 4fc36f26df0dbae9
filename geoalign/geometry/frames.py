"""Loading and preparing frames for VGGT and Qwen2.5-VL (docs/architecture.md, "Frames and gather_index"; following VG-LLM / VGGT's load_fn).

* VGGT side: width 518, height ``round(H*518/W/14)*14`` (bicubic), then centre-crop the height to at most 518.
  Pixels stay in [0, 1]. Result: float32 [S, 3, H_v, 518], a grid of h_v x w_v = H_v/14 x 37 patches.
* Qwen side: the same tensor cropped top-left to multiples of 28 (no resize, no rescale):
  float32 [S, 3, H_q, W_q]. Feed it to Qwen's processor with ``do_rescale=False`` (values are already in [0, 1])
  and ``do_resize=False`` (or check that ``smart_resize`` is a no-op: :func:`check_qwen_size`).
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..lazy_exports import deprecated_aliases
from .alignment import (MERGE_SIZE, PATCH_SIZE, build_gather_index, num_visual_tokens, qwen_grid_for_vggt,
                        qwen_grid_thw)
from .sampling import sample_frame_indices  # noqa: F401 (its old home)

logger = logging.getLogger("geoalign.geometry")

VGGT_SIZE = 518
QWEN_FACTOR = PATCH_SIZE * MERGE_SIZE  # Qwen2.5-VL's side unit: 28 px
QWEN_MIN_PIXELS = 56 * 56              # Qwen2VLImageProcessor defaults (size.shortest_edge / longest_edge)
QWEN_MAX_PIXELS = 28 * 28 * 1280
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")

FrameSource = Union[str, os.PathLike, torch.Tensor, Sequence]


# ----------------------------------------------------------------------------------------------- sizes
def vggt_resize_shape(height: int, width: int, target: int = VGGT_SIZE, patch: int = PATCH_SIZE) -> tuple[int, int]:
    """(resized_height, resized_width) before the centre crop, exactly as VGGT's load_fn "crop" mode computes it."""
    new_w = target
    new_h = round(height * (new_w / width) / patch) * patch
    if new_h < patch:
        raise ValueError(
            f"frame {height}x{width} (HxW) is too wide: resizing to width {target} leaves a height of {new_h} px "
            f"(< one {patch}-px patch)"
        )
    return new_h, new_w


def vggt_frame_shape(height: int, width: int, target: int = VGGT_SIZE, patch: int = PATCH_SIZE) -> tuple[int, int]:
    """Final VGGT frame size (H_v, W_v) after resize and centre crop."""
    new_h, new_w = vggt_resize_shape(height, width, target, patch)
    return min(new_h, target), new_w


def check_qwen_size(height: int, width: int, min_pixels: int = QWEN_MIN_PIXELS,
                    max_pixels: int = QWEN_MAX_PIXELS, factor: int = QWEN_FACTOR) -> None:
    """Raise ValueError unless Qwen's ``smart_resize`` leaves a height x width frame unchanged.

    For sides that are multiples of ``factor`` that holds iff min_pixels <= H*W <= max_pixels (smart_resize rounds
    each side to the nearest multiple and only rescales outside that pixel range).
    """
    if height % factor or width % factor:
        raise ValueError(f"Qwen frame {height}x{width} must have sides that are multiples of {factor}")
    if not (min_pixels <= height * width <= max_pixels):
        raise ValueError(
            f"Qwen's smart_resize would rescale a {height}x{width} frame ({height * width} px) because it is outside "
            f"[min_pixels={min_pixels}, max_pixels={max_pixels}]; the token grid would no longer match VGGT's"
        )


# ----------------------------------------------------------------------------------------------- loading
def _video_error(path: str, e: BaseException) -> ValueError:
    return ValueError(f"cannot read video {path!r} (unreadable or corrupt): {type(e).__name__}: {e}")


def load_video_frames(path: str | os.PathLike, num_frames: int | None = 32, sampling: str = "linspace-round"
                      ) -> tuple[list[np.ndarray], list[int], float | None]:
    """Decode a video with PyAV and sample ``num_frames`` frames uniformly (None: all frames; ``sampling``: see
    :func:`sample_frame_indices`).

    Returns (frames, indices, sampled_fps): frames are uint8 RGB arrays [H, W, 3]; indices are the decoded-frame
    indices; sampled_fps = len(indices) / total frames * the stream's frame rate (transformers'
    ``VideoMetadata.sampled_fps``), or None when the container gives no frame rate.
    Raises FileNotFoundError for a missing file, ValueError for an unreadable/corrupt file or a video without frames.
    """
    import av

    p = os.fspath(path)
    if not os.path.isfile(p):
        raise FileNotFoundError(f"video file not found: {p!r}")

    def open_stream():
        try:
            container = av.open(p)
        except EOFError as e:  # av.error.EOFError: nothing after the header (e.g. a video with 0 frames)
            raise ValueError(f"video {p!r} is empty or truncated: end of file while reading it ({e})") from e
        except Exception as e:  # av.error.* (InvalidDataError, ...) and OSError
            raise _video_error(p, e) from e
        if not container.streams.video:
            container.close()
            raise ValueError(f"video {p!r} has no video stream (empty or audio-only file?)")
        return container

    # Pass 1: count frames by demuxing (cheap; no decoding).
    container = open_stream()
    try:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else None
        total = 0
        try:
            for pkt in container.demux(stream):
                total += pkt.size > 0
        except EOFError:  # some containers with no packets at all report EOF while demuxing
            pass
    except Exception as e:
        raise _video_error(p, e) from e
    finally:
        container.close()
    if total == 0:
        raise ValueError(f"video {p!r} is empty: 0 frames in its video stream")

    def decode(wanted: list[int]) -> tuple[dict[int, np.ndarray], int]:
        want = set(wanted)
        got: dict[int, np.ndarray] = {}
        n = 0  # frames decoded so far
        c = open_stream()
        try:
            for frame in c.decode(video=0):
                if n in want:
                    got[n] = frame.to_ndarray(format="rgb24")
                n += 1
                if len(got) == len(want):
                    break
        except Exception as e:
            raise _video_error(p, e) from e
        finally:
            c.close()
        return got, n

    indices = sample_frame_indices(total, num_frames, sampling)
    got, decoded = decode(indices)
    if len(got) < len(set(indices)):
        # The packet count overstated the decodable frames: resample over what really decodes.
        if decoded == 0:
            raise ValueError(f"video {p!r} is empty: no decodable frames")
        logger.warning("video %s: %d packets but %d decodable frames; resampling", p, total, decoded)
        indices = sample_frame_indices(decoded, num_frames, sampling)
        total = decoded
        got, _ = decode(indices)
        if len(got) < len(set(indices)):
            raise ValueError(f"video {p!r}: could not decode frames {sorted(set(indices) - set(got))}")
    sampled_fps = len(indices) / total * fps if fps and fps > 0 else None
    return [got[i] for i in indices], indices, sampled_fps


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def load_image_folder(path: str | os.PathLike, num_frames: int | None = None) -> tuple[list, list[int]]:
    """Load the images of a folder (natural sort order), optionally sampling ``num_frames`` uniformly.

    Returns (PIL RGB images, indices into the sorted file list). RGBA is composited onto white, EXIF rotation is
    applied (as VGGT's load_fn does).
    """
    p = os.fspath(path)
    if not os.path.isdir(p):
        raise FileNotFoundError(f"image folder not found: {p!r}")
    files = sorted((f for f in os.listdir(p) if f.lower().endswith(IMAGE_EXTENSIONS)), key=_natural_key)
    if not files:
        raise ValueError(f"image folder {p!r} holds no images (expected extensions {IMAGE_EXTENSIONS})")
    indices = sample_frame_indices(len(files), num_frames)
    return [load_image(os.path.join(p, files[i])) for i in indices], indices


def load_image(path: str):
    """One image file as an RGB PIL image: EXIF orientation applied, transparent pixels composited onto white.
    FileNotFoundError if missing, ValueError if unreadable."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path!r}")
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "P"):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, im)
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path!r} (unreadable or corrupt): {e}") from e


# ----------------------------------------------------------------------------------------------- resizing
def _as_frame_list(frames) -> tuple[str, list]:
    """Normalise input frames to ("uint8", [HWC uint8 arrays]) or ("float", [CHW float tensors])."""
    from PIL import Image

    if isinstance(frames, torch.Tensor):
        if frames.dim() == 3:
            frames = frames.unsqueeze(0)
        if frames.dim() != 4 or frames.shape[1] != 3:
            raise ValueError(f"frame tensor must be [S, 3, H, W] (or [3, H, W]), got {tuple(frames.shape)}")
        if frames.shape[0] == 0:
            raise ValueError("no frames: got a tensor with S = 0")
        if frames.dtype == torch.uint8:
            return "uint8", [f.permute(1, 2, 0).numpy() for f in frames.cpu()]
        if not frames.is_floating_point():
            raise ValueError(f"frame tensor must be float in [0, 1] or uint8, got dtype {frames.dtype}")
        lo, hi = float(frames.min()), float(frames.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(
                f"float frames must hold pixel values in [0, 1], got min={lo:.4g}, max={hi:.4g} "
                "(pass uint8 for 0-255 data)"
            )
        return "float", list(frames.float().cpu())
    if isinstance(frames, (list, tuple)):
        if len(frames) == 0:
            raise ValueError("no frames: got an empty list")
        out = []
        for i, f in enumerate(frames):
            if isinstance(f, Image.Image):
                out.append(np.asarray(f.convert("RGB")))
            elif isinstance(f, np.ndarray) and f.dtype == np.uint8 and f.ndim == 3 and f.shape[2] == 3:
                out.append(f)
            else:
                desc = f"{type(f).__name__} {getattr(f, 'dtype', '')} {getattr(f, 'shape', '')}".strip()
                raise ValueError(f"frame {i}: expected a PIL image or a uint8 array [H, W, 3], got {desc}")
        return "uint8", out
    raise ValueError(f"frames must be a tensor, a list of images, a video path or a folder, got {type(frames).__name__}")


def _check_same_size(sizes: list[tuple[int, int]]) -> tuple[int, int]:
    for i, s in enumerate(sizes):
        if s != sizes[0]:
            raise ValueError(
                f"all frames must have the same size: frame 0 is {sizes[0][0]}x{sizes[0][1]} (HxW), "
                f"frame {i} is {s[0]}x{s[1]}"
            )
    return sizes[0]


def resize_for_vggt(frames, target: int = VGGT_SIZE) -> torch.Tensor:
    """Frames -> float32 [S, 3, H_v, 518] in [0, 1] (VGGT's "crop" preprocessing).

    frames: a list of PIL images or uint8 [H, W, 3] arrays (resized with PIL bicubic, as VGGT does), a uint8
    tensor [S, 3, H, W] (same path), or a float tensor [S, 3, H, W] in [0, 1] (resized with torch's anti-aliased
    bicubic, which follows PIL's filter, then clamped to [0, 1]). All frames must have the same size.
    """
    from PIL import Image

    kind, items = _as_frame_list(frames)
    sizes = [tuple(f.shape[:2]) if kind == "uint8" else tuple(f.shape[1:]) for f in items]
    h, w = _check_same_size(sizes)
    new_h, new_w = vggt_resize_shape(h, w, target)
    if kind == "uint8":
        out = torch.empty(len(items), 3, new_h, new_w, dtype=torch.float32)
        for i, f in enumerate(items):
            im = Image.fromarray(np.ascontiguousarray(f)).resize((new_w, new_h), Image.Resampling.BICUBIC)
            out[i] = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
    else:
        x = torch.stack(items)
        out = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True).clamp_(0, 1)
    if new_h > target:
        top = (new_h - target) // 2
        out = out[:, :, top:top + target].contiguous()
    return out


def crop_for_qwen(vggt_images: torch.Tensor, factor: int = QWEN_FACTOR) -> torch.Tensor:
    """[S, 3, H_v, W_v] -> [S, 3, H_q, W_q], the top-left crop to multiples of ``factor`` (28); a copy."""
    if vggt_images.dim() != 4 or vggt_images.shape[1] != 3:
        raise ValueError(f"expected VGGT frames [S, 3, H, W], got {tuple(vggt_images.shape)}")
    h, w = vggt_images.shape[-2:]
    hq, wq = h - h % factor, w - w % factor
    if hq == 0 or wq == 0:
        raise ValueError(f"VGGT frame {h}x{w} is smaller than Qwen's {factor}-px unit on one side")
    return vggt_images[:, :, :hq, :wq].contiguous()


# ----------------------------------------------------------------------------------------------- all together
@dataclass
class AlignedFrames:
    """Frames prepared for both encoders, plus the VGGT -> Qwen token map.

    vggt_images    float32 [S, 3, H_v, W_v] in [0, 1]; pass ``vggt_images[None]`` to VGGTAggregator
    qwen_images    float32 [S, 3, H_q, W_q] in [0, 1] (top-left crop, multiples of 28)
    vggt_grid      (h_v, w_v) patches of 14 px
    qwen_grid      (h_q, w_q) patches of 14 px, both even
    group_size     G: 4 (frames as images) or 8 (video path, temporal patch 2)
    gather_index   int64 [L, G] into the flattened layer rows [S*h_v*w_v, 2048] of this sample
    grid_thw       int64: the image_grid_thw (G=4) / video_grid_thw (G=8) Qwen should report
    num_tokens     L
    frame_indices  indices of the sampled frames in the source (video frames / sorted files), or None
    sampled_fps    frames per second of the sampled frames (videos with a frame rate), or None
    """

    vggt_images: torch.Tensor
    qwen_images: torch.Tensor
    vggt_grid: tuple[int, int]
    qwen_grid: tuple[int, int]
    group_size: int
    gather_index: torch.Tensor
    grid_thw: torch.Tensor
    num_tokens: int
    frame_indices: list[int] | None = None
    sampled_fps: float | None = None

    @property
    def num_frames(self) -> int:
        return int(self.vggt_images.shape[0])

    @property
    def num_rows(self) -> int:
        """Rows of this sample's flattened VGGT layer: S * h_v * w_v."""
        return self.num_frames * self.vggt_grid[0] * self.vggt_grid[1]


class SampledFrames(list):
    """A list of frames sampled from a video that keeps their rate (``sampled_fps``, None if unknown), so that a
    caller who decodes frames itself (evaluation) hands Qwen's video path the same timing as a video path would."""

    def __init__(self, frames, sampled_fps: float | None = None):
        super().__init__(frames)
        self.sampled_fps = sampled_fps


def load_frames(source: FrameSource, num_frames: int | None = 32):
    """(frames, indices, sampled_fps) from a video path, an image folder, a tensor or a list of images; indices
    and sampled_fps are None where the source has none (sampled_fps: videos only)."""
    if isinstance(source, (str, os.PathLike)):
        p = os.fspath(source)
        if os.path.isdir(p):
            return (*load_image_folder(p, num_frames), None)
        if not os.path.exists(p):
            raise FileNotFoundError(f"frame source not found: {p!r} (expected a video file or an image folder)")
        return load_video_frames(p, num_frames)
    return source, None, getattr(source, "sampled_fps", None)


def prepare_frames(source: FrameSource, num_frames: int | None = 32, group_size: int = 4,
                   check_qwen_resize: bool = True, min_pixels: int = QWEN_MIN_PIXELS,
                   max_pixels: int = QWEN_MAX_PIXELS) -> AlignedFrames:
    """Load (video: sample ``num_frames`` uniformly; folder: sample if given; tensor/list: used as given), resize
    for VGGT, crop for Qwen and build gather_index for G = ``group_size``."""
    if group_size not in (4, 8):
        raise ValueError(f"group_size must be 4 (images) or 8 (video, temporal patch 2), got {group_size}")
    frames, indices, sampled_fps = load_frames(source, num_frames)
    vggt = resize_for_vggt(frames)
    h_v, w_v = vggt.shape[-2] // PATCH_SIZE, vggt.shape[-1] // PATCH_SIZE
    qwen = crop_for_qwen(vggt)
    hq_px, wq_px = qwen.shape[-2:]
    if check_qwen_resize:
        check_qwen_size(hq_px, wq_px, min_pixels, max_pixels)
    qgrid = (hq_px // PATCH_SIZE, wq_px // PATCH_SIZE)
    if qgrid != qwen_grid_for_vggt((h_v, w_v)):
        raise ValueError(f"internal: Qwen grid {qgrid} is not the even crop of VGGT grid {(h_v, w_v)}")
    s = vggt.shape[0]
    gi = build_gather_index(s, (h_v, w_v), qgrid, group_size)
    return AlignedFrames(
        vggt_images=vggt, qwen_images=qwen, vggt_grid=(h_v, w_v), qwen_grid=qgrid, group_size=group_size,
        gather_index=gi, grid_thw=qwen_grid_thw(s, qgrid, group_size),
        num_tokens=num_visual_tokens(s, qgrid, group_size), frame_indices=indices, sampled_fps=sampled_fps,
    )


__getattr__ = deprecated_aliases(__name__, {"FRAME_SAMPLING": "geoalign.geometry.sampling:FRAME_SAMPLING"})
