"""TritonBackend: the `triton` sparse backend of geoalign.GeoAlignFusion, built from the fused kernels of
``geoalign_kernels`` (routing fc2 + Top-K + softmax, the gathered bank GEMM with LayerNorm in its A-load, the output
GEMMs and the W_out.W2 fold)."""
from __future__ import annotations

import torch

from geoalign_kernels.bank import bank_accumulate
from geoalign_kernels.output import fold_output_weights, output, output_folded_op
from geoalign_kernels.routing import route_op

from ..routing import Routing
from .base import SparseBackend


class TritonBackend(SparseBackend):
    """Exact sparse streaming GeoAlign with Triton kernels (router fc1 + GELU stay in torch, with their autograd)."""

    name = "triton"

    def route(self, fusion, q: torch.Tensor) -> Routing:
        """topk_idx [L, K] int64, alpha [L, K] fp32 (fp64 for fp64 parameters)."""
        fc2 = fusion.router.fc2
        topk_idx, alpha = route_op(fusion.router_hidden(q), fc2.weight, fc2.bias, fusion.config.top_k)
        return Routing(topk_idx.long(), alpha)

    def accumulate(self, fusion, h_bar, alpha, i, layer, tokens, slots, gather_index) -> torch.Tensor:
        norm = fusion.layer_norms[i]
        fc1 = fusion.projector_for(i).fc1  # shared f_phi, or layer i's own with projector="split"
        return bank_accumulate(h_bar, alpha, norm.weight, norm.bias, fc1.weight, fc1.bias, layer, tokens, slots,
                               gather_index, fusion.config.layer_norm_eps)

    def output(self, fusion, q: torch.Tensor, h_bar: torch.Tensor) -> torch.Tensor:
        fc2, w_out = fusion.projector.fc2, fusion.out_proj.weight
        params = (fc2.weight, fc2.bias, w_out)
        if self._use_fold(q, h_bar, *params):
            return output_folded_op(q, h_bar, *self._cached_fold(*params))
        return output(q, h_bar, *params)

    def fold(self, fc2_weight, fc2_bias, out_weight):
        return fold_output_weights(fc2_weight, fc2_bias, out_weight)
