"""The `torch` backend: exact sparse + streaming GeoAlign in plain PyTorch (CPU and GPU).

Route first (the router reads only Q), then for each bank layer as it arrives: gather only the G patch rows of the
(token, slot) pairs routed to it, LayerNorm them, GEMM1 + b1 + GELU, and add alpha * result into an fp32 [L, H]
accumulator h_bar. Finally F_hat = W2 h_bar + b2 and Q_hat = Q + W_out F_hat on L rows (design.md sections 2-3).

Saved for backward, per bank layer i with n_i routed pairs (sum_i n_i = L*K):
  raw  [n_i, G, D']  the gathered patch rows, in the layer's dtype (LayerNorm is recomputed from them)
  z    [n_i, H]      GEMM1's pre-activation, in the parameter dtype (GELU and GELU' are recomputed from it)
plus the int64 token/slot lists. The layer tensor itself is not kept, so it can be freed once consumed.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..routing import Routing, topk_lower_index

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """h_bar and alpha are fp32 for half/bfloat16/float32 parameters, float64 for float64 ones."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gelu_grad(z: torch.Tensor) -> torch.Tensor:
    """d/dz of the exact (erf) GELU: Phi(z) + z * phi(z)."""
    return 0.5 * (1.0 + torch.erf(z * _INV_SQRT2)) + z * torch.exp(-0.5 * z * z) * _INV_SQRT2PI


