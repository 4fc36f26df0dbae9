"""Shared builders for the fusion parity tests: fresh random modules and inputs, never zeros or default LN params."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from geoalign import GeoAlignConfig, GeoAlignFusion
from geoalign.backends import available_backends


@dataclass(frozen=True)
class Shape:
    L: int  # visual tokens
    M: int  # bank layers
    K: int  # top-k
    G: int  # patch rows per token
    D: int = 24  # hidden_size
    Dg: int = 20  # geo_dim (D')
    H: int = 36  # projector_hidden
    R: int = 12  # router_hidden
    N: int | None = None  # rows per layer (default 2*L*G, so gather_index repeats and skips rows)

    def __str__(self) -> str:
        return f"L{self.L}-M{self.M}-K{self.K}-G{self.G}-D{self.D}-Dg{self.Dg}-H{self.H}"

    def config(self, **options) -> GeoAlignConfig:
        """options: GeoAlignConfig variant options (feature_usage, projector, fusion, ...)."""
        return GeoAlignConfig(hidden_size=self.D, geo_dim=self.Dg, bank_layers=tuple(range(self.M)), top_k=self.K,
                              group_size=self.G, projector_hidden=self.H, router_hidden=self.R, **options)


def make_fusion(shape: Shape, dtype: torch.dtype, seed: int = 0, device="cpu", **options) -> GeoAlignFusion:
    """A fusion module with every parameter freshly random (LayerNorm affine included); options: config variants."""
    torch.manual_seed(seed)
    fusion = GeoAlignFusion(shape.config(**options))
    with torch.no_grad():
        for p in fusion.parameters():
            p.copy_(torch.randn_like(p) * (1.0 / max(p.shape[-1], 1) ** 0.5) if p.dim() == 2 else torch.randn_like(p))
        for ln in fusion.layer_norms:
            ln.weight.copy_(1.0 + 0.5 * torch.randn_like(ln.weight))
            ln.bias.copy_(0.5 * torch.randn_like(ln.bias))
        # larger router logits spread so Top-K is well separated (ties are tested explicitly elsewhere)
        if hasattr(fusion, "router"):
            fusion.router.fc2.weight.mul_(4.0)
    return fusion.to(device=device, dtype=dtype)


def make_inputs(shape: Shape, dtype: torch.dtype, seed: int = 1, device="cpu"):
    """q [L, D] (requires grad), M layers [N, D'] with varied scale/offset per layer, gather_index [L, G] int64."""
    g = torch.Generator().manual_seed(seed)
    N = shape.N or 2 * shape.L * shape.G
    q = torch.randn(shape.L, shape.D, generator=g, dtype=torch.float64)
    layers = [(torch.randn(N, shape.Dg, generator=g, dtype=torch.float64) * (1 + i) + 0.3 * i)
              for i in range(shape.M)]
    gather_index = torch.randint(0, N, (shape.L, shape.G), generator=g)
    q = q.to(device=device, dtype=dtype).requires_grad_(True)
    return q, [x.to(device=device, dtype=dtype) for x in layers], gather_index.to(device)


def force_ties(fusion: GeoAlignFusion, tied: list[int]) -> None:
    """Make the router logits of the `tied` bank layers exactly equal and larger than all others:
    zero weight rows (an exact 0 dot product) plus equal biases."""
    with torch.no_grad():
        w, b = fusion.router.fc2.weight, fusion.router.fc2.bias
        b.fill_(-100.0)
        for i in tied:
            w[i].zero_()
            b[i] = 5.0


def run_backend(fusion, backend, q, layers, gather_index, grad_out, as_iterator=False):
    """Forward + backward. Returns (q_hat, Routing, q.grad, {param name: grad})."""
    fusion.zero_grad(set_to_none=True)
    q.grad = None
    src = iter(list(layers)) if as_iterator else layers
    q_hat, routing = fusion(q, src, gather_index, backend=backend, return_routing=True)
    q_hat.backward(grad_out)
    grads = {n: p.grad.detach().clone() if p.grad is not None else None for n, p in fusion.named_parameters()}
    return q_hat.detach(), routing, q.grad.detach().clone(), grads


def fast_backends(device="cpu") -> list[str]:
    return [b for b in available_backends(torch.device(device)) if b != "reference"]
