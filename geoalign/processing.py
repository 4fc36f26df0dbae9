"""GeoAlignProcessor: a video / image folder / list of frames + a question -> every input the GeoAlign model needs.

Frames are prepared once (design.md section 4, :func:`geoalign.geometry.prepare_frames`): VGGT sees the
518-wide frames, Qwen sees their top-left crop to multiples of 28 with no further resize or rescale, so Qwen's token
grid is exactly VGGT's patch grid cropped to even sizes, and ``gather_index`` maps one to the other.

G = 4 (frames as separate images, as VG-LLM): Qwen's image path, one ``<|image_pad|>`` block per frame.
G = 8 (Qwen's video path, temporal patch 2): one ``<|video_pad|>`` block for the clip.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch

# Qwen2-VL / Qwen2.5-VL image normalisation (OpenAI CLIP statistics), as in its preprocessor_config.json.
QWEN_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
QWEN_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
PATCH = 14
MERGE = 2
TEMPORAL_PATCH = 2

IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"

# Qwen2.5-VL-Instruct's chat template (used only when the tokenizer carries none).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen_patchify(frames: torch.Tensor, group_size: int = 4, mean: Sequence[float] = QWEN_IMAGE_MEAN,
                  std: Sequence[float] = QWEN_IMAGE_STD) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL's flat patch layout for frames [S, 3, H, W] in [0, 1] (H, W multiples of 28; no resize).

    G=4: every frame an image (each patch repeated over the temporal patch, as Qwen's image processor does);
    returns (pixel_values [S*h*w, 3*2*14*14], image_grid_thw [S, 3]).
    G=8: one video; an odd frame count repeats the last frame (as Qwen's video processor does);
    returns (pixel_values_videos [T*h*w, 3*2*14*14], video_grid_thw [1, 3]) with T = ceil(S/2).
    Patches come in Qwen's merge order: (frame/temporal group, r, c, dy, dx).
    """
    if frames.dim() != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must be [S, 3, H, W], got {tuple(frames.shape)}")
    S, C, H, W = frames.shape
    if H % (PATCH * MERGE) or W % (PATCH * MERGE):
        raise ValueError(f"Qwen frames must have sides that are multiples of {PATCH * MERGE}, got {H}x{W}")
    x = frames.float()
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    x = (x - m) / s
    gh, gw = H // PATCH, W // PATCH
    if group_size == 4:
        x = x.reshape(S, C, gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH)
        x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)                      # S, gh/2, gw/2, dy, dx, C, ph, pw
        x = x.unsqueeze(6).expand(*x.shape[:6], TEMPORAL_PATCH, PATCH, PATCH)
        pv = x.reshape(S * gh * gw, C * TEMPORAL_PATCH * PATCH * PATCH).contiguous()
        return pv, torch.tensor([[1, gh, gw]] * S, dtype=torch.int64)
    if group_size == 8:
        if S % TEMPORAL_PATCH:
            x = torch.cat([x, x[-1:].expand(TEMPORAL_PATCH - S % TEMPORAL_PATCH, -1, -1, -1)], dim=0)
        T = x.shape[0] // TEMPORAL_PATCH
        x = x.reshape(T, TEMPORAL_PATCH, C, gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)                   # T, gh/2, gw/2, dy, dx, C, tp, ph, pw
        pv = x.reshape(T * gh * gw, C * TEMPORAL_PATCH * PATCH * PATCH).contiguous()
        return pv, torch.tensor([[T, gh, gw]], dtype=torch.int64)
    raise ValueError(f"group_size must be 4 (images) or 8 (video), got {group_size}")
