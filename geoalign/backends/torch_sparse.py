"""The `torch` backend: exact sparse + streaming GeoAlign in plain PyTorch (CPU and GPU).

Route first (the router reads only Q), then for each bank layer as it arrives: gather only the G patch rows of the
(token, slot) pairs routed to it, normalise them (x_hat, LayerNorm without its affine), x = gamma x_hat + beta,
GEMM1 + b1 + GELU, and add alpha * result into an fp32 [L, H] accumulator h_bar. Finally F_hat = W2 h_bar + b2 and
Q_hat = Q + W_out F_hat on L rows (docs/architecture.md, section 2).

Saved for backward (the tape), per bank layer i with n_i routed pairs (sum_i n_i = L*K):
  x_hat [n_i, G, D']  the normalised gathered rows, in the parameter dtype (no LayerNorm is recomputed)
  z     [n_i, H]      GEMM1's pre-activation, in the parameter dtype (GELU and GELU' are recomputed from it)
plus the int64 token/slot lists. The layer tensor itself is not kept, so it can be freed once consumed.

The whole bank is one autograd node (geoalign.backends.base.BankFunction); its backward loops over the layers with
dW1 and db1 accumulated in fp32 (one rounding to the parameter dtype at the end). Each layer needs one GEMM, not
two (VGGT is frozen, so dx = dz W1 would only feed dgamma / dbeta):
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
    return torch.addcmul(ln_bias, x_hat, ln_weight).reshape(x_hat.shape[0], x_hat.shape[1] * x_hat.shape[2])


def layer_grads(dh, a, z, need_alpha, need_params, dtype):
    """One bank layer's pair gradients for its n pairs, from dh = dL/dh_bar at the pairs' tokens [n, H] (fp32/fp64),
    a = their alpha [n] and z [n, H] from the tape (z is bf16 under a bf16 autocast even for fp32 parameters):
    (d_alpha_pairs [n] or None, dz [n, H] in ``dtype``, the parameter dtype of the GEMM with x_hat, or None,
    db1 = sum_p dz [H] in dh's dtype or None)."""
    acc = dh.dtype
    z_acc = z.to(acc)
    d_alpha = (dh * F.gelu(z_acc)).sum(1) if need_alpha else None  # d alpha_{t,s} = <d h_bar_t, GELU(z_{t,s})>
    if not need_params:
        return d_alpha, None, None
    dz = (a.to(acc).unsqueeze(1) * dh * gelu_grad(z_acc)).to(dtype)
    return d_alpha, dz, dz.to(acc).sum(0)


class TorchBackend(SparseBackend):
    """Exact sparse streaming GeoAlign in plain PyTorch: the base protocol's routing and output; the bank's
    forward per layer and its backward as one loop over the layers.

    Tape: [x_hat_0, z_0, ..., x_hat_{M-1}, z_{M-1}] (x_hat [n_j, G, D'], z [n_j, H], parameter dtype; empty for a
    layer no pair was routed to)."""

    name = "torch"

    def normalized_rows(self, layer: torch.Tensor, gather_index: torch.Tensor, tokens: torch.Tensor, eps: float,
                        dtype: torch.dtype) -> torch.Tensor:
        """x_hat [n, G, D']: the pairs' G gathered patch rows, rounded to ``dtype`` and normalised (no affine)."""
        n, G = tokens.numel(), gather_index.shape[1]
        raw = layer[gather_index[tokens].reshape(-1)].reshape(n, G, layer.shape[-1])
        return F.layer_norm(raw.to(dtype), (raw.shape[-1],), None, None, eps)

    def bank_layer(self, bank, j, layer) -> None:
        tokens, slots = bank.rows.layer(j)
        dtype = bank.fc1_weight.dtype
        x_hat = self.normalized_rows(layer, bank.gather_index, tokens, bank.eps, dtype)
        z = F.linear(affine(x_hat, bank.ln_weights[j], bank.ln_biases[j]), bank.fc1_weight, bank.fc1_bias)
        a = bank.alpha[tokens, slots].to(bank.h_bar.dtype).unsqueeze(1)
        bank.h_bar.index_add_(0, tokens, a * F.gelu(z).to(bank.h_bar.dtype))  # tokens are distinct within a layer
        if bank.save:
            if not bank.tape:
                bank.tape = [None] * (2 * bank.num_layers)
            bank.tape[2 * j:2 * j + 2] = [x_hat, z]

    @classmethod
    def bank_backward(cls, rows, alpha, ln_weights, ln_biases, fc1_weight, tape, d_h_bar, need_alpha, need_ln,
                      need_w1, need_b1):
        """A loop over the layers, one GEMM each (M_j = dz_j^T x_hat_j), with the module docstring's epilogue done
        in as few passes over [H, G, D'] as torch allows: dW1 += gamma_j M_j in place, dgamma_j = sum W1 M_j; the
        beta terms (sum_j beta_j db1_j into dW1, dbeta_j = (sum_g W1) db1_j) are two small GEMMs after the loop."""
        acc, dtype, dev = d_h_bar.dtype, fc1_weight.dtype, d_h_bar.device
        M, Dg = len(ln_weights), ln_weights[0].shape[0]
        H = fc1_weight.shape[0]
        G = fc1_weight.shape[1] // Dg
        need_params = need_ln or need_w1 or need_b1
        w1 = fc1_weight.to(acc).reshape(H, G, Dg)
        d_alpha = torch.zeros_like(alpha) if need_alpha else None
        d_w1 = torch.zeros(H, G, Dg, dtype=acc, device=dev) if need_w1 else None
        db1 = torch.zeros(M, H, dtype=acc, device=dev)  # per layer; a layer without pairs keeps zeros (not None)
        d_gamma = torch.zeros(M, Dg, dtype=acc, device=dev) if need_ln else None
        # M_j lands in one reused buffer: a fresh [H, G*D'] result per layer costs page faults on CPU, and the
        # dgamma product is taken in place in it once dW1 has read it
        m_buf = torch.empty(H, G * Dg, dtype=acc, device=dev) if need_w1 or need_ln else None
        for j in range(M):
            x_hat, z = tape[2 * j], tape[2 * j + 1]
            if x_hat is None or x_hat.shape[0] == 0:
                continue
            tokens, slots = rows.layer(j)
            d_a, dz, db1_j = layer_grads(d_h_bar[tokens], alpha[tokens, slots], z, need_alpha, need_params,
                                          dtype)
            if need_alpha:
                d_alpha[tokens, slots] = d_a.to(alpha.dtype)
            if not need_params:
                continue
            db1[j] = db1_j
            if need_w1 or need_ln:
                n = x_hat.shape[0]
                x_flat = x_hat.reshape(n, G * Dg)
                if dz.dtype == acc:  # M_j = dz^T x_hat: the one GEMM
                    torch.mm(dz.t(), x_flat, out=m_buf)
                else:
                    m_buf.copy_(dz.t() @ x_flat)
                m = m_buf.view(H, G, Dg)
                if need_w1:
                    d_w1.addcmul_(m, ln_weights[j].to(acc))
                if need_ln:  # dgamma_j = sum_{h,g} W1 * M_j
                    d_gamma[j] = m.mul_(w1).view(H * G, Dg).sum(0)
        cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        if need_w1:
            betas = torch.stack([b.to(acc) for b in ln_biases])  # [M, D']
            d_w1 += (db1.t() @ betas).unsqueeze(1)  # sum_j db1_j beta_j^T, the same for every g
            d_w1 = d_w1.reshape(fc1_weight.shape)
        d_beta = db1 @ w1.sum(1) if need_ln else None  # [M, D']
        return (d_alpha, cast(d_w1), cast(db1.sum(0)) if need_b1 else None, cast(d_gamma), cast(d_beta))
