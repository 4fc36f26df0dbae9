"""In-LLM injection (paper Table 4, "Injection Position"): the fusion runs on the hidden states entering chosen
decoder layers instead of on the vision tower's output.

At prefill the model runs VGGT once per sample and keeps that sample's M bank layers (:meth:`InLLMInjection.keep`).
A forward pre-hook on each chosen decoder layer ``model.language_model.layers[j]`` then takes that layer's input
hidden states at the visual-token positions (``input_ids == image_token_id`` / ``video_token_id``) as the router
queries Q and replaces them by Q_hat (one fusion module shared by all chosen layers). In cached decoding steps the
hidden states have no visual positions (their length differs from the prompt's) and the hook does nothing. The kept
layers live until the next forward (checkpointed decoder layers recompute in backward); at inference they are
dropped when the call returns. This is the one place GeoAlign hooks into Qwen: transformers has no extension point
inside its decoder stack.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .model_inputs import frame_groups, split_by_sample
from .offload import weights_loaded
from .visual_fusion import stream_vggt_layers


@dataclass
class KeptGeometry:
    """Per sample the M bank layers [N_b, D'] and gather_index [L_b, G]; visual_mask [B, T] marks the visual tokens
    (sample-major, the vision tower's order)."""

    visual_mask: torch.Tensor
    samples: list[tuple[list[torch.Tensor], torch.Tensor]]
    backend: str | None

    @property
    def num_tokens(self) -> int:
        return sum(int(gi.shape[0]) for _, gi in self.samples)

    def expand(self, times: int) -> None:
        """Each sample repeated ``times`` times in place (generate's beam / returned-sequence expansion); the copies
        share their kept layers."""
        self.samples = [s for s in self.samples for _ in range(times)]
        self.visual_mask = self.visual_mask.repeat_interleave(times, dim=0)


class InLLMInjection:
    """The decoder-layer hooks of one model, and the geometry kept for them."""

    def __init__(self, model):
        """``model``: the GeoAlignModel (its current ``fusion`` and ``_bypass`` are read at call time). Held as an
        attribute, not a closure, so that ``copy.deepcopy`` of the model re-binds the copy's hooks to the copy."""
        self._model = model
        self._hooks: list = []
        self.kept: KeptGeometry | None = None

    def install(self, decoder_layers: nn.ModuleList, text_hidden: int) -> None:
        """(Re)register pre-hooks on the decoder layers named by the fusion's injection_layers (none: no hooks)."""
        for h in self._hooks:
            h.remove()
        self._hooks, self.kept = [], None
        cfg = self._model.fusion.config
        if not cfg.injection_layers:
            return
        bad = [j for j in cfg.injection_layers if j >= len(decoder_layers)]
        if bad:
            raise ValueError(f"fusion injection_layers {list(cfg.injection_layers)}: {bad} out of range for the "
                             f"LLM's {len(decoder_layers)} decoder layers")
        if cfg.hidden_size != text_hidden:
            raise ValueError(f"in-LLM injection needs fusion hidden_size == the LLM width {text_hidden}, "
                             f"got {cfg.hidden_size}")
        for j in cfg.injection_layers:
            self._hooks.append(decoder_layers[j].register_forward_pre_hook(self._hook, with_kwargs=True))

    def keep(self, kept: KeptGeometry) -> None:
        if int(kept.visual_mask.sum()) != kept.num_tokens:
            raise ValueError(f"input_ids hold {int(kept.visual_mask.sum())} visual placeholder tokens, the vision "
                             f"tower produced {kept.num_tokens}")
        self.kept = kept

    def _hook(self, module, args, kwargs):
        """hidden_states [B, T, D] at the visual positions are the queries; they are replaced by Q_hat."""
        kept = self.kept
        if kept is None or self._model._bypass:
            return None
        from_args = len(args) > 0
        h = args[0] if from_args else kwargs.get("hidden_states")
        if h is None or tuple(h.shape[:2]) != tuple(kept.visual_mask.shape):
            return None  # a cached decoding step (or text-only call): no visual tokens here
        fusion = self._model.fusion
        mask = kept.visual_mask.to(h.device)
        q = h[mask]  # [L_total, D], row-major over (sample, position) = the vision tower's order
        dtype = fusion.out_proj.weight.dtype
        out, off = [], 0
        with weights_loaded(fusion):  # offloaded by a device_map: the fusion's weights are loaded for the call
            for layers, gi in kept.samples:
                L = int(gi.shape[0])
                out.append(fusion(q[off:off + L].to(dtype), layers, gi, backend=kept.backend))
                off += L
        q_hat = torch.cat(out, dim=0) if len(out) > 1 else out[0]
        h = h.masked_scatter(mask.unsqueeze(-1).expand_as(h), q_hat.to(h.dtype))
        if from_args:
            return (h,) + tuple(args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = h
        return args, kwargs


def keep_bank_layers(model, q: torch.Tensor, grid_thw: torch.Tensor, samples, visual_mask: torch.Tensor,
                     backend: str | None) -> None:
    """In-LLM injection, at prefill: run VGGT once per distinct frames tensor and keep its M bank layers for the
    decoder hooks of ``model`` (a GeoAlignModel; q [L_total, D] the tower's output, samples its SampleGeometry
    list; samples sharing their frames, as generate's beam copies do, share the kept layers)."""
    fp = model.fusion.weight_like
    parts = split_by_sample(q, grid_thw, samples, model.group_size)
    kept: list = [None] * len(parts)
    for members in frame_groups([s for _, s, _ in parts]):
        layers: list = [None] * model.fusion.config.num_bank_layers
        for position, rows in stream_vggt_layers(model, parts[members[0]][1].images,
                                                 model.fusion.config.bank_layers, fp.dtype):
            layers[position] = rows.to(fp.device)
        for b in members:
            kept[b] = (layers, parts[b][2].to(device=fp.device, dtype=torch.int64))
    model.injection.keep(KeptGeometry(visual_mask.to(q.device), kept, backend))
