"""The `torch` backend: exact sparse + streaming GeoAlign in plain PyTorch (CPU and GPU).

Route first (the router reads only Q), then for each bank layer as it arrives: gather only the G patch rows of the
(token, slot) pairs routed to it, normalise them (x_hat, LayerNorm without its affine), x = gamma x_hat + beta,
GEMM1 + b1 + GELU, and add alpha * result into an fp32 [L, H] accumulator h_bar. Finally F_hat = W2 h_bar + b2 and
Q_hat = Q + W_out F_hat on L rows (docs/architecture.md, section 2).

Saved for backward, per bank layer i with n_i routed pairs (sum_i n_i = L*K):
  x_hat [n_i, G, D']  the normalised gathered rows, in the parameter dtype (no LayerNorm is recomputed)
  z     [n_i, H]      GEMM1's pre-activation, in the parameter dtype (GELU and GELU' are recomputed from it)
plus the int64 token/slot lists. The layer tensor itself is not kept, so it can be freed once consumed.

The backward needs one GEMM per layer, not two (VGGT is frozen, so dx = dz W1 would only feed dgamma / dbeta):
with M = dz^T x_hat [H, G, D'] and db1 = sum_p dz,
  dW1[h, g, d] = gamma_d M[h, g, d] + beta_d db1[h]
  dgamma_d     = sum_{h, g} W1[h, g, d] M[h, g, d]
  dbeta_d      = sum_{h, g} W1[h, g, d] db1[h]
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


def affine(x_hat: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor) -> torch.Tensor:
    """x = gamma x_hat + beta over the last dim, in the parameter dtype; x_hat [n, G, D'] -> x [n, G*D']."""
    return torch.addcmul(ln_bias, x_hat, ln_weight).reshape(x_hat.shape[0], -1)


class BankAccumulate(torch.autograd.Function):
    """h_bar[t] += alpha[t, s] * GELU(W1 . concat_g LN_i(R_i[gather_index[t, g]]) + b1) for the pairs (t, s) of
    one bank layer i. Updates h_bar in place (no [L, H] copy per layer) and returns it."""

    @staticmethod
    def forward(ctx, h_bar, alpha, ln_weight, ln_bias, fc1_weight, fc1_bias, layer, tokens, slots, gather_index, eps):
        ctx.mark_dirty(h_bar)
        n, G = tokens.numel(), gather_index.shape[1]
        if n == 0:
            ctx.save_for_backward(tokens, slots, alpha, ln_weight, ln_bias, fc1_weight, None, None)
            return h_bar
        raw = layer[gather_index[tokens].reshape(-1)].reshape(n, G, layer.shape[-1])  # [n, G, D']
        x_hat = F.layer_norm(raw.to(fc1_weight.dtype), (raw.shape[-1],), None, None, eps)  # normalised, no affine
        z = F.linear(affine(x_hat, ln_weight, ln_bias), fc1_weight, fc1_bias)  # [n, H]
        a = alpha[tokens, slots].to(h_bar.dtype).unsqueeze(1)
        h_bar.index_add_(0, tokens, a * F.gelu(z).to(h_bar.dtype))  # tokens are distinct within a layer
        ctx.save_for_backward(tokens, slots, alpha, ln_weight, ln_bias, fc1_weight, x_hat, z)
        return h_bar

    @staticmethod
    def backward(ctx, d_h_bar):
        tokens, slots, alpha, ln_weight, ln_bias, fc1_weight, x_hat, z = ctx.saved_tensors
        grads = routed_bank_backward(d_h_bar, alpha, tokens, slots, ln_weight, ln_bias, fc1_weight, z, x_hat,
                                     ctx.needs_input_grad)
        return (d_h_bar,) + grads + (None,) * 5


def routed_bank_backward(d_h_bar, alpha, tokens, slots, ln_weight, ln_bias, fc1_weight, z, x_hat, need):
    """The gradients of one bank layer's update h_bar[t] += alpha[t, s] * GELU(z), z = W1 (gamma x_hat + beta) + b1,
    for its pairs (t, s); shared by the torch and cuda backends.

    need: needs_input_grad of (h_bar, alpha, ln_weight, ln_bias, fc1_weight, fc1_bias, ...); z [n, H] and x_hat
    [n, G, D'] the saved pre-activation and normalised rows (None when no pair was routed to this layer).
    Returns (d_alpha, d_ln_weight, d_ln_bias, d_fc1_weight, d_fc1_bias), None where not needed: one GEMM,
    M = dz^T x_hat, and the module docstring's epilogue (no dx = dz W1, no LayerNorm recompute). No gradient goes
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
    db1 = dz.to(acc).sum(0)  # [H]
    if need[5]:
        d_b1 = db1.to(dtype)
    if need[2] or need[3] or need[4]:
        n, G, Dg = x_hat.shape
        H = dz.shape[1]
        m = (dz.t() @ x_hat.reshape(n, G * Dg)).to(acc).reshape(H, G, Dg)  # M = dz^T x_hat: the one GEMM
        gamma, beta = ln_weight.to(acc), ln_bias.to(acc)
        if need[4]:
            d_w1 = (m * gamma + beta * db1[:, None, None]).to(dtype).reshape(H, G * Dg)
        if need[2] or need[3]:
            w1 = fc1_weight.to(acc).reshape(H, G, Dg)
            d_ln_w = (w1 * m).sum((0, 1)).to(dtype) if need[2] else None
            d_ln_b = (w1.sum(1) * db1[:, None]).sum(0).to(dtype) if need[3] else None
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
