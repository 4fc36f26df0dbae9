"""Top-K routing helpers shared by every backend (paper eqs. 3-6).

The Top-K policy is part of the contract, the same in every backend (reference, torch, triton, cuda):
  - the K largest logits per row, in descending order;
  - NaN ranks above every number (as torch.sort and torch.topk rank it), then +inf, ..., -inf;
  - among equal values (+inf, -inf and NaN included) the lower bank index wins;
  - so the K indices of a row are always distinct and in [0, M), whatever the logits hold;
  - alpha is the softmax over the K kept logits with torch.softmax's semantics: a kept NaN, or K kept logits that
    are all -inf (or +inf ties), make that row's alpha NaN, and the NaN reaches that token's output (only that
    token's), loudly rather than silently;
  - alpha's backward (the fast backends; the reference differentiates torch.softmax literally) is
    dS_k = alpha_k * sum_j alpha_j (d_alpha_k - d_alpha_j), which equals torch's alpha_k (d_alpha_k - sum_j alpha_j
    d_alpha_j) in exact arithmetic but does not subtract two nearly equal numbers when one slot holds alpha ~ 1:
    in fp32 torch's form loses digits there (router gradients 10-100x further from fp64 than this form).
Logits of -inf arise from a router bias of -inf (a layer switched off); NaN only from NaN parameters, since
GeoAlignFusion rejects non-finite queries.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from geoalign_kernels.runtime import acc_dtype


class Routing(NamedTuple):
    """topk_idx [L, K] int64 bank positions (descending logit, ties -> lower index); alpha [L, K] routing weights."""

    topk_idx: torch.Tensor
    alpha: torch.Tensor


class BankRows:
    """The (token, slot) pairs routed to each bank layer, grouped by layer (vLLM fused_moe's sorted-pairs layout).

    tokens   [P] int64   token id of each pair (P = L*K); layer i's pairs at offsets[i]:offsets[i+1], tokens
                         ascending within a layer
    slots    [P] int64   which of the token's K slots the pair is
    offsets  [M+1] int64 on the device: built without a device->host copy, so the Triton path never syncs;
                         host_offsets() copies them to the host once (the torch and cuda backends slice with them)
    positions [L*K] int64 or None: the position of pair (t, s) at t*K + s (the inverse of the grouping; the Triton
                         backend's row builder makes it, pair_positions() builds it on first use otherwise)
    """

    __slots__ = ("tokens", "slots", "offsets", "positions", "_host")

    def __init__(self, tokens: torch.Tensor, slots: torch.Tensor, offsets: torch.Tensor, host_offsets=None,
                 positions: torch.Tensor | None = None):
        self.tokens, self.slots, self.offsets, self.positions = tokens, slots, offsets, positions
        self._host = list(host_offsets) if host_offsets is not None else None

    @property
    def num_layers(self) -> int:
        return self.offsets.shape[0] - 1

    def host_offsets(self) -> list:
        """offsets as M+1 host ints (one device->host copy, then cached)."""
        if self._host is None:
            self._host = self.offsets.tolist()
        return self._host

    def pair_positions(self, K: int) -> torch.Tensor:
        """positions [L*K] int64: where pair (t, s) sits (at t*K + s). Built once from tokens / slots when the row
        builder did not make it (every (t, s) must be a pair: P = L*K)."""
        if self.positions is None:
            positions = torch.empty_like(self.tokens)
            positions[self.tokens * K + self.slots] = torch.arange(self.tokens.numel(), device=self.tokens.device)
            self.positions = positions
        return self.positions

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, slots) of bank layer i's pairs."""
        offsets = self.host_offsets()
        lo, hi = offsets[i], offsets[i + 1]
        return self.tokens[lo:hi], self.slots[lo:hi]


def topk_lower_index(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [L, K] int64 of the K largest logits per row, in descending order: the module's Top-K policy.

    A stable descending sort keeps equal values (NaN included) in index order and puts NaN first, which is exactly
    the policy (``torch.topk`` ranks NaN first too, but promises no order among ties).
    """
    return torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :k]


def kept_softmax_backward(alpha: torch.Tensor, d_alpha: torch.Tensor) -> torch.Tensor:
    """dS [L, K] from alpha and d alpha [L, K] (the softmax over the K kept logits): dS_k = alpha_k * sum_j alpha_j
    (d_alpha_k - d_alpha_j), the form without cancellation (module docstring)."""
    return alpha * (alpha.unsqueeze(1) * (d_alpha.unsqueeze(2) - d_alpha.unsqueeze(1))).sum(2)


class _KeptSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kept_logits: torch.Tensor) -> torch.Tensor:
        alpha = torch.softmax(kept_logits, dim=-1)
        ctx.save_for_backward(alpha)
        return alpha

    @staticmethod
    def backward(ctx, d_alpha: torch.Tensor) -> torch.Tensor:
        (alpha,) = ctx.saved_tensors
        return kept_softmax_backward(alpha, d_alpha)


def kept_softmax(kept_logits: torch.Tensor) -> torch.Tensor:
    """alpha [L, K] = torch.softmax over the K kept logits [L, K], differentiated by kept_softmax_backward."""
    return _KeptSoftmax.apply(kept_logits)


def bank_rows(topk_idx: torch.Tensor, num_layers: int) -> BankRows:
    """Group the L*K routed pairs by bank layer: a stable sort keeps tokens ascending within a layer, and
    offsets[m] = the number of pairs routed below layer m (a binary search of the sorted ids). No device->host
    copy and no data-dependent shape, so it runs inside a CUDA graph."""
    L, K = topk_idx.shape
    flat = topk_idx.reshape(-1).to(torch.int64)
    layer_of_pair, order = torch.sort(flat, stable=True)
    bounds = torch.arange(num_layers + 1, dtype=torch.int64, device=flat.device)
    offsets = torch.searchsorted(layer_of_pair, bounds)
    return BankRows(tokens=order // K, slots=order % K, offsets=offsets)


def route_fixed(fusion, q: torch.Tensor) -> Routing:
    """Routes of the non-Top-K feature usages (paper Table 4), exact and in plain torch, for the fast paths.

    single  topk_idx [L, 1] = the single layer's bank position, alpha = 1
    mean    topk_idx [L, M] = 0..M-1, alpha = 1/M
    dense   topk_idx [L, M] = 0..M-1, alpha = softmax over all M router logits (fp32; fp64 for fp64 q)
    alpha is fp32 (fp64 for fp64 q), like the Top-K routers' alpha.
    """
    cfg = fusion.config
    L, M = q.shape[0], cfg.num_bank_layers
    acc = acc_dtype(q.dtype)
    usage = cfg.feature_usage
    if usage == "single":
        pos = cfg.bank_layers.index(cfg.single_layer)
        return Routing(torch.full((L, 1), pos, dtype=torch.int64, device=q.device),
                       torch.ones(L, 1, dtype=acc, device=q.device))
    idx = torch.arange(M, device=q.device).expand(L, M).contiguous()
    if usage == "mean":
        return Routing(idx, torch.full((L, M), 1.0 / M, dtype=acc, device=q.device))
    if usage == "dense":
        logits = fusion.router(q)
        return Routing(idx, torch.softmax(logits.to(acc), dim=-1))
    raise ValueError(f"route_fixed serves feature_usage 'single', 'mean', 'dense', got {usage!r}")
