"""GeoAlignForConditionalGeneration: transformers' Qwen2.5-VL with a frozen VGGT aggregator and GeoAlign's fusion.

The model *is* a ``Qwen2_5_VLForConditionalGeneration`` (save_pretrained / from_pretrained, device_map, dtype,
push_to_hub, PEFT, gradient checkpointing and generate are transformers' own). Its base model :class:`GeoAlignModel`
(``model.model``) is Qwen's ``Qwen2_5_VLModel`` plus ``vggt`` (the frozen geoalign.geometry.VGGTAggregator) and
``fusion`` (geoalign.fusion.GeoAlignFusion). The fusion enters through transformers' extension point:
``get_image_features`` / ``get_video_features`` return the fused visual tokens instead of the tower's output Q, once,
at prefill. The geometry of a call (``vggt_pixel_values``, ``gather_index``: keyword arguments of forward and
generate) reaches them through :meth:`GeoAlignModel.geometry`, a context holding it for one forward.

Where each path lives: the routed bank fusion in geoalign.visual_fusion, in-LLM injection in geoalign.injection,
GAP-MLLM's progressive fusion in geoalign.progressive, building and loading from files in geoalign.loading, the
input checks in geoalign.model_inputs and geoalign.model_config.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

import torch
from torch import nn
from transformers import (AutoConfig, AutoModelForImageTextToText, AutoProcessor, Qwen2_5_VLForConditionalGeneration,
                          Qwen2_5_VLModel)
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPreTrainedModel

from .atomic_files import staged_directory
from .config import GeoAlignConfig
from .fusion import GeoAlignFusion
from .geometry.aggregator import VGGTAggregator
from .geometry.config import VGGTAggregatorConfig
from .injection import InLLMInjection, keep_bank_layers
from .loading import (base_checkpoint_kwargs, build_from_qwen_and_vggt, check_model_directory, device_as_map,
                      finish_loading, legacy_sources, mark_self_initialised)
from .model_config import GeoAlignModelConfig, check_fits, default_fusion_config
from .model_inputs import CallGeometry, call_geometry, forward_accepts, with_geometry_parameters  # noqa: F401
from .progressive import ProgressiveInjection, capture_block_outputs, fuse_levels
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
        check_fits(fusion_config, config, vggt)
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

    def set_fusion(self, fusion: GeoAlignFusion) -> None:
        """Replace the fusion (same D and D'; a bank VGGT has); the config follows."""
        check_fits(fusion.config, self.config, self.vggt)
        p = self.fusion.weight_like
        self.fusion = mark_self_initialised(fusion.to(device=p.device, dtype=p.dtype))
        self.config.geoalign_config = fusion.config.to_dict()
        self.injection.install(self.language_model.layers, self.config.text_config.hidden_size)
        self.progressive_injection.install(self.language_model.layers)

    # ------------------------------------------------------------------ the call's geometry
    @contextlib.contextmanager
    def geometry(self, vggt_pixel_values, gather_index=None, *, pixel_values=None, pixel_values_videos=None,
                 backend: str | None = None, input_ids: torch.Tensor | None = None) -> Iterator[None]:
        """Context in which this model's image/video features are fused with these samples' VGGT geometry.
        ``input_ids`` [B, T] is needed for in-LLM / progressive injection (it marks the visual-token positions).
        Inside an active context (generate's, around each of its forwards) it shares that context's geometry."""
        if self._pending is not None:
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
    def get_image_features(self, pixel_values, image_grid_thw=None, **kwargs):
        """Qwen's image features (per image, Q_b split as Qwen splits them), fused with the call's geometry."""
        return self._fused(super().get_image_features, pixel_values, image_grid_thw, "image", kwargs)

    def get_video_features(self, pixel_values_videos, video_grid_thw=None, **kwargs):
        """Qwen's video features, fused with the call's geometry."""
        return self._fused(super().get_video_features, pixel_values_videos, video_grid_thw, "video", kwargs)

    def _fused(self, encode, pixels, grid_thw, kind: str, kwargs: dict):
        return_dict = kwargs.pop("return_dict", True)
        blocks = () if self._bypass else self.fusion.config.progressive_vit_blocks
        with capture_block_outputs(self.visual.blocks, blocks) as block_outputs:  # progressive fusion only
            out = encode(pixels, grid_thw, return_dict=True, **kwargs)
        if not self._bypass:
            parts = out.pooler_output  # Qwen's per-image / per-video split of Q
            q = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
            q_hat = self._fuse_pending(q, grid_thw, kind, block_outputs)
            if q_hat is not q:
                out.pooler_output = torch.split(q_hat, [int(p.shape[0]) for p in parts])
        return out if return_dict else out.to_tuple()

    def _fuse_pending(self, q: torch.Tensor, grid_thw: torch.Tensor, kind: str,
                      block_outputs: dict[int, torch.Tensor]) -> torch.Tensor:
        pending = self._pending
        if pending is None:
            raise RuntimeError("Qwen's vision tower ran outside a GeoAlign forward: call the model's forward / "
                               "generate with vggt_pixel_values (or model.geometry(...), or model.without_fusion())")
        if pending.used:
            raise RuntimeError("Qwen's vision tower ran twice in one GeoAlign forward; expected one visual input")
        pending.used = True
        if self.fusion.config.injection_layers:
            keep_bank_layers(self, q, grid_thw, pending.samples, pending.visual_mask, pending.backend)
            return q  # the tower's output goes to the LLM unchanged; the decoder hooks fuse
        if self.fusion.config.is_progressive:
            return fuse_levels(self, q, block_outputs, grid_thw, pending.samples, pending.visual_mask)
        return self.fuse_visual_tokens(q, grid_thw, pending.samples, backend=pending.backend)

    # ------------------------------------------------------------------ the fusion (geoalign.visual_fusion)
    def fuse_visual_tokens(self, q: torch.Tensor, grid_thw: torch.Tensor, samples, gather_index=None,
                           backend: str | None = None) -> torch.Tensor:
        """Q [L_total, D] -> Q_hat by the routed bank fusion: see :func:`geoalign.visual_fusion.fuse_visual_tokens`."""
        return fuse_visual_tokens(self, q, grid_thw, samples, gather_index, backend)


class GeoAlignForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
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
    def forward(self, input_ids: torch.Tensor | None = None, *args, vggt_pixel_values=None, gather_index=None,
                fusion_backend: str | None = None, return_routing: bool = False, **kwargs):
        """Qwen2.5-VL's forward (all its arguments), with the visual tokens fused with VGGT geometry. With
        ``return_routing=True`` the output's ``routing`` attribute lists each sample's SampleRouting (tensors kept)."""
        if return_routing:
            with self.record_routing(keep_tensors=True) as recorder:
                out = self.forward(input_ids, *args, vggt_pixel_values=vggt_pixel_values, gather_index=gather_index,
                                   fusion_backend=fusion_backend, **kwargs)
            out.routing = recorder.samples
            return out
        with self.model.geometry(vggt_pixel_values, gather_index, pixel_values=kwargs.get("pixel_values"),
                                 pixel_values_videos=kwargs.get("pixel_values_videos"), backend=fusion_backend,
                                 input_ids=input_ids):
            return super().forward(input_ids, *args, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None, *args, **kwargs):
        """transformers' ``generate``; the geometry is computed once, when Qwen encodes the pixels at prefill."""
        if kwargs.get("num_beams", 1) not in (None, 1) or kwargs.get("num_return_sequences", 1) not in (None, 1):
            raise ValueError("GeoAlign generate supports num_beams=1 and num_return_sequences=1 only (the per-sample "
                             "VGGT frames are not expanded over beams)")
        geometry = {k: kwargs.pop(k, None) for k in ("vggt_pixel_values", "gather_index", "fusion_backend")}
        with self.model.geometry(geometry["vggt_pixel_values"], geometry["gather_index"],
                                 pixel_values=kwargs.get("pixel_values"),
                                 pixel_values_videos=kwargs.get("pixel_values_videos"),
                                 backend=geometry["fusion_backend"], input_ids=input_ids):
            return super().generate(input_ids, *args, **kwargs)  # Qwen encodes the pixels once, at prefill

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_parts(cls, qwen_config, vggt_config: VGGTAggregatorConfig | None = None,
                   geoalign_config: GeoAlignConfig | None = None, *, dtype: torch.dtype | None = None,
                   attn_implementation: str | None = None, freeze_vision: bool = True):
        """A randomly initialised model from Qwen2.5-VL's config and the VGGT and fusion configs (tests, ablations)."""
        config = GeoAlignModelConfig.from_parts(qwen_config, vggt_config, geoalign_config,
                                                freeze_vision_tower=freeze_vision)
        kw = {"attn_implementation": attn_implementation, "dtype": dtype}
        return cls._from_config(config, **{k: v for k, v in kw.items() if v is not None})

    @classmethod
    def from_config(cls, config, vggt_config: VGGTAggregatorConfig | None = None,
                    geoalign_config: GeoAlignConfig | None = None, **kwargs):
        """A randomly initialised model: from a GeoAlignModelConfig, or as :meth:`from_parts` from Qwen's config and
        the VGGT and fusion configs."""
        if isinstance(config, GeoAlignModelConfig) and vggt_config is None and geoalign_config is None:
            kw = {k: kwargs[k] for k in ("dtype", "attn_implementation") if kwargs.get(k) is not None}
            return cls._from_config(config, **kw)
        return cls.from_parts(config, vggt_config, geoalign_config, **kwargs)

    @classmethod
    def from_qwen_and_vggt(cls, qwen: str | os.PathLike, vggt: str | os.PathLike,
                           fusion: str | os.PathLike | None = None,
                           *, vggt_config: VGGTAggregatorConfig | None = None,
                           geoalign_config: GeoAlignConfig | dict | None = None, dtype: torch.dtype | None = None,
                           device: torch.device | str | None = None, attn_implementation: str | None = None,
                           freeze_vision: bool = True):
        """Build from the base models (local files only): a Qwen2.5-VL directory, a VGGT checkpoint (file or
        directory; ``vggt_config.json`` beside it, else VGGT-1B) and a fusion directory written by
        :meth:`save_fusion` (else a fresh fusion from ``geoalign_config``: a GeoAlignConfig, or a dict of overrides of
        the paper's settings such as ``{"fusion": "gated_2d3d"}``; default: the paper's settings)."""
        return build_from_qwen_and_vggt(cls, qwen, vggt, fusion, vggt_config=vggt_config,
                                        geoalign_config=geoalign_config, dtype=dtype, device=device,
                                        attn_implementation=attn_implementation, freeze_vision=freeze_vision)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, *args, qwen=None, vggt=None, geoalign=None,
                        **kwargs):
        """transformers' ``from_pretrained`` for a checkpoint written by :meth:`save_pretrained`.

        Also accepted: a legacy geoalign directory (``geoalign_model.json``; convert it once with
        ``geoalign convert OLD NEW``), and the base-model form ``from_pretrained(qwen=DIR, vggt=PATH,
        geoalign=FUSION_DIR)``, which is :meth:`from_qwen_and_vggt`."""
        path = pretrained_model_name_or_path
        if path is None or (qwen is not None and vggt is not None):
            if qwen is None or vggt is None:
                raise ValueError("from_pretrained needs a saved GeoAlign directory, or both qwen= and vggt= paths")
            return cls.from_qwen_and_vggt(qwen, vggt, geoalign, **base_checkpoint_kwargs(kwargs))
        legacy = legacy_sources(path, qwen, vggt, geoalign)
        if legacy is not None:
            return cls.from_qwen_and_vggt(*legacy, **base_checkpoint_kwargs(kwargs))
        check_model_directory(path, kwargs)
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(path, *args, output_loading_info=True, **device_as_map(kwargs))
        finish_loading(model, info, path, geoalign)
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory: str | os.PathLike, *args, processor=None, **kwargs):
        """transformers' ``save_pretrained``, written atomically (a staged directory renamed into place); with
        ``processor`` (a GeoAlignProcessor) its tokenizer and image processor go into the same directory."""
        if not kwargs.get("is_main_process", True):
            return super().save_pretrained(save_directory, *args, **kwargs)  # writes nothing on other ranks
        with staged_directory(save_directory, "config.json") as stage:
            super().save_pretrained(stage, *args, **kwargs)
            if processor is not None:
                processor.save_pretrained(stage)


# transformers reads forward's signature (generate's model-kwargs check, PEFT): show Qwen's parameters and ours
GeoAlignForConditionalGeneration.forward.__signature__ = with_geometry_parameters(
    Qwen2_5_VLForConditionalGeneration.forward)
AutoConfig.register(GeoAlignModelConfig.model_type, GeoAlignModelConfig, exist_ok=True)
AutoModelForImageTextToText.register(GeoAlignModelConfig, GeoAlignForConditionalGeneration, exist_ok=True)
AutoProcessor.register(GeoAlignModelConfig, GeoAlignProcessor, exist_ok=True)

__all__ = ["GeoAlignForConditionalGeneration", "GeoAlignModel", "GeoAlignModelConfig", "default_fusion_config",
           "save_fusion", "load_fusion"]
