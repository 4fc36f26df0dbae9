"""Builders for the Triton kernel tests (tests/test_triton_*.py): a fusion with its inputs at the interpreter's
tiny shapes, and one forward + backward of it through a backend.

Conventions of those tests:
- They run under the Triton interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1 without CUDA), so shapes
  are tiny (D' <= 40, H <= 48, D <= 40, L <= 40) but chosen to cross the interpreter's 32-wide blocks and exercise
  masking.
- Error metric: max|triton - torch| / max|torch| per tensor (helpers.assert_close: a relative error w.r.t. the
  tensor's scale, so gradients of very different magnitudes share one tolerance); tolerances: helpers.TRITON_TOL,
  argued there.
- Every buffer a kernel must fully write is allocated NaN-filled (ints -7) (geoalign_kernels.utils.POISON, the
  `poison_outputs` fixture in tests/conftest.py), so a row or column a kernel forgets to write fails the comparison.
"""
from __future__ import annotations

import torch

from geoalign import GeoAlignConfig, GeoAlignFusion

DTYPES = [torch.float32, torch.float16]


def fusion_case(dtype, L=37, D=40, Dg=37, H=48, M=4, K=2, G=4, R=24, seed=0, n_rows_extra=5):
    """A fusion with every parameter randomised (LayerNorm weights/biases included), q, M layers, gather_index.
    Unlike helpers.make_fusion + make_inputs, everything comes from one generator, in the parameter dtype."""
    gen = torch.Generator().manual_seed(seed)
    cfg = GeoAlignConfig(hidden_size=D, geo_dim=Dg, bank_layers=list(range(M)), top_k=K, group_size=G,
                         projector_hidden=H, router_hidden=R)
    fusion = GeoAlignFusion(cfg).to(dtype)
    with torch.no_grad():
        for name, p in fusion.named_parameters():
            scale = 1.0 / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.3
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype) * scale)
        for ln in fusion.layer_norms:
            ln.weight.add_(1.0)
    N = L * G + n_rows_extra
    q = torch.randn(L, D, generator=gen, dtype=torch.float64).to(dtype)
    layers = [(torch.randn(N, Dg, generator=gen, dtype=torch.float64) * 1.5 + 0.7).to(dtype) for _ in range(M)]
    gather_index = torch.randint(0, N, (L, G), generator=gen)
    return fusion, q, layers, gather_index


def run_fusion(fusion, q, layers, gather_index, backend, seed=1):
    """Forward + backward of (Q_hat * g).sum(); returns (q_hat, routing, dq, {param: grad})."""
    fusion.zero_grad(set_to_none=True)
    q = q.clone().requires_grad_()
    q_hat, routing = fusion(q, layers, gather_index, backend=backend, return_routing=True)
    g = torch.randn(q_hat.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(q.dtype)
    (q_hat * g).sum().backward()
    grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in fusion.named_parameters()}
    return q_hat.detach(), routing, q.grad, grads
