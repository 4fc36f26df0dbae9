"""GeoAlignForConditionalGeneration: transformers' Qwen2.5-VL with a frozen VGGT aggregator and GeoAlign's fusion.

The model *is* a ``Qwen2_5_VLForConditionalGeneration`` (a transformers ``PreTrainedModel`` with
``GenerationMixin``): ``save_pretrained`` / ``from_pretrained`` (safetensors shards, ``device_map``, ``dtype``),
``push_to_hub``, PEFT, gradient checkpointing and ``generate`` are transformers' own. Its base model
(:class:`GeoAlignModel`, ``model.model``) is Qwen's ``Qwen2_5_VLModel`` plus two modules:

  model.model.vggt    the frozen VGGT aggregator (geoalign.geometry.VGGTAggregator)
  model.model.fusion  GeoAlignFusion (parameter names: geoalign.fusion.GeoAlignFusion)

The fusion enters through transformers' own extension point: ``get_image_features`` / ``get_video_features`` return
the fused visual tokens Q_hat instead of the vision tower's merged output Q. Per sample it routes Q_b first, then
runs VGGT on that sample's frames and feeds each bank layer to the fusion stream as it is produced (no layer list is
ever held). Qwen calls these methods only when it encodes pixels, i.e. once, at prefill, in ``generate``.

The geometry inputs of a call (``vggt_pixel_values``, ``gather_index``) are keyword arguments of ``forward`` and
``generate``; they reach ``get_image_features`` through :meth:`GeoAlignModel.geometry`, a context that holds them for
the duration of one forward (the only per-call state). In-LLM injection (``geoalign_config.injection_layers``) uses
decoder-layer pre-hooks instead (geoalign.injection). GAP-MLLM's progressive fusion (``progressive_geo_layers``;
geoalign.progressive) replaces the routed bank: per sample, J levels pair captured ViT block outputs (and the tower's
output Q, last) with J VGGT layers streamed from one VGGT pass; the last level replaces Q, earlier levels are added
after early decoder layers by forward hooks.

Build: ``from_qwen_and_vggt(qwen_dir, vggt_checkpoint)`` (the base models, a fresh or saved fusion), ``from_parts``
(random, for tests), ``from_pretrained(dir)`` (a checkpoint written by ``save_pretrained``; a legacy geoalign
directory also loads), or ``AutoModelForImageTextToText.from_pretrained(dir)``.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator

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
from .injection import InLLMInjection, KeptGeometry
from .model_config import GeoAlignModelConfig, default_fusion_config
from .model_inputs import SampleGeometry, as_samples, split_by_sample
from .progressive import KeptLevels, ProgressiveInjection, capture_block_outputs, merged_in_token_order, window_index
from .processing import GeoAlignProcessor
from .serialization import VGGT_CONFIG, is_legacy_directory, legacy_parts, load_fusion, save_fusion

logger = logging.getLogger(__name__)


@dataclass
class _PendingGeometry:
    """The geometry inputs of the forward in progress."""

    samples: list[SampleGeometry]
    backend: str | None
    kind: str  # "image" or "video": the pixel input Qwen will encode
    visual_mask: torch.Tensor | None = None  # [B, T] visual-token positions (in-LLM / progressive injection)
    used: bool = False


def _self_initialised(module: nn.Module) -> nn.Module:
    """Mark a module tree as initialised by its own constructor, so transformers' weight init leaves it alone."""
    for m in module.modules():
        m._is_hf_initialized = True
    return module


