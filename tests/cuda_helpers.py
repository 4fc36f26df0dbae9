"""The cuda backend without a GPU: a torch emulation of the compiled extension (EmulatedExt; tests/conftest.py's
`emulated` fixture installs it) and FusionStream's protocol driven through CudaBackend (run_cuda_backend)."""
from __future__ import annotations

import torch

from geoalign.routing import bank_rows, kept_softmax_backward, topk_lower_index


class EmulatedExt:
    """A torch stand-in for the compiled module: writes the outputs the kernels write, into the given tensors."""

    requires_cuda = False
    max_bank_layers = 32

    def __init__(self):
        self.calls: list[str] = []

    def route(self, logits, k, topk_idx, alpha, stream):
        self.calls.append("route")
        idx = topk_lower_index(logits, k)
        topk_idx.copy_(idx)
        alpha.copy_(torch.softmax(logits.gather(1, idx).to(alpha.dtype), dim=-1))

    def route_backward(self, d_alpha, alpha, topk_idx, d_logits, stream):
        self.calls.append("route_backward")
        g = kept_softmax_backward(alpha, d_alpha)
        d_logits.zero_()
        d_logits.scatter_(1, topk_idx, g.to(d_logits.dtype))

    def bank_rows(self, topk_idx, num_layers, tokens, slots, counts, offsets, stream):
        self.calls.append("bank_rows")
        flat = topk_idx.reshape(-1)
        keep = (flat >= 0) & (flat < num_layers)
        rows = bank_rows(topk_idx.clamp(0, num_layers - 1), num_layers)  # only used when every id is in range
        assert bool(keep.all()), "emulation: out-of-range ids are not emulated"
        tokens.copy_(rows.tokens)
        slots.copy_(rows.slots)
        counts.copy_(torch.bincount(flat, minlength=num_layers))
        offsets.copy_(rows.offsets)

    def gather_layer_norm(self, layer, gather_index, tokens, weight, bias, eps, use_saved_stats, group_size, x,
                          mean, rstd, raw_out, stream):
        self.calls.append("gather_layer_norm_saved" if use_saved_stats else "gather_layer_norm")
        rows = layer if gather_index is None else layer[gather_index[tokens].reshape(-1)]
        acc = mean.dtype
        v = rows.to(weight.dtype).to(acc)
        if not use_saved_stats:
            var, mu = torch.var_mean(v, dim=-1, unbiased=False)
            mean.copy_(mu)
            rstd.copy_(1.0 / torch.sqrt(var + eps))
        x_hat = (v - mean[:, None]) * rstd[:, None]
        x.copy_((x_hat * weight.to(acc) + bias.to(acc)).to(x.dtype))
        if raw_out is not None:
            raw_out.copy_(rows)


def run_cuda_backend(fusion, q, layers, gather_index, grad_out, order=None):
    """FusionStream's protocol with CudaBackend (incl. its bank_rows); returns what run_backend does."""
    from geoalign.backends.cuda_backend import CudaBackend
    from geoalign.routing import route_fixed

    fusion.zero_grad(set_to_none=True)
    q.grad = None
    backend = CudaBackend()
    M = fusion.config.num_bank_layers
    routing = backend.route(fusion, q) if fusion.config.feature_usage == "dynamic" else route_fixed(fusion, q)
    rows = backend.bank_rows(routing.topk_idx, M)
    bank = backend.open_bank(fusion, routing.alpha, gather_index, rows, range(M), fusion.projector.fc1)
    for i in (order if order is not None else range(M)):
        backend.add_layer(bank, i, layers[i])
    q_hat = backend.output(fusion, q, backend.close_bank(bank))
    q_hat.backward(grad_out)
    grads = {n: p.grad.detach().clone() if p.grad is not None else None for n, p in fusion.named_parameters()}
    return q_hat.detach(), routing, q.grad.detach().clone(), grads
