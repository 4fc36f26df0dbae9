"""vLLM's multimodal processing for GeoAlign directories: frames -> Qwen's patches, VGGT's frames and gather_index,
through the same :meth:`geoalign.processing.GeoAlignProcessor.encode_frames` as the transformers model.

G fixes the input path, as in the transformers model: G = 4 takes a prompt's frames as **images** (one
``<|image_pad|>`` per frame), G = 8 takes them as one **video** (a ``<|video_pad|>``).

G = 8: one video item holds a whole sample, so every field is per item (``vggt_pixel_values`` [S, 3, H, W],
``gather_index`` [L, 8]) and vLLM's caches may share it between identical requests.

G = 4: VGGT needs all of a prompt's frames at once, but vLLM schedules (and caches) each image on its own. So the
*first* image item of a prompt carries the whole sample (every frame's Qwen patches, the S grids, VGGT's frames and
the gather_index); the other items carry only their own ``image_grid_thw`` (vLLM's placeholders and M-RoPE
positions) and ``geoalign_item`` = (request key, frame position, S). The model encodes and fuses the whole sample when
item 0 arrives and keeps the other frames' fused tokens for their items (geoalign.vllm.model). Items are scheduled in
prompt order, so item 0 always comes first. Each item's cache identity is (a per-request key, its position): a
prompt's items can never be partly served from vLLM's encoder or processor caches, which would leave a later frame
without its sample.
"""
from __future__ import annotations

import threading
import uuid
from collections.abc import Mapping

import torch
from transformers import BatchFeature
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLMultiModalProcessor, Qwen2_5_VLProcessingInfo
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import ImageSize

from ..geometry.alignment import MERGE_SIZE, PATCH_SIZE
from ..geometry.frames import VGGT_SIZE
from ..model_config import GeoAlignModelConfig
from ..processing import GeoAlignProcessor
from .fields import IMAGE_FIELDS, image_fields, video_fields

#: the largest side VGGT's frames get (geoalign.geometry.frames.resize_for_vggt): 518 px -> 37 patches, of which Qwen
#: sees the even crop, 36 -> 18 x 18 merged tokens per frame
_MAX_MERGED_SIDE = VGGT_SIZE // PATCH_SIZE // MERGE_SIZE
_MAX_TOKENS_PER_FRAME = _MAX_MERGED_SIDE * _MAX_MERGED_SIDE
#: frames per video in vLLM's memory profiling and its default for a video URL (the paper's 32 frames)
DEFAULT_NUM_FRAMES = 32