class GeoAlignModel(Qwen2_5_VLModel):
    """Qwen2_5_VLModel (visual, language_model) + ``vggt`` + ``fusion``; the image/video features it returns are
    the fused tokens Q_hat."""

    config_class = GeoAlignModelConfig
    config: GeoAlignModelConfig
    _no_split_modules = ["Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock", "VGGTAggregator", "GeoAlignFusion"]

    def __init__(self, config: GeoAlignModelConfig):
        super().__init__(config)
        fusion_config = config.fusion
        vggt = VGGTAggregator(config.vggt)
        check_fits(fusion_config, config, vggt)
        self.vggt = _self_initialised(vggt.requires_grad_(False))
        self.fusion = _self_initialised(GeoAlignFusion(fusion_config))
        if config.freeze_vision_tower:
            self.visual.requires_grad_(False)
        #: how often VGGT has run (once per sample per pixel encoding); for tests and diagnostics
        self.vggt_calls = 0
        self._pending: _PendingGeometry | None = None
        self._bypass = False
        self._routing_recorder = None  # a RoutingRecorder while record_routing() is active
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
        self.fusion = _self_initialised(fusion.to(device=p.device, dtype=p.dtype))
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
        if pixel_values is not None and pixel_values_videos is not None:
            raise ValueError("GeoAlign fuses one visual input kind per model: got both pixel_values and "
                             "pixel_values_videos")
        kind = "image" if pixel_values is not None else "video"
        want = "image" if self.group_size == 4 else "video"
        if kind != want:
            raise ValueError(f"this GeoAlign model has G={self.group_size} and fuses {want}s "
                             f"({'pixel_values' if want == 'image' else 'pixel_values_videos'}), got {kind} input")
        if vggt_pixel_values is None:
            raise ValueError("GeoAlign needs the frames for VGGT: pass vggt_pixel_values (see GeoAlignProcessor)")
        samples = as_samples(vggt_pixel_values, gather_index)
        mask = None
        cfg = self.fusion.config
        if cfg.injection_layers or cfg.progressive_inject_layers:
            if input_ids is None:
                field = "injection_layers" if cfg.injection_layers else "progressive_inject_layers"
                raise ValueError(f"in-LLM injection (geoalign_config.{field}) needs input_ids to find the "
                                 "visual-token positions")
            mask = input_ids == (self.config.image_token_id if kind == "image" else self.config.video_token_id)
        self._pending = _PendingGeometry(samples, backend, kind, visual_mask=mask)
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

    @contextlib.contextmanager
    def record_routing(self, keep_tensors: bool = False):
        """Context that records each fused sample's routing (prefill only) into a RoutingRecorder it yields."""
        from .routing_analysis import RoutingRecorder

        if self.fusion.config.injection_layers:
            raise ValueError("routing recording covers the pre-LLM fusion; this model injects geometry inside the "
                             f"LLM (injection_layers={list(self.fusion.config.injection_layers)})")
        if self.fusion.config.is_progressive:
            raise ValueError("routing recording covers the routed bank fusion; this model uses the progressive "
                             f"fusion (progressive_geo_layers={list(self.fusion.config.progressive_geo_layers)}), "
                             "which has no routes")
        if self._routing_recorder is not None:
            raise RuntimeError("record_routing() is already active on this model")
        self._routing_recorder = recorder = RoutingRecorder(keep_tensors=keep_tensors)
        try:
            yield recorder
        finally:
            self._routing_recorder = None

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
            raise RuntimeError("Qwen's vision tower ran outside a GeoAlign forward: call the model's forward / generate "
                               "with vggt_pixel_values (or use model.geometry(...), or model.without_fusion())")
        if pending.used:
            raise RuntimeError("Qwen's vision tower ran twice in one GeoAlign forward; expected one visual input")
        pending.used = True
        if self.fusion.config.injection_layers:
            self._keep_for_injection(q, grid_thw, pending)
            return q  # the tower's output goes to the LLM unchanged; the decoder hooks fuse
        if self.fusion.config.is_progressive:
            return self._fuse_progressive(q, block_outputs, grid_thw, pending)
        return self.fuse_visual_tokens(q, grid_thw, pending.samples, backend=pending.backend)

    # ------------------------------------------------------------------ the fusion
    def fuse_visual_tokens(self, q: torch.Tensor, grid_thw: torch.Tensor, samples, gather_index=None,
                           backend: str | None = None) -> torch.Tensor:
        """Q [L_total, D] (the vision tower's merged output for the whole batch, sample-major) -> Q_hat.
        ``samples``: per-sample VGGT frames (as ``vggt_pixel_values``). One VGGT pass and one fusion stream per
        sample. Raises ValueError when Qwen's grids / token counts do not match the VGGT frames. Not for the
        progressive fusion (it also needs the tower's intermediate blocks: use forward)."""
        if self.fusion.config.is_progressive:
            raise ValueError("fuse_visual_tokens runs the routed bank fusion; this model uses the progressive "
                             "fusion, which also needs the vision tower's intermediate blocks: call the model's "
                             "forward")
        if not (isinstance(samples, list) and samples and isinstance(samples[0], SampleGeometry)):
            samples = as_samples(samples, gather_index)
        out = [self._fuse_sample(q_b, s.images, gi, backend)
               for q_b, s, gi in split_by_sample(q, grid_thw, samples, self.group_size)]
        return torch.cat(out, dim=0) if len(out) > 1 else out[0]

    def _vggt_layers(self, images: torch.Tensor, layer_ids, dtype: torch.dtype) -> Iterator[tuple[int, torch.Tensor]]:
        """(position in ``layer_ids``, layer rows [N, D']) for one sample's frames [S, 3, H, W]: one VGGT pass,
        each layer yielded as VGGT produces it (ascending ids)."""
        position = {layer: i for i, layer in enumerate(layer_ids)}
        vp = next(self.vggt.parameters())
        images = images.to(device=vp.device, dtype=vp.dtype)
        self.vggt_calls += 1
        for layer_id, tokens in self.vggt.iter_layers(images[None], layer_ids, out_dtype=dtype):
            yield position[layer_id], tokens.reshape(-1, tokens.shape[-1])

    def _bank_layers(self, images: torch.Tensor, dtype: torch.dtype) -> Iterator[tuple[int, torch.Tensor]]:
        """(bank position, layer rows [N, D']) for one sample's frames, in the order VGGT produces them."""
        return self._vggt_layers(images, self.fusion.config.bank_layers, dtype)

    def _fuse_sample(self, q: torch.Tensor, images: torch.Tensor, gather_index: torch.Tensor,
                     backend: str | None) -> torch.Tensor:
        """Route first, then stream this sample's bank layers from VGGT into the fusion."""
        fp = self.fusion.weight_like
        q = q.to(device=fp.device, dtype=fp.dtype)
        stream = self.fusion.begin(q, gather_index.to(device=fp.device, dtype=torch.int64), backend=backend)
        for position, rows in self._bank_layers(images, fp.dtype):  # the router read only Q: routes known now
            stream.add(position, rows.to(fp.device))
            del rows
        q_hat, routing = stream.finish()
        if self._routing_recorder is not None:
            self._routing_recorder.add(routing, gather_index, images, self.fusion.config.bank_layers)
        return q_hat

    def _keep_for_injection(self, q: torch.Tensor, grid_thw: torch.Tensor, pending: _PendingGeometry) -> None:
        """In-LLM injection, at prefill: run VGGT once per sample and keep its M bank layers for the decoder hooks."""
        fp = self.fusion.weight_like
        kept = []
        for _q_b, s, gi in split_by_sample(q, grid_thw, pending.samples, self.group_size):
            layers: list = [None] * self.fusion.config.num_bank_layers
            for position, rows in self._bank_layers(s.images, fp.dtype):
                layers[position] = rows.to(fp.device)
            kept.append((layers, gi.to(device=fp.device, dtype=torch.int64)))
        self.injection.keep(KeptGeometry(pending.visual_mask.to(q.device), kept, pending.backend))

    def _fuse_progressive(self, q: torch.Tensor, block_outputs: dict[int, torch.Tensor], grid_thw: torch.Tensor,
                          pending: _PendingGeometry) -> torch.Tensor:
        """GAP-MLLM's progressive fusion at prefill. q [L_total, D] (the tower's output), block_outputs {b: [seq, C]}
        (the intermediate ViT blocks, window order) -> the last level's fused tokens [L_total, D]; the intermediate
        levels' fused tokens [L_total, D] are kept for the decoder hooks. Per sample one VGGT pass streams the J
        layers; level j is computed when its layer arrives and the layer is dropped then."""
        fusion, cfg = self.fusion, self.fusion.config
        fp = fusion.weight_like
        order = window_index(self.visual, grid_thw)
        views = [merged_in_token_order(merger, block_outputs[b].to(device=fp.device, dtype=fp.dtype), order)
                 for merger, b in zip(fusion.mergers, cfg.progressive_vit_blocks)]
        views.append(q.to(device=fp.device, dtype=fp.dtype))
        stacked = torch.stack(views, dim=1)  # [L_total, J, D]: level j's visual tokens V_j
        del views
        fused: list[list[torch.Tensor]] = [[] for _ in fusion.levels]
        for v_b, s, gi in split_by_sample(stacked, grid_thw, pending.samples, self.group_size):
            gi = gi.to(device=fp.device, dtype=torch.int64)
            for j, rows in self._vggt_layers(s.images, cfg.progressive_geo_layers, fp.dtype):
                level = fusion.levels[j]
                fused[j].append(level(v_b[:, j], level.geometry(rows.to(fp.device), gi)))
                del rows
        out = [torch.cat(parts, dim=0) if len(parts) > 1 else parts[0] for parts in fused]
        if len(out) > 1:
            self.progressive_injection.keep(KeptLevels(pending.visual_mask.to(fp.device), out[:-1]))
        return out[-1]


