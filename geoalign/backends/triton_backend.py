"""TritonBackend: the `triton` sparse backend of geoalign.GeoAlignFusion, built from the fused kernels of
``geoalign_kernels`` (routing fc2 + Top-K + softmax; per bank layer the gather + normalise pass and GEMM1 with the
fused epilogue; the bank's grouped backward; the output GEMMs and the W_out.W2 fold). No host sync from routing to
the output: the pairs' layer offsets stay on the device.

Tape: [x_hat [L*K, G*D'], z [L*K, H]] in the parameter dtype, rows in pair order (geoalign_kernels.bank)."""
from __future__ import annotations

import torch

from geoalign_kernels.bank import bank_backward_op, bank_layer_forward_op
from geoalign_kernels.utils import alloc
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
        # under a bf16 autocast the hidden layer comes out bf16 while fc2 stays fp32: the kernel takes one dtype
        hidden = fusion.router_hidden(q).to(fc2.weight.dtype)
        topk_idx, alpha = route_op(hidden, fc2.weight, fc2.bias, fusion.config.top_k)
        return Routing(topk_idx.long(), alpha)

    def prepare_bank(self, bank) -> None:
        """The tape (x_hat and z for every pair) when backward will run, else a scratch x_hat for one layer."""
        P, L = bank.rows.tokens.numel(), bank.h_bar.shape[0]
        w1 = bank.fc1_weight
        if bank.save:
            bank.tape = [alloc((P, w1.shape[1]), w1.dtype, w1.device), alloc((P, w1.shape[0]), w1.dtype, w1.device)]
        else:
            bank.scratch = (alloc((min(L, P), w1.shape[1]), w1.dtype, w1.device), w1.new_empty((0, w1.shape[0])))

    def bank_layer(self, bank, j, layer) -> None:
        x_hat, z = bank.tape if bank.save else bank.scratch
        rows = bank.rows
        bank_layer_forward_op(bank.h_bar, bank.alpha, bank.ln_weights[j], bank.ln_biases[j], bank.fc1_weight,
                              bank.fc1_bias, layer, rows.tokens, rows.slots, rows.offsets, j, bank.gather_index,
                              bank.eps, x_hat, z, bank.save)

    @classmethod
    def bank_backward(cls, rows, alpha, ln_weights, ln_biases, fc1_weight, tape, d_h_bar, need_alpha, need_ln,
                      need_w1, need_b1):
        x_hat, z = tape
        d_alpha, d_ln_w, d_ln_b, d_w1, d_b1 = bank_backward_op(
            d_h_bar, alpha, torch.stack(ln_weights), torch.stack(ln_biases), fc1_weight, rows.tokens, rows.slots,
            rows.offsets, x_hat, z, need_ln, need_w1)
        return d_alpha, d_w1, d_b1, d_ln_w, d_ln_b

    def output(self, fusion, q: torch.Tensor, h_bar: torch.Tensor) -> torch.Tensor:
        fc2, w_out = fusion.projector.fc2, fusion.out_proj.weight
        params = (fc2.weight, fc2.bias, w_out)
        if self._use_fold(q, h_bar, *params):
            return output_folded_op(q, h_bar, *self._cached_fold(*params))
        return output(q, h_bar, *params)

    def fold(self, fc2_weight, fc2_bias, out_weight):
        return fold_output_weights(fc2_weight, fc2_bias, out_weight)
