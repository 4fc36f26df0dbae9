"""The reference backend: paper eqs. 1-8 written out literally. It is the oracle every fast path is tested against.

It normalises and projects *every* row of *every* bank layer, stacks the dense [L, M, D] bank, and applies the
dense masked softmax. Nothing here is optimised, on purpose.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..routing import Routing, route_fixed, topk_lower_index


def reference_logits(fusion, q: torch.Tensor) -> torch.Tensor:
    """Eq. 3: S = f_theta(Q), [L, M] in q's dtype."""
    return fusion.router(q)


def reference_route(fusion, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs. 3-6. Returns (topk_idx [L, K] int64, dense alpha [L, M] with exact zeros off the Top-K).

    Feature-usage variants (Table 4) take the fixed routes of geoalign.routing.route_fixed (single: one-hot on the
    single layer; mean: 1/M; dense: softmax over all M logits), spread to the dense [L, M] alpha."""
    cfg = fusion.config
    if cfg.feature_usage != "dynamic":
        topk_idx, alpha = route_fixed(fusion, q)
        dense = torch.zeros(q.shape[0], cfg.num_bank_layers, dtype=q.dtype, device=q.device)
        return topk_idx, dense.scatter(1, topk_idx, alpha.to(q.dtype))
    logits = reference_logits(fusion, q)
    topk_idx = topk_lower_index(logits, cfg.top_k)
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, topk_idx, True)
    masked = logits.masked_fill(~keep, float("-inf"))  # eq. 5
    return topk_idx, torch.softmax(masked, dim=-1)  # eq. 6


def reference_bank(fusion, layers: Sequence[torch.Tensor], gather_index: torch.Tensor) -> torch.Tensor:
    """Eqs. 1-2: B = [f_phi(Norm_i(R_i))]_i, [L, M, D]; R_i's patch rows grouped G per token by gather_index."""
    L, G = gather_index.shape
    dtype = fusion.out_proj.weight.dtype
    bank = []
    for i, (norm, raw) in enumerate(zip(fusion.layer_norms, layers)):
        normed = norm(raw.to(dtype))  # Norm_i over every D' patch row of the layer
        x = normed[gather_index.long()].reshape(L, G * normed.shape[-1])  # G patch rows -> one visual token
        proj = fusion.projector_for(i)  # shared f_phi (default) or layer i's own MLP (projector="split")
        bank.append(proj(x))
    return torch.stack(bank, dim=1)


def reference_fusion(fusion, q: torch.Tensor, layers: Sequence[torch.Tensor], gather_index: torch.Tensor):
    """Eqs. 1-8. Returns (q_hat [L, D], Routing(topk_idx [L, K] int64, alpha [L, K]))."""
    bank = reference_bank(fusion, layers, gather_index)  # [L, M, D]
    topk_idx, alpha = reference_route(fusion, q)  # [L, K], [L, M]
    f_hat = (alpha.unsqueeze(-1) * bank).sum(dim=1)  # eq. 7
    q_hat = fusion.inject(q, f_hat)  # eq. 8 (or a Table 4 variant)
    return q_hat, Routing(topk_idx, alpha.gather(1, topk_idx))


class ReferenceStream:
    """Streaming interface over the reference: it simply keeps every layer until finish()."""

    def __init__(self, fusion, q, gather_index):
        self.fusion, self.q, self.gather_index = fusion, q, gather_index
        self.layers: dict[int, torch.Tensor] = {}
        self._routing: Routing | None = None

    @property
    def routing(self) -> Routing:
        """The routes, computed on first read (finish() computes them again, inside eqs. 1-8)."""
        if self._routing is None:
            self._routing = ReferenceBackend().routes(self.fusion, self.q)
        return self._routing

    def add(self, i: int, layer: torch.Tensor) -> None:
        self.layers[i] = layer

    def finish(self):
        layers = [self.layers[i] for i in range(len(self.layers))]
        self.layers = {}
        return reference_fusion(self.fusion, self.q, layers, self.gather_index)


class ReferenceBackend:
    """The reference as a backend: the same routes / open_stream shape as a SparseBackend, computing eqs. 1-8
    literally (ReferenceStream keeps every layer until finish)."""

    name = "reference"

    def __init__(self, fold_output: bool = False):
        if fold_output:
            raise ValueError("fold_output is a fast-path option (torch, triton); the reference backend computes "
                             "eqs. 1-8 literally")

    def routes(self, fusion, q: torch.Tensor) -> Routing:
        topk_idx, alpha = reference_route(fusion, q)
        return Routing(topk_idx, alpha.gather(1, topk_idx))

    def open_stream(self, fusion, q: torch.Tensor, gather_index: torch.Tensor) -> ReferenceStream:
        return ReferenceStream(fusion, q, gather_index)