def check_fits(fusion: GeoAlignConfig, config: GeoAlignModelConfig, vggt: VGGTAggregator) -> None:
    """The fusion's widths and bank fit Qwen's vision tower and this VGGT (ValueError naming both sides)."""
    vis_out = int(getattr(config.vision_config, "out_hidden_size", None) or config.text_config.hidden_size)
    if fusion.hidden_size != vis_out:
        raise ValueError(f"fusion hidden_size {fusion.hidden_size} != Qwen vision tower output width {vis_out}")
    if fusion.geo_dim != vggt.config.out_dim:
        raise ValueError(f"fusion geo_dim {fusion.geo_dim} != VGGT layer width {vggt.config.out_dim} (2 * embed_dim)")
    if fusion.group_size not in (4, 8):
        raise ValueError(f"fusion group_size must be 4 (images) or 8 (video), got {fusion.group_size}")
    if fusion.is_progressive:
        _check_progressive_fits(fusion, config, vggt)
        return                          # the routed bank (bank_layers, geo_depth) is not built
    if max(fusion.bank_layers) >= vggt.depth:
        raise ValueError(f"fusion bank_layers {list(fusion.bank_layers)} exceed VGGT's {vggt.depth} layers")
    if fusion.bank_selection != "explicit" and fusion.geo_depth != vggt.depth:
        raise ValueError(f"fusion bank_selection={fusion.bank_selection!r} was derived for geo_depth="
                         f"{fusion.geo_depth} layers, but this VGGT has {vggt.depth}; set geo_depth={vggt.depth}")


