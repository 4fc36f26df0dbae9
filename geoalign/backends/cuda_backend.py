"""The `cuda` backend: hand-written CUDA kernels (csrc/, see cuda_extension.py) for the small, latency-bound parts
of the routed bank, torch for the GEMMs: the router's linears, GEMM1 (+ b1, GELU, alpha-weighted index_add into the
fp32 h_bar), the output stage (inherited from the base protocol) and every backward GEMM.

Saved for backward per bank layer (as the torch backend): the normalised gathered rows x_hat [n, G, D'] and z [n, H],
both in the parameter dtype, and the token/slot lists.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..routing import BankRows, Routing
from .base import SparseBackend
from .cuda_extension import MAX_BANK_LAYERS, ext, require_cuda
from .cuda_ops import bank_rows_cuda, cuda_gather_layer_norm, cuda_route
from .torch_sparse import affine, routed_bank_backward


# ------------------------------------------------------------------------------------------------- the bank layer
class CudaBankAccumulate(torch.autograd.Function):
    """h_bar[t] += alpha[t, s] * GELU(W1 (gamma x_hat + beta) + b1) for the pairs (t, s) of one bank layer i, with
    x_hat the CUDA gather + normalisation of their G patch rows (the gather + LayerNorm kernel with a unit affine).
    Updates h_bar in place (mark_dirty) and returns it. Saves x_hat and z; the backward is the torch backend's
    (one GEMM, M = dz^T x_hat); no gradient into the frozen layer."""

    @staticmethod
    def forward(ctx, h_bar, alpha, ln_weight, ln_bias, fc1_weight, fc1_bias, layer, tokens, slots, gather_index, eps):
        ctx.mark_dirty(h_bar)
        n, G, Dg = tokens.numel(), gather_index.shape[1], layer.shape[1]
        if n == 0:
            ctx.save_for_backward(tokens, slots, alpha, ln_weight, ln_bias, fc1_weight, None, None)
            return h_bar
        unit = torch.ones_like(ln_weight), torch.zeros_like(ln_bias)
        x_hat, _mean, _rstd, _raw = cuda_gather_layer_norm(layer, gather_index, tokens, *unit, eps, False)
        x_hat = x_hat.reshape(n, G, Dg)  # normalised rows, parameter dtype
        z = F.linear(affine(x_hat, ln_weight, ln_bias), fc1_weight, fc1_bias)  # [n, H]
        a = alpha[tokens, slots].to(h_bar.dtype).unsqueeze(1)
        h_bar.index_add_(0, tokens, a * F.gelu(z).to(h_bar.dtype))  # tokens are distinct within a layer
        if any(ctx.needs_input_grad[1:6]):
            ctx.save_for_backward(tokens, slots, alpha, ln_weight, ln_bias, fc1_weight, x_hat, z)
        else:
            ctx.save_for_backward(tokens, slots, alpha, ln_weight, ln_bias, fc1_weight, None, None)
        return h_bar

    @staticmethod
    def backward(ctx, d_h_bar):
        tokens, slots, alpha, ln_weight, ln_bias, fc1_weight, x_hat, z = ctx.saved_tensors
        grads = routed_bank_backward(d_h_bar, alpha, tokens, slots, ln_weight, ln_bias, fc1_weight, z, x_hat,
                                     ctx.needs_input_grad)
        return (d_h_bar,) + grads + (None,) * 5


# ------------------------------------------------------------------------------------------------- the backend
class CudaBackend(SparseBackend):
    """Exact sparse streaming GeoAlign with the csrc/ CUDA kernels for routing, row lists and gather + LayerNorm, torch
    for the GEMMs; the accumulator and the output stage are the base protocol's."""

    name = "cuda"

    def __init__(self, fold_output: bool = False):
        ext()  # a clear error now rather than at the first launch
        super().__init__(fold_output=fold_output)

    def route(self, fusion, q: torch.Tensor) -> Routing:
        """Router MLP in torch, then the CUDA Top-K + softmax (banks of more than 32 layers route in torch)."""
        require_cuda(("q", q))
        if fusion.config.num_bank_layers > MAX_BANK_LAYERS:
            return super().route(fusion, q)
        topk_idx, alpha = cuda_route(fusion.router(q), fusion.config.top_k)
        return Routing(topk_idx, alpha)

    def bank_rows(self, topk_idx: torch.Tensor, num_layers: int) -> BankRows:
        if num_layers > MAX_BANK_LAYERS:
            return super().bank_rows(topk_idx, num_layers)
        return bank_rows_cuda(topk_idx, num_layers)

    def accumulate(self, fusion, h_bar, alpha, i, layer, tokens, slots, gather_index) -> torch.Tensor:
        norm = fusion.layer_norms[i]
        fc1 = fusion.projector_for(i).fc1  # shared f_phi, or layer i's own with projector="split"
        return CudaBankAccumulate.apply(h_bar, alpha, norm.weight, norm.bias, fc1.weight, fc1.bias, layer,
                                        tokens, slots, gather_index, fusion.config.layer_norm_eps)