def _layer_norm_stats(raw: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """x_hat = (raw - mean) * rstd over the last dim, in `dtype`."""
    raw = raw.to(dtype)
    var, mean = torch.var_mean(raw, dim=-1, unbiased=False, keepdim=True)
    return (raw - mean) * torch.rsqrt(var + eps)


class BankAccumulate(torch.autograd.Function):
    """h_bar[t] += alpha[t, s] * GELU(W1 . concat_g LN_i(R_i[gather_index[t, g]]) + b1) for the pairs (t, s) of
    one bank layer i. Updates h_bar in place (no [L, H] copy per layer) and returns it."""

    @staticmethod
    def forward(ctx, h_bar, alpha, ln_weight, ln_bias, fc1_weight, fc1_bias, layer, tokens, slots, gather_index, eps):
        ctx.mark_dirty(h_bar)
        dtype = fc1_weight.dtype
        n, (L, G) = tokens.numel(), gather_index.shape
        ctx.eps, ctx.G, ctx.L = eps, G, L
        if n == 0:
            ctx.save_for_backward(tokens, slots, alpha, ln_weight, ln_bias, fc1_weight, None, None)
            return h_bar
        raw = layer[gather_index[tokens].reshape(-1)].reshape(n, G, layer.shape[-1])  # [n, G, D']
        x = F.layer_norm(raw.to(dtype), (raw.shape[-1],), ln_weight, ln_bias, eps).reshape(n, -1)
        z = F.linear(x, fc1_weight, fc1_bias)  # [n, H]
        a = alpha[tokens, slots].to(h_bar.dtype).unsqueeze(1)
        h_bar.index_add_(0, tokens, a * F.gelu(z).to(h_bar.dtype))  # tokens are distinct within a layer
        ctx.save_for_backward(tokens, slots, alpha, ln_weight, ln_bias, fc1_weight, raw, z)
        return h_bar

    @staticmethod
    def backward(ctx, d_h_bar):
        tokens, slots, alpha, ln_weight, ln_bias, fc1_weight, raw, z = ctx.saved_tensors
        need = ctx.needs_input_grad
        d_alpha = d_ln_w = d_ln_b = d_w1 = d_b1 = None
        if raw is None:  # no pair was routed to this layer: zero (not None) LayerNorm grads, as the dense bank gives
            d_ln_w = torch.zeros_like(ln_weight) if need[2] else None
            d_ln_b = torch.zeros_like(ln_bias) if need[3] else None
            return d_h_bar, None, d_ln_w, d_ln_b, None, None, None, None, None, None, None
        acc = d_h_bar.dtype
        dtype = fc1_weight.dtype
        n, G = raw.shape[0], ctx.G
        dh = d_h_bar[tokens]  # [n, H]
        z_acc = z.to(acc)
        if need[1]:  # d alpha_{t,s} = <d h_bar_t, GELU(z_{t,s})>
            d_alpha = torch.zeros_like(alpha)
            d_alpha[tokens, slots] = (dh * F.gelu(z_acc)).sum(1).to(alpha.dtype)
        if not any(need[2:6]):
            return d_h_bar, d_alpha, None, None, None, None, None, None, None, None, None
        a = alpha[tokens, slots].to(acc).unsqueeze(1)
        dz = (a * dh * gelu_grad(z_acc)).to(dtype)  # [n, H]
        x_hat = _layer_norm_stats(raw, ctx.eps, acc)  # [n, G, D'] recomputed LayerNorm
        if need[4]:
            x = (x_hat * ln_weight.to(acc) + ln_bias.to(acc)).to(dtype).reshape(n, -1)
            d_w1 = dz.t() @ x
        if need[5]:
            d_b1 = dz.to(acc).sum(0).to(dtype)
        if need[2] or need[3]:
            dx = (dz @ fc1_weight).reshape(n, G, -1).to(acc)  # [n, G, D']; no gradient into the frozen layer
            d_ln_w = (dx * x_hat).sum((0, 1)).to(dtype) if need[2] else None
            d_ln_b = dx.sum((0, 1)).to(dtype) if need[3] else None
        return d_h_bar, d_alpha, d_ln_w, d_ln_b, d_w1, d_b1, None, None, None, None, None


class TorchBackend:
    """Exact sparse streaming GeoAlign in plain PyTorch. Stateless: the fusion module holds the parameters."""

    name = "torch"

    def __init__(self, fold_output: bool = False):
        self.fold_output = fold_output

    def route(self, fusion, q: torch.Tensor) -> Routing:
        """Router MLP + Top-K (ties -> lower index) + softmax over the K kept logits (== eqs. 5-6)."""
        logits = fusion.router.fc2(F.gelu(fusion.router.fc1(q)))
        topk_idx = topk_lower_index(logits, fusion.config.top_k)
        alpha = torch.softmax(logits.gather(1, topk_idx).to(accumulator_dtype(q.dtype)), dim=-1)
        return Routing(topk_idx, alpha)

    def new_accumulator(self, fusion, q: torch.Tensor) -> torch.Tensor:
        return torch.zeros(q.shape[0], fusion.config.projector_hidden, dtype=accumulator_dtype(q.dtype),
                           device=q.device)

    def accumulate(self, fusion, h_bar, alpha, i, layer, tokens, slots, gather_index) -> torch.Tensor:
        norm = fusion.layer_norms[i]
        fc1 = fusion.projector_for(i).fc1  # shared f_phi, or layer i's own with projector="split"
        return BankAccumulate.apply(h_bar, alpha, norm.weight, norm.bias, fc1.weight, fc1.bias, layer,
                                    tokens, slots, gather_index, fusion.config.layer_norm_eps)

    def output(self, fusion, q: torch.Tensor, h_bar: torch.Tensor) -> torch.Tensor:
        """Q_hat = Q + W_out (W2 h_bar + b2) on L rows (sum_k alpha = 1 lets b2 and W2 move after the sum).
        With fold_output and no gradient needed: Q + (W_out W2) h_bar + W_out b2, one [D, H] GEMM."""
        fc2, w_out = fusion.projector.fc2, fusion.out_proj.weight
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, h_bar, fc2.weight, w_out))
        if self.fold_output and not needs_grad:
            acc = accumulator_dtype(q.dtype)
            w = (w_out.to(acc) @ fc2.weight.to(acc)).to(q.dtype)
            b = (w_out.to(acc) @ fc2.bias.to(acc)).to(q.dtype)
            return q + F.linear(h_bar.to(q.dtype), w, b)
        return q + fusion.out_proj(fc2(h_bar.to(q.dtype)))