def _check_progressive_fits(fusion: GeoAlignConfig, config: GeoAlignModelConfig, vggt: VGGTAggregator) -> None:
    """The progressive fusion's block / layer ids and widths fit Qwen's vision tower, its LLM and this VGGT."""
    vision_depth = int(config.vision_config.depth)
    text_layers = int(config.text_config.num_hidden_layers)
    checks = (("progressive_vit_blocks", fusion.progressive_vit_blocks, vision_depth, "Qwen vision tower blocks"),
              ("progressive_geo_layers", fusion.progressive_geo_layers, vggt.depth, "VGGT layers"),
              ("progressive_inject_layers", fusion.progressive_inject_layers, text_layers, "LLM decoder layers"))
    for name, ids, n, what in checks:
        bad = [i for i in ids if i >= n]
        if bad:
            raise ValueError(f"fusion {name} {list(ids)}: {bad} out of range for the {n} {what}")
    if fusion.progressive_vit_blocks and fusion.progressive_vit_hidden != int(config.vision_config.hidden_size):
        raise ValueError(f"fusion progressive_vit_hidden {fusion.progressive_vit_hidden} != Qwen vision tower width "
                         f"{int(config.vision_config.hidden_size)} (the level mergers read the ViT blocks' outputs)")
    if fusion.progressive_inject_layers and fusion.hidden_size != int(config.text_config.hidden_size):
        raise ValueError(f"fusion progressive_inject_layers needs hidden_size == the LLM width "
                         f"{int(config.text_config.hidden_size)}, got {fusion.hidden_size}")
    if int(config.vision_config.spatial_merge_size) != 2:
        raise ValueError("the progressive fusion's level mergers are 2x2; Qwen's vision tower has "
                         f"spatial_merge_size={int(config.vision_config.spatial_merge_size)}")


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
        """Context yielding a :class:`~geoalign.routing_analysis.RoutingRecorder`: every sample fused inside it (a
        forward, or a generate's prefill) appends its routing summary, plus topk_idx / alpha / the token layout with
        ``keep_tensors``. See geoalign/routing_analysis.py."""
        return self.model.record_routing(keep_tensors)

    def fuse_visual_tokens(self, q, grid_thw, samples, gather_index=None, backend=None) -> torch.Tensor:
        return self.model.fuse_visual_tokens(q, grid_thw, samples, gather_index, backend)

    def save_fusion(self, directory: str | os.PathLike) -> None:
        """Only the trained fusion: ``geoalign_config.json`` + ``fusion.safetensors`` (small, separate from the base)."""
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
        kw: dict[str, Any] = {}
        if attn_implementation is not None:
            kw["attn_implementation"] = attn_implementation
        if dtype is not None:
            kw["dtype"] = dtype
        return cls._from_config(config, **kw)

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
    def from_qwen_and_vggt(cls, qwen: str | os.PathLike, vggt: str | os.PathLike, fusion: str | os.PathLike | None = None,
                           *, vggt_config: VGGTAggregatorConfig | None = None,
                           geoalign_config: GeoAlignConfig | dict | None = None, dtype: torch.dtype | None = None,
                           device: torch.device | str | None = None, attn_implementation: str | None = None,
                           freeze_vision: bool = True):
        """Build from the base models (local files only): a Qwen2.5-VL directory, a VGGT checkpoint (file or
        directory; ``vggt_config.json`` beside it, else VGGT-1B) and a fusion directory written by
        :meth:`save_fusion` (else a fresh fusion from ``geoalign_config``: a GeoAlignConfig, or a dict of overrides of
        the paper's settings such as ``{"fusion": "gated_2d3d"}``; default: the paper's settings)."""
        qdir = os.fspath(qwen)
        if not os.path.isfile(os.path.join(qdir, "config.json")):
            raise FileNotFoundError(f"Qwen2.5-VL checkpoint directory not found or without config.json: {qdir!r} "
                                    "(only local paths are supported)")
        vpath = os.fspath(vggt)
        if not os.path.exists(vpath):
            raise FileNotFoundError(f"VGGT checkpoint not found: {vpath!r}")
        kw: dict[str, Any] = {"local_files_only": True}
        if dtype is not None:
            kw["dtype"] = dtype
        if attn_implementation is not None:
            kw["attn_implementation"] = attn_implementation
        base = Qwen2_5_VLForConditionalGeneration.from_pretrained(qdir, **kw)
        if vggt_config is None:
            cfg_file = os.path.join(vpath if os.path.isdir(vpath) else os.path.dirname(vpath), VGGT_CONFIG)
            if os.path.isfile(cfg_file):
                with open(cfg_file) as f:
                    vggt_config = VGGTAggregatorConfig(**json.load(f))
        vggt_model = VGGTAggregator.from_pretrained(vpath, vggt_config, dtype=base.dtype)
        fusion_model = load_fusion(fusion) if fusion is not None else None
        fusion_config = fusion_model.config if fusion_model is not None else geoalign_config
        if isinstance(fusion_config, dict):      # overrides of the paper's defaults, e.g. {"fusion": "gated_2d3d"}
            fusion_config = GeoAlignConfig.from_dict(
                {**default_fusion_config(base.config, vggt_model.config).to_dict(), **fusion_config})
        config = GeoAlignModelConfig.from_parts(base.config, vggt_model.config, fusion_config,
                                                freeze_vision_tower=freeze_vision)
        with torch.device("meta"):
            model = cls(config)
        # take Qwen's tensors as they are (no copy), then the VGGT and fusion modules themselves
        state = base.state_dict()
        model.load_state_dict(state, strict=False, assign=True)
        for name, buf in base.named_buffers():  # non-persistent buffers (rotary inv_freq) are not in state_dict
            if name not in state:
                module, _, attr = name.rpartition(".")
                model.get_submodule(module)._buffers[attr] = buf
        model.model.vggt = _self_initialised(vggt_model.requires_grad_(False))
        if fusion_model is None:
            fusion_model = GeoAlignFusion(config.fusion)
        model.model.fusion = _self_initialised(fusion_model.to(dtype=base.dtype))
        model.generation_config = base.generation_config
        model.tie_weights()
        if freeze_vision:
            model.model.visual.requires_grad_(False)
        leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if leftover:
            raise ValueError(f"{qdir!r} did not provide {leftover[:5]} (is it a Qwen2.5-VL checkpoint?)")
        return model.to(device) if device is not None else model

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
            return cls.from_qwen_and_vggt(qwen, vggt, geoalign, **_base_kwargs(kwargs))
        if os.path.isdir(os.fspath(path)) and is_legacy_directory(path):
            logger.warning("%s is a legacy geoalign directory; convert it once with `geoalign convert %s NEW_DIR`",
                           path, path)
            qwen_dir, vggt_dir, fusion_dir = legacy_parts(path)
            return cls.from_qwen_and_vggt(qwen or qwen_dir, vggt or vggt_dir, geoalign or fusion_dir,
                                          **_base_kwargs(kwargs))
        local_only = kwargs.setdefault("local_files_only", True)   # the hub only when asked: local_files_only=False
        if local_only and not os.path.isdir(os.fspath(path)):
            raise FileNotFoundError(f"GeoAlign model directory not found: {os.fspath(path)!r} (only local files are "
                                    "read; pass local_files_only=False to let transformers look on the hub)")
        if "subfolder" not in kwargs and "config" not in kwargs:   # else transformers finds the config itself
            _check_geoalign_directory(os.fspath(path))
        _check_weight_files(os.fspath(path))
        device = kwargs.pop("device", None)  # a single device: transformers' device_map names it
        if device is not None and kwargs.get("device_map") is None:
            kwargs["device_map"] = torch.device(device)
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(path, *args, output_loading_info=True, **kwargs)
        missing = [k for k in info.get("missing_keys", ()) if k.startswith(("model.fusion.", "model.vggt."))]
        if missing and geoalign is None:
            raise ValueError(f"{os.fspath(path)!r} lacks GeoAlign weights {sorted(missing)[:4]} (of {len(missing)}): "
                             "a model saved without its fusion / VGGT encoder would run with random ones")
        model.model.vggt.reset_buffers()  # its non-persistent buffers are not in the checkpoint
        if geoalign is not None:
            model.load_fusion(geoalign)
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


