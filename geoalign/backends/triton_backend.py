"""TritonBackend: the `triton` sparse backend of geoalign.GeoAlignFusion, built from the fused kernels of
``geoalign_kernels`` (routing fc2 + Top-K + softmax; the pairs grouped by layer in one launch; per bank layer the
gather + normalise pass; GEMM1 with its fused epilogue; the bank's grouped backward; the output GEMMs and the
W_out.W2 fold). No host sync from routing to the output: the pairs' layer offsets stay on the device.

With a gradient (training) each streamed layer is only normalised into the tape, and GEMM1 runs once for every
layer's pairs when the bank closes (one launch, then h_bar from z): a step launches the same kernels whatever M is,
and the GEMM sees all L*K rows at once. Without a gradient (inference) each layer's GEMM1 runs as it arrives, into
h_bar, so memory stays at one layer's pairs.

Tape: [x_hat [L*K, G*D'], z [L*K, H], affine [2, M, D']] in the parameter dtype, rows in pair order
(geoalign_kernels.bank). Forward-only (``bank.scratch``): GEMM1's operand x = gamma_j x_hat + beta_j [L*K, G*D']
written by each layer's normalise pass and freed once GEMM1 has run in complete_bank (a transient the size of the
x_hat tape, not saved for backward); without a gradient, x for one layer [min(L, L*K), G*D']."""
from __future__ import annotations

import torch

from geoalign_kernels.bank import bank_backward_op, bank_layer_forward_op, bank_rows_op, bank_tape_forward_op
from geoalign_kernels.utils import alloc
from geoalign_kernels.output import fold_output_weights, output, output_folded_op
from geoalign_kernels.routing import route_op

from ..routing import BankRows, Routing
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
        return Routing(topk_idx, alpha)

    def bank_rows(self, topk_idx: torch.Tensor, num_layers: int) -> BankRows:
        """One counting-sort launch; the rows carry ``positions`` (pair (t, s) at t*K + s) for complete_bank."""
        tokens, slots, offsets, positions = bank_rows_op(topk_idx, num_layers)
        return BankRows(tokens, slots, offsets, positions=positions)

    def prepare_bank(self, bank) -> None:
        """With a gradient: the tape (x_hat, z for every pair and the stacked LayerNorm affine) and GEMM1's operand x
        for every pair (forward only); without: x for one layer (scratch, reused by each layer)."""
        P, L = bank.rows.tokens.numel(), bank.h_bar.shape[0]
        w1 = bank.fc1_weight
        Dg = bank.ln_weights[0].shape[0]
        if bank.save:
            bank.tape = [alloc((P, w1.shape[1]), w1.dtype, w1.device), alloc((P, w1.shape[0]), w1.dtype, w1.device),
                         alloc((2, bank.num_layers, Dg), w1.dtype, w1.device)]
            bank.scratch = alloc((P, w1.shape[1]), w1.dtype, w1.device)
        else:
            bank.scratch = alloc((min(L, P), w1.shape[1]), w1.dtype, w1.device)

    def bank_layer(self, bank, j, layer) -> None:
        if bank.save:
            x_hat, affine = bank.tape[0], bank.tape[2]
        else:  # (x_hat and the stacked affine are not used without a tape)
            x_hat = bank.scratch.new_empty((0, bank.scratch.shape[1]))
            affine = bank.scratch.new_empty((2, 0, bank.ln_weights[j].shape[0]))
        rows = bank.rows
        bank_layer_forward_op(bank.h_bar, bank.alpha, bank.ln_weights[j], bank.ln_biases[j], bank.fc1_weight,
                              bank.fc1_bias, layer, rows.tokens, rows.slots, rows.offsets, j, bank.gather_index,
                              bank.eps, x_hat, bank.scratch, affine, bank.save)

    def complete_bank(self, bank) -> None:
        """With a tape: GEMM1 for every layer's pairs in one launch (from x, then freed), then h_bar += sum_s alpha
        GELU(z)."""
        if not bank.save:
            return
        _x_hat, z, _affine = bank.tape
        x, bank.scratch = bank.scratch, None  # GEMM1's operand: not saved for backward
        rows = bank.rows  # (the split projector's one-layer banks build their rows without positions)
        bank_tape_forward_op(bank.h_bar, bank.alpha, bank.fc1_weight, bank.fc1_bias,
                             rows.pair_positions(bank.alpha.shape[1]), x, z)

    @classmethod
    def bank_backward(cls, rows, alpha, ln_weights, ln_biases, fc1_weight, tape, d_h_bar, need_alpha, need_ln,
                      need_w1, need_b1):
        x_hat, z, affine = tape
        d_alpha, d_ln_w, d_ln_b, d_w1, d_b1 = bank_backward_op(
            d_h_bar, alpha, affine, fc1_weight, rows.tokens, rows.slots, rows.offsets, x_hat, z, need_ln, need_w1)
        return d_alpha, d_w1, d_b1, d_ln_w, d_ln_b

    def output(self, fusion, q: torch.Tensor, h_bar: torch.Tensor) -> torch.Tensor:
        fc2, w_out = fusion.projector.fc2, fusion.out_proj.weight
        params = (fc2.weight, fc2.bias, w_out)
        if self._use_fold(q, h_bar, *params):
            return output_folded_op(q, h_bar, *self._cached_fold(*params))
        return output(q, h_bar, *params)

    def fold(self, fc2_weight, fc2_bias, out_weight):
        return fold_output_weights(fc2_weight, fc2_bias, out_weight)
