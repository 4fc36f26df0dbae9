"""GeoAlign as a vLLM model: vLLM's Qwen2.5-VL with the frozen VGGT aggregator and GeoAlign's fusion.

The visual tokens Q (vLLM's vision tower, per image or video) are fused exactly as the transformers model fuses them
(geoalign.visual_fusion.fuse_with_frames: route first, then stream VGGT's bank layers into the fusion, with the
same backends), once per sample; the language model is vLLM's. Weights load from the same GeoAlign directory:
``model.vggt.*`` and ``model.fusion.*`` go to the two GeoAlign modules, the rest to vLLM's Qwen2.5-VL.
Processing and the per-item fields: geoalign.vllm.processing.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable

import torch
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLDummyInputsBuilder, Qwen2_5_VLForConditionalGeneration
from vllm.multimodal import MULTIMODAL_REGISTRY

from ..backends.registry import ALL_BACKENDS
from ..fusion import GeoAlignFusion
from ..geometry.aggregator import VGGTAggregator
from ..model_config import GeoAlignModelConfig
from ..visual_fusion import fuse_with_frames
from . import unsupported_on_vllm
from .processing import GeoAlignMultiModalProcessor, GeoAlignProcessingInfo

#: bytes of fused frames kept, in host memory, for prompts' later image items (G = 4); the least recently used
#: prompt's go first past this (GEOALIGN_VLLM_KEPT_BYTES overrides it)
KEPT_BYTES = int(os.environ.get("GEOALIGN_VLLM_KEPT_BYTES", 4 << 30))


# profiling inputs: Qwen's dummy images / videos, sized by GeoAlignProcessingInfo (VGGT's largest frame, 32 frames)
@MULTIMODAL_REGISTRY.register_processor(GeoAlignMultiModalProcessor, info=GeoAlignProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class VLLMGeoAlignForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL + ``vggt`` + ``fusion`` for a ``GeoAlignForConditionalGeneration`` directory."""

    #: GeoAlignProcessor normalises the pixels itself (frames.py's crop, Qwen's mean / std): vLLM must not do it
    #: again on the device from preprocessor_config.json (vLLM 0.32 would, for its Qwen2.5-VL)
    supports_mm_device_do_normalize = False

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config: GeoAlignModelConfig = vllm_config.model_config.hf_config
        fusion_config = config.fusion
        why = unsupported_on_vllm(fusion_config)
        if why is not None:
            raise NotImplementedError(f"vLLM: {why}")
        if vllm_config.compilation_config.cudagraph_mm_encoder:
            raise NotImplementedError("vLLM: cudagraph_mm_encoder replays Qwen's vision tower alone, without "
                                      "GeoAlign's fusion: leave it off for a GeoAlign model")
        if self.is_multimodal_pruning_enabled:
            raise NotImplementedError("vLLM: video_pruning_rate (EVS) drops visual tokens after the tower; GeoAlign's "
                                      "fusion and gather_index need all of them: leave it off for a GeoAlign model")
        if type(self.visual.input_norm).__name__ != "IdentityInputNorm":
            raise RuntimeError(f"internal: vLLM would normalise GeoAlign's already normalised pixels again "
                               f"({type(self.visual.input_norm).__name__})")
        self.vggt = VGGTAggregator(config.vggt).requires_grad_(False)
        self.fusion = GeoAlignFusion(fusion_config).requires_grad_(False)
        self.vggt_calls = 0                    # VGGT passes so far (as the transformers model counts them)
        #: the fusion backend (None: the config's, "auto" = triton on CUDA, torch else); geoalign eval --engine
        #: vllm --fusion-backend sets it for vLLM's workers through the environment
        self.fusion_backend = os.environ.get("GEOALIGN_VLLM_FUSION_BACKEND") or None
        if self.fusion_backend is not None and self.fusion_backend not in ALL_BACKENDS:
            raise ValueError(f"GEOALIGN_VLLM_FUSION_BACKEND={self.fusion_backend!r}: expected one of {ALL_BACKENDS}")
        self._kept: OrderedDict[tuple[int, int], list[torch.Tensor]] = OrderedDict()
        self._kept_bytes = 0

    @property
    def group_size(self) -> int:
        return int(self.fusion.config.group_size)

    # ------------------------------------------------------------------ weights
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        own = {"model.vggt.": self.vggt, "model.fusion.": self.fusion}
        own_params = {prefix: dict(module.named_parameters()) | dict(module.named_buffers())
                      for prefix, module in own.items()}
        loaded: set[str] = set()

        def qwen_weights():
            for name, tensor in weights:
                prefix = next((p for p in own if name.startswith(p)), None)
                if prefix is None:
                    yield name, tensor
                    continue
                local = name[len(prefix):]
                target = own_params[prefix].get(local)
                if target is None:
                    raise ValueError(f"checkpoint tensor {name!r} has no place in the GeoAlign {prefix[6:-1]} module")
                if target.shape != tensor.shape:
                    raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}; the model "
                                     f"expects {tuple(target.shape)}")
                with torch.no_grad():
                    target.copy_(tensor.to(target.dtype))
                loaded.add(prefix[6:] + local)

        loaded |= super().load_weights(qwen_weights())
        missing = [prefix[6:] + n for prefix, module in own.items()
                   for n, _ in module.named_parameters() if prefix[6:] + n not in loaded]
        if missing:
            raise ValueError(f"the checkpoint lacks {len(missing)} GeoAlign weights, e.g. {missing[:3]} (a "
                             "GeoAlignForConditionalGeneration directory holds model.vggt.* and model.fusion.*)")
        self.vggt.init_non_persistent_buffers()
        return loaded

    # ------------------------------------------------------------------ visual tokens
    def embed_multimodal(self, **kwargs: object):
        """One fused embedding [L_item, D] per item, in the items' order."""
        if kwargs.get("pixel_values_videos") is not None:
            return self._embed_videos(kwargs)
        if kwargs.get("geoalign_item") is not None:
            return self._embed_images(kwargs)
        if kwargs.get("pixel_values") is not None or kwargs.get("image_embeds") is not None \
                or kwargs.get("video_embeds") is not None:
            raise ValueError("GeoAlign on vLLM takes frames (images or a video), not precomputed embeddings")
        return []

    def _fuse(self, q: torch.Tensor, vggt_frames: torch.Tensor, gather_index: torch.Tensor) -> torch.Tensor:
        (q_hat, _), = fuse_with_frames(self, [q], vggt_frames, [gather_index], self.fusion_backend)
        return q_hat.to(q.dtype)

    def _embed_videos(self, kwargs) -> tuple[torch.Tensor, ...]:
        q_items = self._process_video_input(self._parse_and_validate_video_input(
            pixel_values_videos=kwargs["pixel_values_videos"], video_grid_thw=kwargs["video_grid_thw"],
            second_per_grid_ts=kwargs.get("second_per_grid_ts")))
        frames, gather = _per_item(kwargs["vggt_pixel_values"]), _per_item(kwargs["gather_index"])
        return tuple(self._fuse(q, f, gi) for q, f, gi in zip(q_items, frames, gather))

    def _embed_images(self, kwargs) -> tuple[torch.Tensor, ...]:
        items = kwargs["geoalign_item"].tolist()
        pixels, grids = _per_item(kwargs["geoalign_pixel_values"]), _per_item(kwargs["geoalign_grid_thw"])
        frames, gather = _per_item(kwargs["vggt_pixel_values"]), _per_item(kwargs["gather_index"])
        out = []
        for i, (hi, lo, position, num_frames) in enumerate(items):
            key = (hi, lo)
            if position == 0:                                  # the whole sample: encode, fuse, keep frames 1..S-1
                grid = grids[i].to(torch.int64)
                if pixels[i].shape[0] == 0 or grid.shape[0] != num_frames:
                    raise RuntimeError(f"internal: the first image of a GeoAlign prompt came without its sample "
                                       f"({grid.shape[0]} of {num_frames} frames)")
                q = self.visual(pixels[i], grid_thw=grid.tolist())
                q_hat = self._fuse(q, frames[i], gather[i])
                sizes = (grid.prod(-1) // (self.visual.spatial_merge_size ** 2)).tolist()
                per_frame = q_hat.split(sizes)
                out.append(per_frame[0].clone())       # a view would keep the whole sample alive in vLLM's cache
                if num_frames > 1:
                    self._keep(key, [None] + [f.to("cpu", copy=True) for f in per_frame[1:]])  # 0 is served
                continue
            kept = self._kept.get(key)
            if kept is None:
                raise RuntimeError(
                    f"vLLM asked for image {position} of a GeoAlign prompt whose fused frames are gone: a G = 4 "
                    f"prompt's images are fused together when its first image is encoded and kept (host memory) for "
                    f"the others up to GEOALIGN_VLLM_KEPT_BYTES ({KEPT_BYTES} bytes, least recently used prompt "
                    "dropped first). A request preempted and resumed past its first image (prefix cache) after its "
                    "frames were dropped meets this: raise GEOALIGN_VLLM_KEPT_BYTES, or lower max_num_seqs")
            self._kept.move_to_end(key)
            out.append(kept[position].to(self.fusion.weight_like.device))
        return tuple(out)

    def _keep(self, key: tuple[int, int], per_frame: list[torch.Tensor | None]) -> None:
        old = self._kept.pop(key, None)                 # item 0 encoded again (a resumed request)
        if old is not None:
            self._kept_bytes -= _nbytes(old)
        self._kept[key] = per_frame
        self._kept_bytes += _nbytes(per_frame)
        while self._kept_bytes > KEPT_BYTES and len(self._kept) > 1:
            _, dropped = self._kept.popitem(last=False)
            self._kept_bytes -= _nbytes(dropped)


def _nbytes(frames: list[torch.Tensor | None]) -> int:
    return sum(t.nbytes for t in frames if t is not None)


def _per_item(value) -> list[torch.Tensor]:
    """A batched field as one tensor per item (vLLM stacks equal shapes, else hands over a list)."""
    if isinstance(value, torch.Tensor):
        return list(value.unbind(0))
    return list(value)