def _check_weight_files(path: str) -> None:
    """Every safetensors file of a local model directory opens (its header parses and its data covers the file): a
    file cut short by a copy, or not a safetensors file, is one ValueError naming it."""
    if not os.path.isdir(path):
        return
    from safetensors import safe_open

    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            try:
                with safe_open(os.path.join(path, name), framework="pt"):
                    pass
            except Exception as e:
                raise ValueError(f"model weights file {os.path.join(path, name)} is damaged or not a safetensors "
                                 f"file (cut short by a copy?): {e}") from None


def _check_geoalign_directory(path: str) -> None:
    """A local directory's config.json must be a GeoAlign model's (a plain Qwen2.5-VL checkpoint would load with a
    random VGGT and fusion)."""
    if not os.path.isdir(path):
        return                                   # a hub name (local_files_only=False): transformers reports
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        raise FileNotFoundError(f"{path!r} is not a GeoAlign model directory: it has no config.json (expected a "
                                "directory written by save_pretrained, `geoalign train` or `geoalign demo`)")
    try:
        with open(cfg) as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{cfg!r} is not a readable JSON object: {e}") from None
    if model_type is None:
        raise ValueError(f"{cfg!r} has no model_type: it is not a transformers model config (a GeoAlign model's "
                         f"says {GeoAlignModelConfig.model_type!r})")
    if model_type != GeoAlignModelConfig.model_type:
        raise ValueError(f"{path!r} holds a {model_type!r} checkpoint, not a GeoAlign model (config.json model_type "
                         f"{GeoAlignModelConfig.model_type!r}): it has no VGGT encoder or fusion. Build one from it "
                         f"with `--qwen {path} --vggt VGGT_PATH` on the command line, or "
                         f"from_pretrained(qwen={path!r}, vggt=VGGT_PATH) in Python")


