"""SparseBackend: the one protocol that :class:`geoalign.fusion.FusionStream` drives, with the shared defaults.

A forward is: ``route`` (Top-K routes from Q alone), ``bank_rows`` (the routed (token, slot) pairs grouped by bank
layer), ``new_accumulator`` (h_bar [L, H], zero, fp32/fp64), then per bank layer as it arrives ``accumulate``
(h_bar += alpha * GELU(W1 x + b1) for that layer's pairs, in place), then ``finish`` (eq. 8 and its variants).

The defaults here are plain PyTorch and exact; a backend overrides what it accelerates:

  torch   accumulate (a custom autograd.Function saving only the routed rows)
  triton  route (fused fc2 + Top-K + softmax), accumulate (gathered GEMM1 with LN in the A-load), output (GEMMs),
          fold (the W_out.W2 product)
  cuda    route (warp Top-K), bank_rows (counting sort on the device), accumulate (CUDA gather + LayerNorm)

Variants (paper Table 4) need no backend code: single / mean / dense use fixed routes through the same bank op
(:func:`geoalign.routing.route_fixed`); the split projector accumulates per layer (:meth:`accumulate_split`); FiLM and
the gated fusions apply :meth:`geoalign.GeoAlignFusion.inject` to F_hat.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from geoalign_kernels.runtime import acc_dtype

from ..routing import BankRows, Routing, bank_rows, topk_lower_index


class SparseBackend:
    """Exact sparse streaming GeoAlign. Stateless apart from the W_out.W2 fold cache: the fusion module holds the
    parameters and is passed to every call.

    fold_output: at inference (no gradient needed) use W_out.W2 folded into one [D, H] matrix (one GEMM instead of
    two; cached per weight version). With a gradient needed the unfolded path runs."""

    name = "base"

    def __init__(self, fold_output: bool = False):
        self.fold_output = fold_output
        self._fold_key = None
        self._fold = None

    # ------------------------------------------------------------------ routing
    def route(self, fusion, q: torch.Tensor) -> Routing:
        """Router MLP + Top-K (geoalign.routing's policy) + softmax over the K kept logits (== eqs. 5-6)."""
        logits = fusion.router(q)
        topk_idx = topk_lower_index(logits, fusion.config.top_k)
        alpha = torch.softmax(logits.gather(1, topk_idx).to(acc_dtype(q.dtype)), dim=-1)
        return Routing(topk_idx, alpha)

    def bank_rows(self, topk_idx: torch.Tensor, num_layers: int) -> BankRows:
        """The L*K routed pairs grouped by bank layer, tokens ascending within a layer."""
        return bank_rows(topk_idx, num_layers)

    # ------------------------------------------------------------------ the bank
    def new_accumulator(self, fusion, q: torch.Tensor) -> torch.Tensor:
        """h_bar [L, H], zero, in the accumulation dtype."""
        return torch.zeros(q.shape[0], fusion.config.projector_hidden, dtype=acc_dtype(q.dtype), device=q.device)

    def accumulate(self, fusion, h_bar, alpha, i, layer, tokens, slots, gather_index) -> torch.Tensor:
        """h_bar[t] += alpha[t, s] * GELU(W1 . concat_g LN_i(layer[gather_index[t, g]]) + b1) for bank layer i's
        pairs (t, s) (W1, b1: projector_for(i).fc1); in place, autograd-aware; returns h_bar."""
        raise NotImplementedError

    def accumulate_split(self, fusion, f_hat, alpha, i, layer, tokens, slots, gather_index) -> torch.Tensor:
        """projector="split": W2 differs per layer, so layer i's pairs go through their own [n_i, H] accumulator
        (rows renumbered 0..n_i-1) and F_hat[t] += W2_i h_i + alpha b2_i for those tokens. Returns the new F_hat."""
        n = tokens.numel()
        a = alpha[tokens, slots].unsqueeze(1)  # [n, 1], differentiable
        rows = torch.arange(n, device=tokens.device)
        h_i = torch.zeros(n, fusion.config.projector_hidden, dtype=a.dtype, device=a.device)
        h_i = self.accumulate(fusion, h_i, a, i, layer, rows, torch.zeros_like(rows), gather_index[tokens])
        fc2 = fusion.projectors[i].fc2
        dtype = fc2.weight.dtype
        contrib = F.linear(h_i.to(dtype), fc2.weight) + a.to(dtype) * fc2.bias
        return f_hat.index_add(0, tokens, contrib.to(f_hat.dtype))

    # ------------------------------------------------------------------ the output
    def finish(self, fusion, q: torch.Tensor, h_bar: torch.Tensor | None, f_hat: torch.Tensor | None):
        """Q_hat [L, D] from h_bar (shared projector) or F_hat (split projector)."""
        if fusion.config.is_paper_default_path:
            return self.output(fusion, q, h_bar)
        if h_bar is not None:
            f_hat = fusion.projector.fc2(h_bar.to(q.dtype))  # sum_k alpha = 1: b2 moves after the sum
        return fusion.inject(q, f_hat.to(q.dtype))

    def output(self, fusion, q: torch.Tensor, h_bar: torch.Tensor) -> torch.Tensor:
        """Q_hat = Q + W_out (W2 h_bar + b2) on L rows (sum_k alpha = 1 lets b2 and W2 move after the sum); with
        fold_output and no gradient needed: Q + (W_out W2) h_bar + W_out b2, one [D, H] GEMM."""
        fc2, w_out = fusion.projector.fc2, fusion.out_proj.weight
        if self._use_fold(q, h_bar, fc2.weight, fc2.bias, w_out):
            w, b = self._cached_fold(fc2.weight, fc2.bias, w_out)
            return q + F.linear(h_bar.to(q.dtype), w, b)
        return q + fusion.out_proj(fc2(h_bar.to(q.dtype)))

    def fold(self, fc2_weight, fc2_bias, out_weight) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_out W2 [D, H], W_out b2 [D]) in the parameter dtype, accumulated in fp32 (fp64)."""
        acc = acc_dtype(fc2_weight.dtype)
        w = out_weight.to(acc) @ fc2_weight.to(acc)
        b = out_weight.to(acc) @ fc2_bias.to(acc)
        return w.to(fc2_weight.dtype), b.to(fc2_weight.dtype)

    def _use_fold(self, q, h_bar, *params) -> bool:
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, h_bar) + params)
        return self.fold_output and not needs_grad

    def _cached_fold(self, *params) -> tuple[torch.Tensor, torch.Tensor]:
        """The fold of these very tensors (weak references, so a freed weight whose memory is reused never matches)
        at their current versions (in-place updates refold)."""
        current = self._fold_key is not None and all(
            ref() is t and version == t._version for (ref, version), t in zip(self._fold_key, params))
        if not current:
            self._fold = self.fold(*params)
            self._fold_key = tuple((weakref.ref(t), t._version) for t in params)
        return self._fold
