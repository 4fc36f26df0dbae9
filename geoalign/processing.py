"""GeoAlignProcessor: a video / image folder / list of frames + a question -> every input the GeoAlign model needs.

Frames are prepared once (docs/architecture.md, "Frames and gather_index"; :func:`geoalign.geometry.prepare_frames`): VGGT sees the
518-wide frames, Qwen sees their top-left crop to multiples of 28 with no further resize or rescale, so Qwen's token
grid is exactly VGGT's patch grid cropped to even sizes, and ``gather_index`` maps one to the other.

G = 4 (frames as separate images, as VG-LLM): Qwen's image path, one ``<|image_pad|>`` block per frame.
G = 8 (Qwen's video path, temporal patch 2): one ``<|video_pad|>`` block for the clip.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .geometry.alignment import MERGE_SIZE as MERGE, PATCH_SIZE as PATCH, TEMPORAL_PATCH_SIZE as TEMPORAL_PATCH

# Qwen2-VL / Qwen2.5-VL image normalisation (OpenAI CLIP statistics), as in its preprocessor_config.json.
QWEN_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
QWEN_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

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


def second_per_grid(sampled_fps: float | None) -> float:
    """Seconds per temporal patch of Qwen's video path (G = 8), as Qwen2.5-VL's processor computes
    ``second_per_grid_ts``: temporal_patch_size / the sampled frames' rate. Frames without a rate (image folders,
    image lists) get 1.0, the default of Qwen's rope index."""
    return TEMPORAL_PATCH / sampled_fps if sampled_fps else 1.0


def _expand_placeholders(text: str, pad: str, counts: Sequence[int]) -> str:
    parts = text.split(pad)
    if len(parts) - 1 != len(counts):
        raise ValueError(f"the chat template produced {len(parts) - 1} {pad} placeholders, expected {len(counts)}")
    out = parts[0]
    for n, part in zip(counts, parts[1:]):
        out += pad * int(n) + part
    return out


def _saved_group_size(directory: str) -> int | None:
    """G of a saved GeoAlign model (config.json's geoalign_config.group_size), or None."""
    import json

    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        fusion = json.load(f).get("geoalign_config") or {}
    return fusion.get("group_size")


@dataclass
class EncodedFrames:
    """One sample's encoder inputs (GeoAlignProcessor.encode_frames).

    pixel_values       float32 [L*4, 3*2*14*14]: Qwen's patches (G=4: the images'; G=8: the video's)
    grid_thw           int64 [S, 3] (G=4, one row per frame) or [1, 3] (G=8)
    vggt_pixel_values  float32 [S, 3, H, W] in [0, 1]: VGGT's frames
    gather_index       int64 [L, G]: each visual token's VGGT patch rows
    second_per_grid    seconds per temporal patch (G=8's rope; 1.0 without a frame rate)
    num_items          the prompt's placeholders: S images (G=4) or 1 video (G=8)
    """

    pixel_values: torch.Tensor
    grid_thw: torch.Tensor
    vggt_pixel_values: torch.Tensor
    gather_index: torch.Tensor
    second_per_grid: float
    num_items: int


