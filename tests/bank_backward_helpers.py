"""The bank's backward called alone (TorchBackend.bank_backward) on a taped bank, and its gradients recomputed in
fp64 by autograd (tests/test_parity_options.py)."""
from __future__ import annotations

import math

import torch

from helpers import Shape, make_fusion, make_inputs

NEEDS = ("need_alpha", "need_w1", "need_b1", "need_ln")
#: bank_backward's outputs in order: (d_alpha, d_fc1_weight, d_fc1_bias, d_ln_weight [M, D'], d_ln_bias [M, D'])
BANK_GRADS = ("alpha", "fc1_weight", "fc1_bias", "ln_weight", "ln_bias")


def taped_bank(shape: Shape, dtype: torch.dtype, autocast: torch.dtype | None = None, seed: int = 0):
    """A torch-backend bank after all M layers were added and the bank completed (so ``bank.tape`` holds x_hat per
    layer and z; TorchBackend.layer_tape), every parameter requiring grad; ``autocast``: add the layers and complete
    the bank under a CPU autocast to that dtype (z comes out in it).
    Returns (bank, d_h_bar): a fresh random upstream gradient in h_bar's dtype."""
    from geoalign.backends.torch_sparse import TorchBackend

    fusion = make_fusion(shape, dtype, seed=seed)
    q, layers, gather_index = make_inputs(shape, dtype, seed=seed + 1)
    backend = TorchBackend()
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        routing = backend.route(fusion, q)
        rows = backend.bank_rows(routing.topk_idx, shape.M)
        bank = backend.open_bank(fusion, routing.alpha, gather_index, rows, range(shape.M), fusion.projector.fc1)
        for j in range(shape.M):
            backend.add_layer(bank, j, layers[j])
        with torch.no_grad():
            backend.complete_bank(bank)
    g = torch.Generator().manual_seed(seed + 3)
    return bank, torch.randn(bank.h_bar.shape, generator=g, dtype=torch.float64).to(bank.h_bar.dtype)


def call_bank_backward(bank, d_h_bar, to=lambda t: t, **need):
    """TorchBackend.bank_backward on ``bank``'s tape (every need_* True unless given); ``to`` maps each tensor
    argument (e.g. onto another device)."""
    from geoalign.backends.torch_sparse import TorchBackend
    from geoalign.routing import BankRows

    flags = {name: need.get(name, True) for name in NEEDS}
    r = bank.rows
    rows = BankRows(to(r.tokens), to(r.slots), to(r.offsets), r.host_offsets())
    return TorchBackend.bank_backward(rows, to(bank.alpha.detach()), [to(w.detach()) for w in bank.ln_weights],
                                      [to(b.detach()) for b in bank.ln_biases], to(bank.fc1_weight.detach()),
                                      [to(t) for t in bank.tape], to(d_h_bar), **flags)


def gelu_grad(z: torch.Tensor) -> torch.Tensor:
    """d/dz of the exact (erf) GELU, Phi(z) + z phi(z), written out (the backends use aten's gelu_backward)."""
    return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


def bank_backward_fp64(bank, d_h_bar, round_dz: torch.dtype | None = None):
    """The bank's gradients in fp64 from its tape, by autograd: h_bar = sum alpha GELU(z), with z the taped value
    and its derivative that of W1 (gamma x_hat + beta) + b1 (the tape's z is what GELU and GELU' see).
    round_dz: instead, the docstring formulas with dz rounded to that dtype (the backward's GEMM operand);
    then only (d_fc1_bias, d_ln_bias) are returned. Shapes and order as bank_backward's outputs."""
    from geoalign.backends.torch_sparse import TorchBackend

    f64 = lambda t: t.detach().double().requires_grad_()  # noqa: E731
    alpha, w1 = f64(bank.alpha), f64(bank.fc1_weight)
    b1 = torch.zeros(w1.shape[0], dtype=torch.float64, requires_grad=True)  # z is taped: b1's value drops out
    gammas, betas = [f64(w) for w in bank.ln_weights], [f64(b) for b in bank.ln_biases]
    dh = d_h_bar.double()
    if round_dz is not None:
        H, M, Dg = w1.shape[0], bank.num_layers, gammas[0].shape[0]
        db1 = torch.zeros(M, H, dtype=torch.float64)
        for j in range(M):
            tokens, slots = bank.rows.layer(j)
            z = TorchBackend.layer_tape(bank.tape, bank.rows, j)[1].double()
            db1[j] = (alpha[tokens, slots].unsqueeze(1) * dh[tokens] * gelu_grad(z)).to(round_dz).double().sum(0)
        return db1.sum(0).detach(), (db1 @ w1.reshape(H, -1, Dg).sum(1)).detach()
    h_bar = torch.zeros(bank.h_bar.shape, dtype=torch.float64)
    for j in range(bank.num_layers):
        tokens, slots = bank.rows.layer(j)
        x_hat, z = (t.double() for t in TorchBackend.layer_tape(bank.tape, bank.rows, j))
        x = (x_hat * gammas[j] + betas[j]).reshape(x_hat.shape[0], x_hat.shape[1] * x_hat.shape[2])
        linear = x @ w1.t() + b1
        z = linear + (z - linear).detach()  # the value of z, the gradient of the linear map
        h_bar = h_bar.index_add(0, tokens, alpha[tokens, slots].unsqueeze(1) * torch.nn.functional.gelu(z))
    grads = torch.autograd.grad(h_bar, [alpha, w1, b1, *gammas, *betas], dh)
    M = bank.num_layers
    return (*grads[:3], torch.stack(grads[3:3 + M]), torch.stack(grads[3 + M:]))
