"""GeoAlignForConditionalGeneration: transformers' Qwen2.5-VL with a frozen VGGT aggregator and GeoAlign's fusion.

The model *is* a ``Qwen2_5_VLForConditionalGeneration`` (save_pretrained / from_pretrained, device_map, dtype,
push_to_hub, PEFT, gradient checkpointing and generate are transformers' own). Its base model :class:`GeoAlignModel`
(``model.model``) is Qwen's ``Qwen2_5_VLModel`` plus ``vggt`` (the frozen geoalign.geometry.VGGTAggregator) and
``fusion`` (geoalign.fusion.GeoAlignFusion). The fusion enters through transformers' extension point:
``get_image_features`` / ``get_video_features`` return the fused visual tokens instead of the tower's output Q, once,
at prefill. The geometry of a call (``vggt_pixel_values``, ``gather_index``, ``fusion_backend``: keyword arguments
of either model's forward, of generate and of the two feature methods) reaches them through
:meth:`GeoAlignModel.geometry`, a context holding it for one forward (docs/architecture.md says why).

Where each path lives: the routed bank fusion in geoalign.visual_fusion, in-LLM injection in geoalign.injection,
GAP-MLLM's progressive fusion in geoalign.progressive, building and loading from files in geoalign.loading, the
input checks in geoalign.model_inputs and geoalign.model_config, accelerate's offload hooks in geoalign.offload.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

import torch
from torch import nn
from transformers import (AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor,
                          Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLModel)
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPreTrainedModel
from transformers.utils import can_return_tuple

from .config import GeoAlignConfig
from .fusion import GeoAlignFusion
from .geometry.aggregator import VGGTAggregator
from .injection import InLLMInjection, keep_bank_layers
from .loading import GeoAlignLoadingMixin, finish_loading, mark_self_initialised
from .lazy_exports import deprecated_aliases
from .model_config import GeoAlignModelConfig, default_fusion_config
from .model_config import check_fits as _check_fits
from .model_inputs import CallGeometry, call_geometry, with_geometry_parameters
from .offload import weights_loaded
from .progressive import ProgressiveFusion, ProgressiveInjection, capture_block_outputs, fuse_levels
from .processing import GeoAlignProcessor
from .serialization import load_fusion, save_fusion
from .visual_fusion import fuse_visual_tokens

logger = logging.getLogger(__name__)


class GeoAlignModel(Qwen2_5_VLModel):
    """Qwen2_5_VLModel (visual, language_model) + ``vggt`` + ``fusion``; the image/video features it returns are
    the fused tokens Q_hat."""

    config_class = GeoAlignModelConfig
    config: GeoAlignModelConfig
    _no_split_modules = ["Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock", "VGGTAggregator", "GeoAlignFusion",
                         "ProgressiveFusion"]

    def __init__(self, config: GeoAlignModelConfig):
        super().__init__(config)
        fusion_config = config.fusion
        vggt = VGGTAggregator(config.vggt)
        _check_fits(fusion_config, config, vggt)
        self.vggt = mark_self_initialised(vggt.requires_grad_(False))
        self.fusion = mark_self_initialised(GeoAlignFusion(fusion_config))
        if config.freeze_vision_tower:
            self.visual.requires_grad_(False)
        #: how often VGGT has run (once per sample per pixel encoding); for tests and diagnostics
        self.vggt_calls = 0
        self._pending: CallGeometry | None = None
        self._bypass = False
        self.routing_recorder = None  # a RoutingRecorder while record_routing() is active
        self.injection = InLLMInjection(self)
        self.injection.install(self.language_model.layers, config.text_config.hidden_size)
        self.progressive_injection = ProgressiveInjection(self)
        self.progressive_injection.install(self.language_model.layers)

    @property
    def group_size(self) -> int:
        return self.fusion.config.group_size

    def set_fusion(self, fusion: GeoAlignFusion | ProgressiveFusion) -> None:
        """Replace the fusion (same D and D'; a bank VGGT has); the config follows."""
        if any(getattr(getattr(m, "_hf_hook", None), "offload", False) for m in self.fusion.modules()):
            raise ValueError("the fusion is offloaded by a device_map ('cpu' / 'disk'): a new one cannot take its "
                             "place (its weights would stay on the meta device); load the fusion without "
                             "offloading it, e.g. from_pretrained(DIR, geoalign=FUSION_DIR) with the fusion on a "
                             "device, or save the model with the new fusion and offload that")
        _check_fits(fusion.config, self.config, self.vggt)
        p = self.fusion.weight_like
        self.fusion = mark_self_initialised(fusion.to(device=p.device, dtype=p.dtype))
        self.config.geoalign_config = fusion.config.to_dict()
        self.injection.install(self.language_model.layers, self.config.text_config.hidden_size)
        self.progressive_injection.install(self.language_model.layers)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' ``from_pretrained``; like the full model's, it refuses a checkpoint without the fusion or
        VGGT weights (they would be left uninitialised)."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        finish_loading(model, info, pretrained_model_name_or_path or "the given state_dict", None)
        return (model, info) if want_info else model

    def _init_weights(self, module: nn.Module) -> None:
        """Qwen's init, plus VGGT's non-persistent buffers (absent from checkpoints; after any meta-device build
        transformers materialises them empty and calls this)."""
        super()._init_weights(module)
        if isinstance(module, VGGTAggregator):
            module.init_non_persistent_buffers()

    # ------------------------------------------------------------------ the call's geometry
    def forward(self, input_ids: torch.Tensor | None = None, *args, vggt_pixel_values=None, gather_index=None,
                fusion_backend: str | None = None, **kwargs):
        """Qwen2_5_VLModel's forward (all its arguments) with the visual tokens fused with this call's geometry
        (``vggt_pixel_values``, ``gather_index``, ``fusion_backend``: see GeoAlignForConditionalGeneration)."""
        with self.geometry(vggt_pixel_values, gather_index, pixel_values=kwargs.get("pixel_values"),
                           pixel_values_videos=kwargs.get("pixel_values_videos"), backend=fusion_backend,
                           input_ids=input_ids):
            return super().forward(input_ids, *args, **kwargs)

    @contextlib.contextmanager
    def geometry(self, vggt_pixel_values, gather_index=None, *, pixel_values=None, pixel_values_videos=None,
                 backend: str | None = None, input_ids: torch.Tensor | None = None) -> Iterator[None]:
        """Context in which this model's image/video features are fused with these samples' VGGT geometry: the one
        holder of a call's geometry (docs/architecture.md says why it is not an argument, and its lifetime).
        ``input_ids`` [B, T] is needed for in-LLM / progressive injection (it marks the visual-token positions).
        Inside an active context (generate's, around each of its forwards) it shares that context's geometry."""
        if self._pending is not None:
            if vggt_pixel_values is not None:
                raise ValueError("the geometry is given twice: as vggt_pixel_values and by the active geometry "
                                 "context (generate's, or model.geometry(...))")
            yield
            return
        self.injection.kept = None  # geometry kept from the previous forward is released here
        self.progressive_injection.kept = None
        if self._bypass or (pixel_values is None and pixel_values_videos is None):
            yield  # text only, or a cached decoding step: nothing to fuse
            return
        self._pending = call_geometry(self.config, self.fusion.config, vggt_pixel_values, gather_index,
                                      pixel_values, pixel_values_videos, backend, input_ids)
        try:
            yield
        finally:
            self._pending = None
            if not torch.is_grad_enabled():
                self.injection.kept = None  # inference: no backward recompute can need the kept layers
                self.progressive_injection.kept = None

    def expand_geometry(self, times: int) -> None:
        """Repeat each sample of the active geometry (and what injection kept of it) ``times`` times, as generate
        expands its batch for beams or several returned sequences."""
        for held in (self._pending, self.injection.kept, self.progressive_injection.kept):
            if held is not None and times > 1:
                held.expand(times)

    @contextlib.contextmanager
    def without_fusion(self) -> Iterator[None]:
        """Context in which the model is plain Qwen2.5-VL (ablations; reading the raw router queries Q)."""
        prev, self._bypass = self._bypass, True
        try:
            yield
        finally:
            self._bypass = prev

    def record_routing(self, keep_tensors: bool = False):
        """Context that records each fused sample's routing (prefill only) into a RoutingRecorder it yields."""
        from .routing_analysis import record_routing

        return record_routing(self, keep_tensors)

    # ------------------------------------------------------------------ transformers' extension points
    @can_return_tuple
    def get_image_features(self, pixel_values, image_grid_thw=None, vggt_pixel_values=None, gather_index=None,
                           fusion_backend: str | None = None, **kwargs):
        """Qwen's image features (per image, Q_b split as Qwen splits them), fused with the geometry: the one given
        here, or the active context's (the model's forward / generate)."""
        with self._given_geometry(vggt_pixel_values, gather_index, fusion_backend, pixel_values=pixel_values):
            return self._fused(super().get_image_features, pixel_values, image_grid_thw, kwargs)

    @can_return_tuple
    def get_video_features(self, pixel_values_videos, video_grid_thw=None, vggt_pixel_values=None, gather_index=None,
                           fusion_backend: str | None = None, **kwargs):
        """Qwen's video features, fused with the geometry (given here, or the active context's)."""
        with self._given_geometry(vggt_pixel_values, gather_index, fusion_backend,
                                  pixel_values_videos=pixel_values_videos):
            return self._fused(super().get_video_features, pixel_values_videos, video_grid_thw, kwargs)

    def _given_geometry(self, vggt_pixel_values, gather_index, backend, **pixels):
        if vggt_pixel_values is None:
            if gather_index is not None or backend is not None:
                raise ValueError("gather_index / fusion_backend given without vggt_pixel_values")
            return contextlib.nullcontext()
        if self._pending is not None:
            raise ValueError("the geometry is given twice: as vggt_pixel_values here and by the active geometry "
                             "context (the model's forward / generate, or model.geometry(...))")
        return self.geometry(vggt_pixel_values, gather_index, backend=backend, **pixels)

    def _fused(self, encode, pixels, grid_thw, kwargs: dict):
        blocks = () if self._bypass else self.fusion.config.progressive_vit_blocks
        with capture_block_outputs(self.visual.blocks, blocks) as block_outputs:  # progressive fusion only
            out = encode(pixels, grid_thw, **{**kwargs, "return_dict": True})
        if not self._bypass:
            parts = out.pooler_output  # Qwen's per-image / per-video split of Q
            q = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
            with weights_loaded(self.vggt, self.fusion):  # offloaded (device_map "cpu" / "disk"): load them now
                q_hat = self._fuse_pending(q, grid_thw, block_outputs)
            if q_hat is not q:
                out.pooler_output = torch.split(q_hat, [int(p.shape[0]) for p in parts])
        return out

    def _fuse_pending(self, q: torch.Tensor, grid_thw: torch.Tensor,
                      block_outputs: dict[int, torch.Tensor]) -> torch.Tensor:
        pending = self._pending
        if pending is None:
            raise RuntimeError("Qwen's vision tower ran without GeoAlign's geometry: pass vggt_pixel_values to the "
                               "model's forward / generate or to get_image_features / get_video_features (or use "
                               "model.geometry(...), or model.without_fusion())")
        if pending.used:
            raise RuntimeError("Qwen's vision tower ran twice in one GeoAlign forward; expected one visual input")
        pending.used = True
        if self.fusion.config.injection_layers:
            keep_bank_layers(self, q, grid_thw, pending.samples, pending.visual_mask, pending.backend)
            return q  # the tower's output goes to the LLM unchanged; the decoder hooks fuse
        if self.fusion.config.is_progressive:
            return fuse_levels(self, q, block_outputs, grid_thw, pending.samples, pending.visual_mask)
        return fuse_visual_tokens(self, q, grid_thw, pending.samples, backend=pending.backend)

    # ------------------------------------------------------------------ the fusion (geoalign.visual_fusion)
    def fuse_visual_tokens(self, q: torch.Tensor, grid_thw: torch.Tensor, samples, gather_index=None,
                           backend: str | None = None) -> torch.Tensor:
        """Q [L_total, D] -> Q_hat by the routed bank fusion: see :func:`geoalign.visual_fusion.fuse_visual_tokens`."""
        with weights_loaded(self.vggt, self.fusion):
            return fuse_visual_tokens(self, q, grid_thw, samples, gather_index, backend)


class GeoAlignForConditionalGeneration(GeoAlignLoadingMixin, Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL with GeoAlign's geometry fusion (see the module docstring).

    Call: ``model(input_ids=..., attention_mask=..., pixel_values=... | pixel_values_videos=..., image_grid_thw=... |
    video_grid_thw=..., vggt_pixel_values=..., gather_index=..., labels=...)`` and
    ``model.generate(**same, max_new_tokens=...)``. ``vggt_pixel_values`` holds each sample's frames for VGGT
    (a list of [S_b, 3, H_b, W_b] tensors in [0, 1], or one [B, S, 3, H, W] tensor); ``gather_index`` is optional
    (one [L_b, G] tensor per sample; default built from the frame grid). G (``geoalign_config.group_size``) fixes the
    input path: 4 = frames as separate images (``pixel_values``), 8 = Qwen's video path (``pixel_values_videos``).
    """

    config_class = GeoAlignModelConfig
    config: GeoAlignModelConfig
    _no_split_modules = GeoAlignModel._no_split_modules

    def __init__(self, config: GeoAlignModelConfig):
        Qwen2_5_VLPreTrainedModel.__init__(self, config)  # Qwen's own __init__ would build a plain Qwen2_5_VLModel
        self.model = GeoAlignModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    # ------------------------------------------------------------------ the GeoAlign parts
    @property
    def fusion(self) -> GeoAlignFusion:
        return self.model.fusion

    @property
    def vggt(self) -> VGGTAggregator:
        return self.model.vggt

    @property
    def geoalign_config(self) -> GeoAlignConfig:
        return self.model.fusion.config

    @property
    def group_size(self) -> int:
        return self.model.group_size

    @property
    def vggt_calls(self) -> int:
        """How often VGGT has run (once per sample per pixel encoding); settable (tests reset it)."""
        return self.model.vggt_calls

    @vggt_calls.setter
    def vggt_calls(self, value: int) -> None:
        self.model.vggt_calls = value

    def geometry(self, vggt_pixel_values, gather_index=None, **kwargs):
        """See :meth:`GeoAlignModel.geometry`."""
        return self.model.geometry(vggt_pixel_values, gather_index, **kwargs)

    def without_fusion(self):
        """Context in which the model is plain Qwen2.5-VL."""
        return self.model.without_fusion()

    def record_routing(self, keep_tensors: bool = False):
        """Context yielding a RoutingRecorder (geoalign/routing_analysis.py): every sample fused inside it (a forward,
        or a generate's prefill) appends its routing summary, plus topk_idx / alpha / token layout (keep_tensors)."""
        return self.model.record_routing(keep_tensors)

    def fuse_visual_tokens(self, q, grid_thw, samples, gather_index=None, backend=None) -> torch.Tensor:
        return self.model.fuse_visual_tokens(q, grid_thw, samples, gather_index, backend)

    def save_fusion(self, directory: str | os.PathLike) -> None:
        """Only the trained fusion: ``geoalign_config.json`` + ``fusion.safetensors`` (small; apart from the base)."""
        save_fusion(self.fusion, directory)

    def load_fusion(self, directory: str | os.PathLike) -> None:
        """Replace the fusion with one saved by :meth:`save_fusion` (same D and D' required)."""
        self.model.set_fusion(load_fusion(directory))

    # ------------------------------------------------------------------ forward / generate
    def forward(self, input_ids: torch.Tensor | None = None, *args, return_routing: bool = False, **kwargs):
        """Qwen2.5-VL's forward (all its arguments) plus ``vggt_pixel_values`` / ``gather_index`` /
        ``fusion_backend``, which go through to the base model's forward. With ``return_routing=True`` the output's
        ``routing`` attribute lists each sample's SampleRouting (tensors kept)."""
        if return_routing:
            with self.record_routing(keep_tensors=True) as recorder:
                out = super().forward(input_ids, *args, **kwargs)
            out.routing = recorder.samples
            return out
        return super().forward(input_ids, *args, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None, *args, **kwargs):
        """transformers' ``generate``; the geometry is held for the whole call and fused once, when the pixels are
        encoded (beams and returned sequences share their sample's: VGGT runs once per sample)."""
        geometry = {k: kwargs.pop(k, None) for k in ("vggt_pixel_values", "gather_index", "fusion_backend")}
        with self.model.geometry(geometry["vggt_pixel_values"], geometry["gather_index"],
                                 pixel_values=kwargs.get("pixel_values"),
                                 pixel_values_videos=kwargs.get("pixel_values_videos"),
                                 backend=geometry["fusion_backend"], input_ids=input_ids):
            return super().generate(input_ids, *args, **kwargs)

    def _expand_inputs_for_generation(self, expand_size: int = 1, *args, **model_kwargs):
        """transformers' batch expansion for beams / returned sequences, and the held geometry with it."""
        self.model.expand_geometry(expand_size)
        return super()._expand_inputs_for_generation(expand_size, *args, **model_kwargs)


# transformers reads forward's signature (generate's model-kwargs check, PEFT): show Qwen's parameters and ours
GeoAlignForConditionalGeneration.forward.__signature__ = with_geometry_parameters(
    Qwen2_5_VLForConditionalGeneration.forward)
GeoAlignModel.forward.__signature__ = with_geometry_parameters(Qwen2_5_VLModel.forward, return_routing=False)
AutoConfig.register(GeoAlignModelConfig.model_type, GeoAlignModelConfig, exist_ok=True)
AutoModel.register(GeoAlignModelConfig, GeoAlignModel, exist_ok=True)
AutoModelForImageTextToText.register(GeoAlignModelConfig, GeoAlignForConditionalGeneration, exist_ok=True)
AutoProcessor.register(GeoAlignModelConfig, GeoAlignProcessor, exist_ok=True)

__getattr__ = deprecated_aliases(__name__, {"check_fits": "geoalign.model_config:check_fits",
                                            "forward_accepts": "geoalign.model_inputs:forward_accepts"})
__all__ = ["GeoAlignForConditionalGeneration", "GeoAlignModel", "GeoAlignModelConfig", "default_fusion_config",
           "save_fusion", "load_fusion"]