class GeoAlignProcessingInfo(Qwen2_5_VLProcessingInfo):
    """Qwen2.5-VL's processing info, with GeoAlign's config, its G and its frame geometry."""

    def get_hf_config(self) -> GeoAlignModelConfig:
        return self.ctx.get_hf_config(GeoAlignModelConfig)

    @property
    def group_size(self) -> int:
        return int(self.get_hf_config().fusion.group_size)

    def get_geoalign_processor(self) -> GeoAlignProcessor:
        """The transformers model's processor for this directory (frames -> pixels exactly as there)."""
        cached = getattr(self, "_geoalign_processor", None)
        if cached is None:   # loaded as the transformers engine loads it (its Qwen2VLImageProcessorPil, if any)
            cached = GeoAlignProcessor.from_pretrained(self.ctx.model_config.model, group_size=self.group_size,
                                                       num_frames=None)
            self._geoalign_processor = cached
        return cached

    def get_hf_processor(self, **kwargs: object):
        """Qwen2.5-VL's processor of the directory; a GeoAlign directory saved without an image processor config
        (e.g. the tiny test models) gets Qwen's defaults, which the frame preparation does not use for sizes."""
        cached = getattr(self, "_hf_processor", None)
        if cached is not None:
            return cached
        from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil

        try:
            proc = super().get_hf_processor(**kwargs)
        except (OSError, ValueError, TypeError):
            proc = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessorPil(), tokenizer=self.get_tokenizer(),
                                       video_processor=_default_video_processor())
        self._hf_processor = proc
        return proc

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None, "video": 0} if self.group_size == 4 else {"image": 0, "video": 1}

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        if self.group_size == 4:
            return {"image": _MAX_TOKENS_PER_FRAME}
        return {"video": (DEFAULT_NUM_FRAMES + 1) // 2 * _MAX_TOKENS_PER_FRAME}

    def get_image_size_with_most_features(self, max_pixels: int | None = None):
        return ImageSize(width=VGGT_SIZE, height=VGGT_SIZE)

    def get_num_frames_with_most_features(self, seq_len: int, mm_counts: Mapping[str, int]) -> int:
        return DEFAULT_NUM_FRAMES


def _default_video_processor():
    try:
        from transformers import Qwen2VLVideoProcessor

        return Qwen2VLVideoProcessor()
    except (ImportError, OSError, RuntimeError):   # the video processor needs torchvision; ours does not
        return None


_request = threading.local()


class GeoAlignMultiModalProcessor(Qwen2_5_VLMultiModalProcessor):
    """Frames -> GeoAlign's fields (module docstring), by GeoAlignProcessor.encode_frames."""

    # ------------------------------------------------------------------ one key per prompt (G = 4)
    # vLLM 0.32 processes a prompt through _cached_apply_hf_processor (-> _apply_hf_processor when uncached), which
    # computes the hashes and calls the HF processor inside it, on one thread: the key lives exactly that long.
    # Both hooks are private; setup.py bounds vllm below 0.33 and a call outside them is an error, not a reused key.
    def _apply_hf_processor(self, inputs, timing_ctx):
        return self._with_key(super()._apply_hf_processor, inputs, timing_ctx)

    def _cached_apply_hf_processor(self, inputs, timing_ctx):
        return self._with_key(super()._cached_apply_hf_processor, inputs, timing_ctx)

    @staticmethod
    def _with_key(apply, inputs, timing_ctx):
        if getattr(_request, "key", None) is not None:         # the cached path falls through to the uncached one
            return apply(inputs, timing_ctx)
        _request.key = uuid.uuid4()
        try:
            return apply(inputs, timing_ctx)
        finally:
            _request.key = None

    @staticmethod
    def _key() -> uuid.UUID:
        key = getattr(_request, "key", None)
        if key is None:
            raise RuntimeError("internal: GeoAlign's vLLM processor ran outside vLLM's apply path (this vLLM "
                               "version calls its processing hooks differently; geoalign.vllm supports 0.32)")
        return key

    def _get_mm_hashes(self, inputs):
        hashes = super()._get_mm_hashes(inputs)
        if self.info.group_size == 4 and hashes.get("image"):
            key = self._key().hex
            hashes = dict(hashes)
            hashes["image"] = [f"geoalign-{key}-{k}" for k in range(len(hashes["image"]))]
        return hashes

    # ------------------------------------------------------------------ frames -> fields
    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        proc = self.info.get_geoalign_processor()
        images, videos = hf_data.get("images") or [], hf_data.get("videos") or []
        G = self.info.group_size
        if (videos if G == 4 else images):
            raise ValueError(f"this GeoAlign model has G = {G}: it takes a prompt's frames as "
                             + ("images (one per frame), not a video" if G == 4 else "one video, not images"))
        if G == 4:
            return BatchFeature(image_fields(proc, list(images), self._key()))
        metadata = hf_data.get("video_metadata") or [None] * len(videos)
        return BatchFeature(video_fields(proc, list(videos), list(metadata)))

    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
                              ) -> Mapping[str, MultiModalFieldConfig]:
        # the grids (and G = 8's seconds per grid) stay on the CPU: vLLM recomputes M-RoPE positions from them
        # alone when a request resumes with its tokens partly computed (prefix cache, preemption)
        if self.info.group_size == 4:
            on_cpu = ("image_grid_thw", "geoalign_item", "geoalign_grid_thw")     # read by .tolist()
            return {name: MultiModalFieldConfig.batched("image", keep_on_cpu=name in on_cpu) for name in IMAGE_FIELDS}
        sizes = hf_inputs.get("video_grid_thw", torch.empty((0, 3), dtype=torch.int64)).prod(-1)
        return {"pixel_values_videos": MultiModalFieldConfig.flat_from_sizes("video", sizes),
                "video_grid_thw": MultiModalFieldConfig.batched("video", keep_on_cpu=True),
                "second_per_grid_ts": MultiModalFieldConfig.batched("video", keep_on_cpu=True),
                "vggt_pixel_values": MultiModalFieldConfig.batched("video"),
                "gather_index": MultiModalFieldConfig.batched("video")}