class GeoAlignProcessor:
    """Turns frames + a question into the inputs of :class:`geoalign.GeoAlignForConditionalGeneration`.

    ``processor(source, question)`` where ``source`` is a video path, an image folder, a list of PIL images / uint8
    arrays, or a float tensor [S, 3, H, W] in [0, 1] (or a list of such sources, one per sample, with a list of
    questions) returns a dict with: ``input_ids``, ``attention_mask`` (left-padded), ``pixel_values`` +
    ``image_grid_thw`` (G=4) or ``pixel_values_videos`` + ``video_grid_thw`` (G=8), ``mm_token_type_ids`` (when the
    installed transformers' Qwen2.5-VL takes it), ``vggt_pixel_values`` and ``gather_index`` (one per sample), and
    ``labels`` when ``answer`` is given (only the answer tokens are supervised).
    """

    def __init__(self, tokenizer, image_processor=None, *, group_size: int = 4, num_frames: int | None = 32,
                 chat_template: str | None = None, min_pixels: int | None = None, max_pixels: int | None = None):
        if group_size not in (4, 8):
            raise ValueError(f"group_size must be 4 (frames as images) or 8 (video), got {group_size}")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.group_size = group_size
        self.num_frames = num_frames
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None) or QWEN2_5_VL_CHAT_TEMPLATE
        from .geometry.frames import QWEN_MAX_PIXELS, QWEN_MIN_PIXELS

        size = getattr(image_processor, "size", None) or {}
        get = size.get if isinstance(size, dict) else (lambda k, d=None: getattr(size, k, d))
        self.min_pixels = min_pixels or get("shortest_edge", None) or QWEN_MIN_PIXELS
        self.max_pixels = max_pixels or get("longest_edge", None) or QWEN_MAX_PIXELS
        self.image_mean = tuple(getattr(image_processor, "image_mean", None) or QWEN_IMAGE_MEAN)
        self.image_std = tuple(getattr(image_processor, "image_std", None) or QWEN_IMAGE_STD)
        for tok in (IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END):
            tid = tokenizer.convert_tokens_to_ids(tok)
            if tid is None or tid == getattr(tokenizer, "unk_token_id", None):
                raise ValueError(f"the tokenizer lacks Qwen2.5-VL's special token {tok}")

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, group_size: int | None = None, num_frames: int | None = 32,
                        **kwargs: Any) -> "GeoAlignProcessor":
        """Tokenizer (and Qwen2VLImageProcessorPil config when present) from a local Qwen2.5-VL directory, or from a
        saved GeoAlign directory (or a legacy one's ``qwen/`` sub-directory). Nothing is downloaded.
        group_size: default the saved model's (its config.json), else 4."""
        p = os.fspath(path)
        if not os.path.isdir(p):
            raise FileNotFoundError(f"processor directory not found: {p!r}")
        if group_size is None:
            group_size = _saved_group_size(p) or 4
        kwargs = {k: v for k, v in kwargs.items() if k in ("min_pixels", "max_pixels")}  # AutoProcessor passes more
        candidates = [p, os.path.join(p, "qwen")]
        tok_files = ("tokenizer.json", "tokenizer_config.json")
        src = next((c for c in candidates if any(os.path.isfile(os.path.join(c, f)) for f in tok_files)), None)
        if src is None:
            raise FileNotFoundError(f"no tokenizer in {p!r} (looked for {list(tok_files)} in {candidates})")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)
        image_processor = None
        if os.path.isfile(os.path.join(src, "preprocessor_config.json")):
            from transformers import Qwen2VLImageProcessorPil

            image_processor = Qwen2VLImageProcessorPil.from_pretrained(src, local_files_only=True)
        template = None
        tfile = os.path.join(src, "chat_template.json")
        if not getattr(tokenizer, "chat_template", None) and os.path.isfile(tfile):
            import json

            with open(tfile) as f:
                template = json.load(f).get("chat_template")
        return cls(tokenizer, image_processor, group_size=group_size, num_frames=num_frames,
                   chat_template=template, **kwargs)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Tokenizer (with the chat template) and, when present, the image processor config."""
        os.makedirs(directory, exist_ok=True)
        if not getattr(self.tokenizer, "chat_template", None):
            self.tokenizer.chat_template = self.chat_template
        self.tokenizer.save_pretrained(directory)
        if self.image_processor is not None:
            self.image_processor.save_pretrained(directory)

    # ------------------------------------------------------------------ processing
    def prepare(self, source, num_frames: int | None = None):
        """Frames for both encoders and the VGGT -> Qwen map (:class:`geoalign.geometry.AlignedFrames`)."""
        from .geometry.frames import prepare_frames

        return prepare_frames(source, num_frames if num_frames is not None else self.num_frames,
                              group_size=self.group_size, min_pixels=self.min_pixels, max_pixels=self.max_pixels)

    def _pixels(self, qwen_images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.group_size == 4 and self.image_processor is not None:
            out = self.image_processor(images=list(qwen_images), do_resize=False, do_rescale=False,
                                       return_tensors="pt")
            return out["pixel_values"], out["image_grid_thw"].to(torch.int64)
        return qwen_patchify(qwen_images, self.group_size, self.image_mean, self.image_std)

    def encode_frames(self, source, num_frames: int | None = None) -> "EncodedFrames":
        """One sample's frames -> what both encoders take (the text aside): the one place frames become pixels, for
        this processor's ``__call__`` and for the vLLM processor (geoalign.vllm)."""
        from .geometry.alignment import check_grid_thw

        af = self.prepare(source, num_frames)
        pv, grid = self._pixels(af.qwen_images)
        check_grid_thw(grid, af.num_frames, af.qwen_grid, self.group_size)  # Qwen's tokens == VGGT-aligned tokens
        return EncodedFrames(pixel_values=pv, grid_thw=grid, vggt_pixel_values=af.vggt_images,
                             gather_index=af.gather_index, second_per_grid=second_per_grid(af.sampled_fps),
                             num_items=af.num_frames if self.group_size == 4 else 1)

    def prompt(self, num_items: int, question: str) -> str:
        """The chat-templated prompt with one (unexpanded) placeholder per image, or one for the video."""
        kind = "image" if self.group_size == 4 else "video"
        content = [{"type": kind}] * num_items + [{"type": "text", "text": question}]
        return self.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=True, chat_template=self.chat_template)

    def __call__(self, source, question, answer=None, *, num_frames: int | None = None) -> dict[str, Any]:
        batched = isinstance(question, (list, tuple))
        sources = list(source) if batched else [source]
        questions = list(question) if batched else [question]
        answers = (list(answer) if batched else [answer]) if answer is not None else [None] * len(questions)
        if len(sources) != len(questions) or len(answers) != len(questions):
            raise ValueError(f"got {len(sources)} frame sources, {len(questions)} questions, {len(answers)} answers")
        G = self.group_size
        pad = IMAGE_PAD if G == 4 else VIDEO_PAD
        texts, prompts_len, pvs, grids, vggt, gis, seconds = [], [], [], [], [], [], []
        for src, q, a in zip(sources, questions, answers):
            enc = self.encode_frames(src, num_frames)
            counts = [int(g.prod()) // (MERGE * MERGE) for g in enc.grid_thw]
            text = _expand_placeholders(self.prompt(enc.num_items, q), pad, counts)
            prompts_len.append(len(self.tokenizer(text, add_special_tokens=False)["input_ids"]))
            if a is not None:
                text = text + a + "<|im_end|>"
            texts.append(text)
            pvs.append(enc.pixel_values)
            grids.append(enc.grid_thw)
            vggt.append(enc.vggt_pixel_values)
            gis.append(enc.gather_index)
            seconds.append(enc.second_per_grid)
        tok = self.tokenizer
        old_side = tok.padding_side
        tok.padding_side = "left"
        try:
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            tok.padding_side = old_side
        out: dict[str, Any] = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if G == 4:
            out["pixel_values"], out["image_grid_thw"] = torch.cat(pvs), torch.cat(grids)
        else:
            out["pixel_values_videos"], out["video_grid_thw"] = torch.cat(pvs), torch.cat(grids)
            out["second_per_grid_ts"] = torch.tensor(seconds, dtype=torch.float32)
        from .model_inputs import forward_accepts

        if forward_accepts("mm_token_type_ids"):
            tid = tok.convert_tokens_to_ids(pad)
            out["mm_token_type_ids"] = (enc["input_ids"] == tid).to(torch.int64) * (1 if G == 4 else 2)
        out["vggt_pixel_values"] = vggt
        out["gather_index"] = gis
        if answer is not None:
            labels = torch.full_like(enc["input_ids"], -100)
            T = enc["input_ids"].shape[1]
            for b, plen in enumerate(prompts_len):
                n = int(enc["attention_mask"][b].sum())
                start = T - n + plen                                   # left padding
                labels[b, start:] = enc["input_ids"][b, start:]
            out["labels"] = labels
        return out

    def batch_decode(self, ids, **kwargs) -> list[str]:
        kwargs.setdefault("skip_special_tokens", True)
        return self.tokenizer.batch_decode(ids, **kwargs)
