"""The `torch` backend: exact sparse + streaming GeoAlign in plain PyTorch (CPU and GPU).

Route first (the router reads only Q), then for each bank layer as it arrives: gather only the G patch rows of the
(token, slot) pairs routed to it, LayerNorm them, GEMM1 + b1 + GELU, and add alpha * result into an fp32 [L, H]
accumulator h_bar. Finally F_hat = W2 h_bar + b2 and Q_hat = Q + W_out F_hat on L rows (docs/architecture.md, section 2).

Saved for backward, per bank layer i with n_i routed pairs (sum_i n_i = L*K):
  raw  [n_i, G, D']  the gathered patch rows, in the layer's dtype (LayerNorm is recomputed from them)
  z    [n_i, H]      GEMM1's pre-activation, in the parameter dtype (GELU and GELU' are recomputed from it)
plus the int64 token/slot lists. The layer tensor itself is not kept, so it can be freed once consumed.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import SparseBackend

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)


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
        acc = d_h_bar.dtype
        x_hat = []  # [n, G, D'] recomputed LayerNorm, computed at most once (dW1 and dgamma both need it)

        def normalised():
            if not x_hat:
                x_hat.append(_layer_norm_stats(raw, ctx.eps, acc))
            return x_hat[0]

        def layer_input():  # GEMM1's input x [n, G*D'] in the parameter dtype
            x = normalised() * ln_weight.to(acc) + ln_bias.to(acc)
            return x.to(fc1_weight.dtype).reshape(raw.shape[0], -1)

        def layer_norm_grads(dx):  # dx [n, G*D'] (parameter dtype) -> (dgamma, dbeta) in the accumulation dtype
            dx = dx.reshape(raw.shape).to(acc)
            return (dx * normalised()).sum((0, 1)), dx.sum((0, 1))

        grads = routed_bank_backward(d_h_bar, alpha, tokens, slots, ln_weight, ln_bias, fc1_weight, z,
                                     ctx.needs_input_grad, layer_input, layer_norm_grads)
        return (d_h_bar,) + grads + (None,) * 5


def routed_bank_backward(d_h_bar, alpha, tokens, slots, ln_weight, ln_bias, fc1_weight, z, need, layer_input,
                         layer_norm_grads):
    """The gradients of one bank layer's update h_bar[t] += alpha[t, s] * GELU(z), z = W1 x + b1, for its pairs
    (t, s); shared by the torch and cuda backends, which differ only in how they recompute x and reduce dgamma/dbeta.

    need: needs_input_grad of (h_bar, alpha, ln_weight, ln_bias, fc1_weight, fc1_bias, ...); z [n, H] the saved
    pre-activation (None when no pair was routed to this layer); layer_input() -> x [n, G*D'] (parameter dtype);
    layer_norm_grads(dx [n, G*D']) -> (dgamma, dbeta) [D'] (accumulation dtype).
    Returns (d_alpha, d_ln_weight, d_ln_bias, d_fc1_weight, d_fc1_bias), None where not needed. No gradient goes
    into the frozen layer."""
    if z is None:  # no pair routed to this layer: zero (not None) LayerNorm grads, as the dense bank gives
        return (None, torch.zeros_like(ln_weight) if need[2] else None,
                torch.zeros_like(ln_bias) if need[3] else None, None, None)
    d_alpha = d_ln_w = d_ln_b = d_w1 = d_b1 = None
    acc, dtype = d_h_bar.dtype, fc1_weight.dtype
    dh = d_h_bar[tokens]  # [n, H]
    z_acc = z.to(acc)
    if need[1]:  # d alpha_{t,s} = <d h_bar_t, GELU(z_{t,s})>
        d_alpha = torch.zeros_like(alpha)
        d_alpha[tokens, slots] = (dh * F.gelu(z_acc)).sum(1).to(alpha.dtype)
    if not any(need[2:6]):
        return d_alpha, None, None, None, None
    a = alpha[tokens, slots].to(acc).unsqueeze(1)
    dz = (a * dh * gelu_grad(z_acc)).to(dtype)  # [n, H]
    if need[4]:
        d_w1 = dz.t() @ layer_input()
    if need[5]:
        d_b1 = dz.to(acc).sum(0).to(dtype)
    if need[2] or need[3]:
        d_gamma, d_beta = layer_norm_grads(dz @ fc1_weight)
        d_ln_w = d_gamma.to(dtype) if need[2] else None
        d_ln_b = d_beta.to(dtype) if need[3] else None
    return d_alpha, d_ln_w, d_ln_b, d_w1, d_b1


class TorchBackend(SparseBackend):
    """Exact sparse streaming GeoAlign in plain PyTorch: the base protocol's routing and output, and
    :class:`BankAccumulate` for the bank."""

    name = "torch"

    def accumulate(self, fusion, h_bar, alpha, i, layer, tokens, slots, gather_index) -> torch.Tensor:
        norm = fusion.layer_norms[i]
        fc1 = fusion.projector_for(i).fc1  # shared f_phi, or layer i's own with projector="split"
        return BankAccumulate.apply(h_bar, alpha, norm.weight, norm.bias, fc1.weight, fc1.bias, layer,
                                    tokens, slots, gather_index, fusion.config.layer_norm_eps)