def _with_geometry_parameters(qwen_forward) -> inspect.Signature:
    """Qwen's forward signature with GeoAlign's keyword-only geometry parameters before its ``**kwargs``."""
    sig = inspect.signature(qwen_forward)
    params = [p for p in sig.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    var_kw = [p for p in sig.parameters.values() if p.kind == inspect.Parameter.VAR_KEYWORD]
    ours = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
            for name in ("vggt_pixel_values", "gather_index", "fusion_backend", "return_routing")]
    return sig.replace(parameters=params + ours + var_kw)


def _base_kwargs(kwargs: dict) -> dict:
    """The from_pretrained keywords that from_qwen_and_vggt understands (device_map='cpu' is a device)."""
    out = {k: kwargs[k] for k in ("dtype", "attn_implementation", "vggt_config", "geoalign_config") if k in kwargs}
    if "torch_dtype" in kwargs and "dtype" not in out:
        out["dtype"] = kwargs["torch_dtype"]
    device = kwargs.get("device", kwargs.get("device_map"))
    if isinstance(device, (str, torch.device)) and device != "auto":
        out["device"] = device
    if "freeze_vision" in kwargs:
        out["freeze_vision"] = kwargs["freeze_vision"]
    return out


def forward_accepts(name: str) -> bool:
    """Whether the installed Qwen2.5-VL forward takes argument ``name`` (e.g. mm_token_type_ids)."""
    return name in inspect.signature(Qwen2_5_VLForConditionalGeneration.forward).parameters


# transformers reads forward's signature (generate's model-kwargs check, PEFT): show Qwen's parameters and ours
GeoAlignForConditionalGeneration.forward.__signature__ = _with_geometry_parameters(
    Qwen2_5_VLForConditionalGeneration.forward)
AutoConfig.register(GeoAlignModelConfig.model_type, GeoAlignModelConfig, exist_ok=True)
AutoModelForImageTextToText.register(GeoAlignModelConfig, GeoAlignForConditionalGeneration, exist_ok=True)
AutoProcessor.register(GeoAlignModelConfig, GeoAlignProcessor, exist_ok=True)

__all__ = ["GeoAlignForConditionalGeneration", "GeoAlignModel", "GeoAlignModelConfig", "default_fusion_config",
           "save_fusion", "load_fusion"]
