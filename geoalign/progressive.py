"""GAP-MLLM's multi-level progressive fusion (GeoAlignConfig.progressive_*; off by default).

J levels; level j pairs Qwen ViT features V_j [L, D] with VGGT layer v_j (``progressive_geo_layers[j]``):

    F_j     = projector_j(concat_g LN_j(R_{v_j}[gather_index[l, g]]))          [L, D]   (G*D' -> H -> D, exact GELU)
    fused_j = V_j + W_out_j(sigmoid(w_j . [V_j; F_j] + b_j) * F_j)             [L, D]   (one scalar gate per token)

V_j of an intermediate level (j < J-1) is ViT block ``progressive_vit_blocks[j]``'s output, captured by a forward hook
while Qwen's tower runs, merged 2x2 by the level's own merger (Qwen2_5_VLPatchMerger's architecture, a new trainable
module, as Qwen3-VL's DeepStack) and put back in token order with argsort(window_index), as the tower does with its
final output. The last level's V is the tower's own output Q; its fused tokens replace the pre-LLM visual tokens. Each
intermediate level's fused tokens are added to the visual hidden states after decoder layer
``progressive_inject_layers[j]`` (a forward hook; prefill only: cached decoding steps have no visual tokens).

Parameter names (inside :class:`ProgressiveFusion`, the module ``GeoAlignFusion(config)`` builds for a progressive
config; it is its own class, not a GeoAlignFusion subclass, so ``isinstance(fusion, GeoAlignFusion)`` is False for it):
``levels.{j}.{layer_norm, projector.fc1, projector.fc2, gate, out_proj}`` and ``mergers.{j}.{ln_q, mlp.0, mlp.2}``
(J-1 mergers, one per intermediate level).
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from .config import GeoAlignConfig
from .layers import MLP
from .model_inputs import frame_groups, split_by_sample
from .visual_fusion import stream_vggt_layers


class ProgressiveLevel(nn.Module):
    """One level's geometry projector and token-level gated fusion (D = hidden_size, D' = geo_dim)."""

    def __init__(self, config: GeoAlignConfig):
        super().__init__()
        D, G = config.hidden_size, config.group_size
        self.layer_norm = nn.LayerNorm(config.geo_dim, eps=config.layer_norm_eps)
        self.projector = MLP(G * config.geo_dim, config.projector_hidden, D)
        self.gate = nn.Linear(2 * D, 1)
        self.out_proj = nn.Linear(D, D, bias=False)

    def geometry(self, rows: torch.Tensor, gather_index: torch.Tensor) -> torch.Tensor:
        """rows [N, D'] (one VGGT layer's patch rows of a sample), gather_index [L, G] int64 -> F [L, D]."""
        L, G = gather_index.shape
        if int(gather_index.min()) < 0 or int(gather_index.max()) >= rows.shape[0]:
            raise ValueError(f"gather_index out of range: rows must be in [0, {rows.shape[0]}), got "
                             f"[{int(gather_index.min())}, {int(gather_index.max())}]")
        grouped = self.layer_norm(rows[gather_index.reshape(-1)])          # LN(R)[gi] == LN(R[gi]), [L*G, D']
        return self.projector(grouped.reshape(L, G * rows.shape[-1]))

    def forward(self, v: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """v [L, D] visual tokens, f [L, D] geometry -> v + W_out(sigmoid(w . [v; f] + b) * f) [L, D]."""
        return v + self.out_proj(torch.sigmoid(self.gate(torch.cat([v, f], dim=-1))) * f)


def level_merger(config: GeoAlignConfig) -> nn.Module:
    """A fresh 2x2 patch merger [4*C] -> D with Qwen2.5-VL's architecture (RMSNorm over C, MLP 4C -> 4C -> D)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPatchMerger

    return Qwen2_5_VLPatchMerger(dim=config.hidden_size, context_dim=config.progressive_vit_hidden,
                                 spatial_merge_size=2)


