"""The `torch` backend: exact sparse + streaming GeoAlign in plain PyTorch (CPU and GPU).

Route first (the router reads only Q), then for each bank layer as it arrives: gather only the G patch rows of the
(token, slot) pairs routed to it, normalise them (x_hat, LayerNorm without its affine), x = gamma x_hat + beta,
GEMM1 + b1 + GELU, and add alpha * result into an fp32 [L, H] accumulator h_bar. Finally F_hat = W2 h_bar + b2 and
Q_hat = Q + W_out F_hat on L rows (docs/architecture.md, section 2).

With a gradient (training) a streamed layer is only normalised: x goes into one [L*K, G*D'] GEMM operand in pair
order, and GEMM1 runs once over every layer's pairs when the bank closes (one large GEMM instead of M small ones),
then h_bar[t] += sum_s alpha[t, s] GELU(z[pair (t, s)]), the K slots gathered per token (deterministic on GPU too: no
index_add with repeated rows). Without a gradient (inference) each layer's GEMM1 runs as it arrives, so memory stays
at one layer's pairs.

Saved for backward (the tape): [x_hat_0, ..., x_hat_{M-1}, z] with
  x_hat_j [n_j, G, D']  layer j's normalised gathered rows, in the parameter dtype (no LayerNorm is recomputed)
  z       [L*K, H]      GEMM1's pre-activations of every pair, in pair order (layer j's at offsets[j]:offsets[j+1]),
                        in the GEMM's dtype (GELU and GELU' are recomputed from it)
plus the int64 token/slot lists. The layer tensor itself is not kept, so it can be freed once consumed.

The whole bank is one autograd node (geoalign.backends.base.BankFunction); its backward takes dz for every pair at
once, then loops over the layers with dW1 and db1 accumulated in fp32 (one rounding to the parameter dtype at the
end). Each layer needs one GEMM, not two (VGGT is frozen, so dx = dz W1 would only feed dgamma / dbeta):
with M = dz^T x_hat [H, G, D'] and db1 = sum_p dz,
  dW1[h, g, d] = gamma_d M[h, g, d] + beta_d db1[h]
  dgamma_d     = sum_{h, g} W1[h, g, d] M[h, g, d]
  dbeta_d      = sum_{h, g} W1[h, g, d] db1[h]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import SparseBackend

def affine(x_hat: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor) -> torch.Tensor:
    """x = gamma x_hat + beta over the last dim, in the parameter dtype; x_hat [n, G, D'] -> x [n, G*D']."""
    return torch.addcmul(ln_bias, x_hat, ln_weight).reshape(x_hat.shape[0], x_hat.shape[1] * x_hat.shape[2])


def pair_grads(dh, a, z, need_alpha, need_params, dtype):
    """The gradients of n pairs, from dh = dL/dh_bar at the pairs' tokens [n, H] (fp32/fp64), a = their alpha [n]
    and z [n, H] from the tape (z is bf16 under a bf16 autocast even for fp32 parameters):
    (d_alpha_pairs [n] or None, dz [n, H] in ``dtype``, the parameter dtype of the GEMM with x_hat, or None)."""
    acc = dh.dtype
    z_acc = z.to(acc)
    d_alpha = (dh * F.gelu(z_acc)).sum(1) if need_alpha else None  # d alpha_{t,s} = <d h_bar_t, GELU(z_{t,s})>
    if not need_params:
        return d_alpha, None
    # dz = alpha dh GELU'(z) by aten's fused gelu_backward (exact erf GELU): one pass over [n, H], not eight
    return d_alpha, torch.ops.aten.gelu_backward(a.to(acc).unsqueeze(1) * dh, z_acc).to(dtype)


class TorchBackend(SparseBackend):
    """Exact sparse streaming GeoAlign in plain PyTorch: the base protocol's routing and output; the bank's
    forward per layer (with a gradient: GEMM1 once for every layer in ``complete_bank``) and its backward as one
    loop over the layers.

    Tape: [x_hat_0, ..., x_hat_{M-1}, z] (x_hat_j [n_j, G, D'] parameter dtype, z [L*K, H] in pair order);
    :meth:`layer_tape` gives layer j's (x_hat_j, z_j)."""

    name = "torch"

    def normalized_rows(self, layer: torch.Tensor, gather_index: torch.Tensor, tokens: torch.Tensor, eps: float,
                        dtype: torch.dtype) -> torch.Tensor:
        """x_hat [n, G, D']: the pairs' G gathered patch rows, rounded to ``dtype`` and normalised (no affine)."""
        n, G = tokens.numel(), gather_index.shape[1]
        raw = layer[gather_index[tokens].reshape(-1)].reshape(n, G, layer.shape[-1])
        return F.layer_norm(raw.to(dtype), (raw.shape[-1],), None, None, eps)

    @staticmethod
    def layer_tape(tape: list, rows, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_hat_j [n_j, G, D'], z_j [n_j, H]) of bank layer j from the tape."""
        lo, hi = rows.host_offsets()[j:j + 2]
        return tape[j], tape[-1][lo:hi]

    def prepare_bank(self, bank) -> None:
        """With a gradient: the tape's per-layer slots and GEMM1's operand [L*K, G*D'] for every pair."""
        if bank.save:
            w1 = bank.fc1_weight
            bank.tape = [None] * bank.num_layers + [None]
            bank.scratch = torch.empty(bank.rows.tokens.numel(), w1.shape[1], dtype=w1.dtype, device=w1.device)

    def bank_layer(self, bank, j, layer) -> None:
        tokens, slots = bank.rows.layer(j)
        dtype = bank.fc1_weight.dtype
        x_hat = self.normalized_rows(layer, bank.gather_index, tokens, bank.eps, dtype)
        if bank.save:  # x into the operand's rows of layer j; GEMM1 waits for complete_bank
            lo, hi = bank.rows.host_offsets()[j:j + 2]
            torch.addcmul(bank.ln_biases[j], x_hat, bank.ln_weights[j], out=bank.scratch[lo:hi].view(x_hat.shape))
            bank.tape[j] = x_hat
            return
        z = F.linear(affine(x_hat, bank.ln_weights[j], bank.ln_biases[j]), bank.fc1_weight, bank.fc1_bias)
        a = bank.alpha[tokens, slots].to(bank.h_bar.dtype).unsqueeze(1)
        bank.h_bar.index_add_(0, tokens, a * F.gelu(z).to(bank.h_bar.dtype))  # tokens are distinct within a layer

    def complete_bank(self, bank) -> None:
        """With a gradient: z = x W1^T + b1 for every pair (one GEMM), then h_bar[t] += sum_s alpha[t, s] GELU(z)."""
        if not bank.save:
            return
        operand, bank.scratch = bank.scratch, None
        z = F.linear(operand, bank.fc1_weight, bank.fc1_bias)
        del operand
        bank.tape[-1] = z
        L, K = bank.alpha.shape
        rows = bank.rows
        acc = bank.h_bar.dtype
        per_pair = F.gelu(z).to(acc)[rows.pair_positions(K)].view(L, K, z.shape[1])  # [L, K, H], slot order
        bank.h_bar.add_((bank.alpha.to(acc).unsqueeze(2) * per_pair).sum(1))

    @classmethod
    def bank_backward(cls, rows, alpha, ln_weights, ln_biases, fc1_weight, tape, d_h_bar, need_alpha, need_ln,
                      need_w1, need_b1):
        """dz of every pair at once, then a loop over the layers, one GEMM each (M_j = dz_j^T x_hat_j), with the
        module docstring's epilogue done in as few passes over [H, G, D'] as torch allows: dW1 starts as the beta
        terms sum_j db1_j beta_j^T (a small GEMM), += gamma_j M_j in place, dgamma_j = sum W1 M_j (in place in M_j's
        buffer); dbeta_j = (sum_g W1) db1_j is one small GEMM after the loop."""
        acc, dtype, dev = d_h_bar.dtype, fc1_weight.dtype, d_h_bar.device
        M, Dg = len(ln_weights), ln_weights[0].shape[0]
        H = fc1_weight.shape[0]
        G = fc1_weight.shape[1] // Dg
        need_params = need_ln or need_w1 or need_b1
        tokens, slots = rows.tokens, rows.slots
        d_a, dz = pair_grads(d_h_bar[tokens], alpha[tokens, slots], tape[-1], need_alpha, need_params, dtype)
        d_alpha = None
        if need_alpha:  # (every (t, s) is one pair when the pairs are a routing's L*K: then nothing to zero)
            d_alpha = (torch.empty_like if tokens.numel() == alpha.numel() else torch.zeros_like)(alpha)
            d_alpha[tokens, slots] = d_a.to(alpha.dtype)
        if not need_params:
            return d_alpha, None, None, None, None
        w1 = fc1_weight.to(acc).reshape(H, G, Dg)
        offsets = rows.host_offsets()
        db1 = torch.zeros(M, H, dtype=acc, device=dev)  # per layer; a layer without pairs keeps zeros
        for j in range(M):
            if offsets[j + 1] > offsets[j]:
                db1[j] = dz[offsets[j]:offsets[j + 1]].to(acc).sum(0)
        d_w1 = None
        if need_w1:  # starts as the beta terms, sum_j db1_j beta_j^T (the same for every g): one pass, no zeros
            betas = torch.stack([b.to(acc) for b in ln_biases])  # [M, D']
            d_w1 = (db1.t() @ betas).unsqueeze(1).expand(H, G, Dg).contiguous()
        d_gamma = torch.zeros(M, Dg, dtype=acc, device=dev) if need_ln else None
        # M_j lands in one reused buffer: a fresh [H, G*D'] result per layer costs page faults on CPU, and the
        # dgamma product is taken in place in it once dW1 has read it
        m_buf = torch.empty(H, G * Dg, dtype=acc, device=dev) if need_w1 or need_ln else None
        for j in range(M if need_w1 or need_ln else 0):
            lo, hi = offsets[j], offsets[j + 1]
            if hi == lo:
                continue
            dz_j = dz[lo:hi]
            x_flat = tape[j].reshape(hi - lo, G * Dg)
            if dz_j.dtype == acc:  # M_j = dz^T x_hat: the one GEMM
                torch.mm(dz_j.t(), x_flat, out=m_buf)
            else:
                m_buf.copy_(dz_j.t() @ x_flat)
            m = m_buf.view(H, G, Dg)
            if need_w1:
                d_w1.addcmul_(m, ln_weights[j].to(acc))
            if need_ln:  # dgamma_j = sum_{h,g} W1 * M_j
                d_gamma[j] = m.mul_(w1).view(H * G, Dg).sum(0)
        cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        if need_w1:
            d_w1 = d_w1.reshape(fc1_weight.shape)
        d_beta = db1 @ w1.sum(1) if need_ln else None  # [M, D']
        return (d_alpha, cast(d_w1), cast(db1.sum(0)) if need_b1 else None, cast(d_gamma), cast(d_beta))