class ProgressiveFusion(nn.Module):
    """GAP-MLLM's progressive fusion module (``GeoAlignFusion(config)`` builds it for a progressive config): the J
    levels (``levels.{j}``) and the J-1 level mergers (``mergers.{j}``); the model runs them (:func:`fuse_levels`).
    It has no routed bank: ``forward`` / ``begin`` / ``route`` raise, naming the fusion."""

    def __init__(self, config: GeoAlignConfig):
        super().__init__()
        if not config.is_progressive:
            raise ValueError("ProgressiveFusion needs a config with progressive_geo_layers set")
        self.config = config
        self.check_inputs = True           # GeoAlignFusion's attribute, kept for a uniform interface
        self.levels = nn.ModuleList(ProgressiveLevel(config) for _ in range(config.num_progressive_levels))
        self.mergers = nn.ModuleList(level_merger(config) for _ in range(config.num_progressive_levels - 1))

    @property
    def weight_like(self) -> torch.Tensor:
        """A parameter with the fusion's dtype and device (the last level's out_proj)."""
        return self.levels[-1].out_proj.weight

    def _no_bank(self, what: str):
        raise ValueError(f"GeoAlignFusion.{what}: this fusion is GAP-MLLM's progressive fusion "
                         f"(progressive_geo_layers={list(self.config.progressive_geo_layers)}), which has no "
                         "routed bank; the model runs its levels (GeoAlignForConditionalGeneration.forward)")

    def forward(self, *args, **kwargs):
        self._no_bank("forward")

    def begin(self, *args, **kwargs):
        self._no_bank("begin")

    def route(self, *args, **kwargs):
        self._no_bank("route")


@contextlib.contextmanager
def capture_block_outputs(blocks: nn.ModuleList, block_ids: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Context yielding a dict filled, while the vision tower runs inside it, with block b's output hidden states
    [seq, C] (the tower's window order) for each b in ``block_ids``. No hooks remain after the context."""
    captured: dict[int, torch.Tensor] = {}
    hooks = []
    for b in block_ids:
        def keep(module, args, output, b=b):
            captured[b] = output[0] if isinstance(output, tuple) else output
        hooks.append(blocks[b].register_forward_hook(keep))
    try:
        yield captured
    finally:
        for h in hooks:
            h.remove()


def window_index(visual: nn.Module, grid_thw: torch.Tensor) -> torch.Tensor:
    """The permutation [L_total] of merged tokens that Qwen2.5-VL's vision tower applies before its blocks
    (transformers' ``get_vision_window_index``, or the tower's ``get_window_index`` in older versions)."""
    if hasattr(visual, "get_window_index"):
        return visual.get_window_index(grid_thw)[0]
    from transformers.vision_utils import get_vision_window_index

    return get_vision_window_index(grid_thw, visual.spatial_merge_size, visual.window_size, visual.patch_size)[0]


def merged_in_token_order(merger: nn.Module, hidden: torch.Tensor, window_index: torch.Tensor) -> torch.Tensor:
    """A ViT block's output [seq, C] (window order; each 2x2 group of patches contiguous) -> merged tokens [L, D] in
    token order: merger, then ``[argsort(window_index)]``, as Qwen's tower does with its final output."""
    return merger(hidden)[torch.argsort(window_index.to(hidden.device))]


@dataclass
class KeptLevels:
    """The intermediate levels' fused tokens of one prefill: tokens[j] [L_total, D] (the vision tower's sample-major
    order) and visual_mask [B, T] marking the visual-token positions in input_ids."""

    visual_mask: torch.Tensor
    tokens: list[torch.Tensor]

    def expand(self, times: int) -> None:
        """Each sample repeated ``times`` times in place (generate's beam / returned-sequence expansion)."""
        per_sample = self.visual_mask.sum(dim=1).tolist()
        self.tokens = [torch.cat([chunk for chunk in t.split(per_sample) for _ in range(times)]) for t in self.tokens]
        self.visual_mask = self.visual_mask.repeat_interleave(times, dim=0)


class ProgressiveInjection:
    """The decoder-layer forward hooks that add the intermediate levels' fused tokens (DeepStack), and the tokens
    kept for them. Decoder layer k's output h [B, T, D] becomes h + scatter(visual_mask, fused_j)."""

    def __init__(self, model):
        """``model``: the GeoAlignModel (its current ``fusion`` and ``_bypass`` are read at call time). The model and
        the hooks (bound methods / partials, not closures) are attributes so that ``copy.deepcopy`` of the model
        re-binds the copy's hooks to the copy's own kept tokens."""
        self._model = model
        self._hooks: list = []
        self.kept: KeptLevels | None = None

    def install(self, decoder_layers: nn.ModuleList) -> None:
        """(Re)register forward hooks on the decoder layers named by progressive_inject_layers (none: no hooks).
        The ids are checked against the LLM by model_config.check_fits."""
        for h in self._hooks:
            h.remove()
        self._hooks, self.kept = [], None
        for j, k in enumerate(self._model.fusion.config.progressive_inject_layers):
            self._hooks.append(decoder_layers[k].register_forward_hook(functools.partial(self._hook, j)))

    def keep(self, kept: KeptLevels) -> None:
        n = int(kept.visual_mask.sum())
        if any(t.shape[0] != n for t in kept.tokens):
            raise ValueError(f"input_ids hold {n} visual placeholder tokens, the vision tower produced "
                             f"{kept.tokens[0].shape[0]}")
        self.kept = kept

    def _hook(self, j: int, module, args, output):
        """Level j's addition to a decoder layer's output (prefill only)."""
        kept = self.kept
        if kept is None or self._model._bypass:
            return None
        h = output[0] if isinstance(output, tuple) else output
        if tuple(h.shape[:2]) != tuple(kept.visual_mask.shape):
            return None  # a cached decoding step (or a text-only call): no visual tokens here
        mask = kept.visual_mask.to(h.device).unsqueeze(-1).expand_as(h)
        h = h + torch.zeros_like(h).masked_scatter(mask, kept.tokens[j].to(device=h.device, dtype=h.dtype))
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h


def fuse_levels(model, q: torch.Tensor, block_outputs: dict[int, torch.Tensor], grid_thw: torch.Tensor, samples,
                visual_mask: torch.Tensor) -> torch.Tensor:
    """GAP-MLLM's progressive fusion at prefill, for ``model`` (a GeoAlignModel). q [L_total, D] (the tower's
    output), block_outputs {b: [seq, C]} (the intermediate ViT blocks, window order) -> the last level's fused tokens
    [L_total, D]; the intermediate levels' fused tokens [L_total, D] are kept for the decoder hooks. Per sample one
    VGGT pass streams the J layers; level j is computed when its layer arrives and the layer is dropped then."""
    fusion, cfg = model.fusion, model.fusion.config
    fp = fusion.weight_like
    order = window_index(model.visual, grid_thw)
    views = [merged_in_token_order(merger, block_outputs[b].to(device=fp.device, dtype=fp.dtype), order)
             for merger, b in zip(fusion.mergers, cfg.progressive_vit_blocks)]
    views.append(q.to(device=fp.device, dtype=fp.dtype))
    stacked = torch.stack(views, dim=1)  # [L_total, J, D]: level j's visual tokens V_j
    del views
    parts = split_by_sample(stacked, grid_thw, samples, model.group_size)
    fused: list[list] = [[None] * len(parts) for _ in fusion.levels]  # [level][sample]
    for members in frame_groups([s for _, s, _ in parts]):  # one VGGT pass per distinct frames tensor
        for j, rows in stream_vggt_layers(model, parts[members[0]][1].images, cfg.progressive_geo_layers, fp.dtype):
            level, rows = fusion.levels[j], rows.to(fp.device)
            for b in members:
                v_b, gi = parts[b][0], parts[b][2].to(device=fp.device, dtype=torch.int64)
                fused[j][b] = level(v_b[:, j], level.geometry(rows, gi))
            del rows
    out = [torch.cat(level_parts, dim=0) if len(level_parts) > 1 else level_parts[0] for level_parts in fused]
    if len(out) > 1:
        model.progressive_injection.keep(KeptLevels(visual_mask.to(fp.device), out[:-1]))
    return out[-1]
