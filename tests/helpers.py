"""Shared builders and checks for the fusion tests: fresh random modules and inputs (never zeros or default LN
params), the parity shapes, the per-dtype tolerances, the relative-error check (assert_close) and the parity
assertion. Other shared test code lives by purpose in the other *_helpers.py modules: cuda_helpers (the cuda backend
without a GPU), triton_helpers (the Triton kernel tests' builders), bank_backward_helpers (the bank's backward
called alone), media_helpers, eval_helpers, train_helpers, hostile_file_helpers, generation_helpers, figure_helpers.

Tolerances (max |fast - ref| divided by max |ref| over each tensor), for torch-vs-reference parity:
  float64: 1e-12. Both paths do the same arithmetic in a different order and on different row subsets, so the
           difference is a few ulps (eps 2.2e-16) times the depth of the sums (<= G*D' = 160 terms, 4 chained GEMMs).
  float32: 5e-5. The same argument with eps 1.2e-7: ~sqrt(160) * 4 chained reductions ~ 1e-5 typical; 5e-5 leaves
           headroom for the worst tensor (dW1 sums over every routed pair) without hiding a wrong row or a dropped
           term, which shows up at O(1).
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from geoalign import GeoAlignConfig, GeoAlignFusion
from geoalign.backends import available_backends

# re-exported: tests/test_cuda_backend.py and tests/test_cuda_kernels.py import these from helpers
from cuda_helpers import EmulatedExt, run_cuda_backend  # noqa: F401

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
        options.setdefault("bank_layers", tuple(range(self.M)))
        return GeoAlignConfig(hidden_size=self.D, geo_dim=self.Dg, top_k=self.K, group_size=self.G,
                              projector_hidden=self.H, router_hidden=self.R, **options)


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


def backend_params(names) -> list:
    """pytest parameters for backend names; "triton" carries the `triton` mark (it runs Triton kernels)."""
    return [pytest.param(n, marks=pytest.mark.triton) if n == "triton" else n for n in names]


#: torch backend vs reference (see the module docstring for the argument)
TOL = {torch.float64: 1e-12, torch.float32: 5e-5}
#: Triton kernels vs the torch backend / reference, at the test_triton_*.py shapes (D' <= 40, H <= 48):
#:   fp64 1e-10  the same maths in the kernels' own block order (unit roundoff 1.1e-16, sums of <= 320 terms)
#:   fp32 2e-5   unit roundoff 6e-8; sums of <= 320 terms in different orders and a few chained ops stay < 1e-5
#:   fp16 5e-3   unit roundoff 4.9e-4: both round z, GEMM outputs, dz, dx and F_hat to fp16 but accumulate in fp32 in
#:               another order, so single values differ by 1-2 fp16 ulps (~1e-3 relative); observed <= 1e-3
#:   bf16 5e-2   unit roundoff 3.9e-3, the same argument; observed 2.2e-2 on the interpreter (bf16 operands upcast)
TRITON_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 5e-2}

SHAPES = [
    Shape(L=1, M=3, K=1, G=4),  # a single token
    Shape(L=13, M=5, K=2, G=4),  # odd L
    Shape(L=17, M=4, K=4, G=8),  # K = M, video grouping G = 8
    Shape(L=9, M=1, K=1, G=4),  # a one-layer bank
    Shape(L=37, M=12, K=2, G=4, D=28, Dg=18, H=44, R=10),  # paper's M and K, odd widths
    Shape(L=70, M=6, K=3, G=8, D=16, Dg=8, H=24, R=8, N=75),  # few rows per layer: heavy row reuse
]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (max |a - b| when b is exactly zero: then a must be (almost) exactly zero too)."""
    a, b = a.double(), b.double()
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item()
    if scale == 0.0:
        return diff
    return diff / scale


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "", *,
                 atol: float | None = None, exact: torch.Tensor | None = None) -> None:
    """``actual`` is finite (a kernel that left a poisoned entry unwritten fails here) and close to ``expected``:
      atol None:   relative error rel_err(actual, expected) <= tol;
      atol given:  max |actual - expected| <= tol * max |expected| + atol (an absolute floor for tensors that are
                   exactly zero in exact arithmetic but rounding noise in one path);
      exact:       (the reference computed in fp64) also accepted when ``actual`` is no further from ``exact`` than
                   4x ``expected`` (the low-precision reference) is, + atol: a gradient that is a cancellation of large
                   terms carries rounding noise of the terms' size in *every* fp32 implementation, the reference
                   included."""
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (unwritten / poisoned entries?)"
    if atol is None:
        err = rel_err(actual, expected)
        if err <= tol:
            return
        message = f"{what}: relative error {err:.3g} > {tol:.1g}"
    else:
        got, want = actual.double(), expected.double()
        bound = tol * want.abs().max().item() + atol
        diff = (got - want).abs().max().item()
        if diff <= bound:
            return
        message = f"{what}: max |diff| {diff:.3g} > {bound:.3g} (max |ref| {want.abs().max().item():.3g})"
    if exact is not None:
        exact = exact.double()
        own = (actual.double() - exact).abs().max().item()
        ref_own = (expected.double() - exact).abs().max().item()
        if own <= 4.0 * ref_own + (atol or 0.0):
            return
        message += f" (vs fp64: {own:.3g}, the low-precision reference's own error {ref_own:.3g})"
    raise AssertionError(message)


def assert_parity(fast, ref, tol, label, zero_grad_may_be_none: bool = False):
    """(q_hat, Routing, dq, {name: grad}) of a fast path vs the reference: identical routes, and every tensor within
    ``tol``. zero_grad_may_be_none: a parameter the fast path never used (a split projector's fc1 of a layer no
    token was routed to) may have no gradient where the reference's is exactly zero."""
    q_hat, routing, dq, grads = fast
    r_q_hat, r_routing, r_dq, r_grads = ref
    assert torch.equal(routing.topk_idx, r_routing.topk_idx), f"{label}: Top-K indices differ"
    assert routing.topk_idx.dtype == torch.int64
    assert rel_err(routing.alpha, r_routing.alpha) <= tol, f"{label}: alpha"
    assert torch.isfinite(q_hat).all()
    assert rel_err(q_hat, r_q_hat) <= tol, f"{label}: q_hat err {rel_err(q_hat, r_q_hat):.3g}"
    assert rel_err(dq, r_dq) <= tol, f"{label}: dq err {rel_err(dq, r_dq):.3g}"
    assert grads.keys() == r_grads.keys()
    for name, g in grads.items():
        r = r_grads[name]
        assert r is not None, f"{label}: the reference has no gradient for {name}"
        if g is None and zero_grad_may_be_none:
            assert not r.any(), f"{label}: {name} has no fast-path gradient but a non-zero reference one"
            continue
        assert g is not None, f"{label}: {name} has no gradient"
        assert rel_err(g, r) <= tol, f"{label}: d{name} err {rel_err(g, r):.3g}"


def spy_on(monkeypatch, owner, name: str, record) -> list:
    """Replace owner.name (a function or method) by a wrapper that appends record(*args) to the returned list, then
    calls the original; monkeypatch undoes it."""
    calls: list = []
    real = getattr(owner, name)

    def spy(*args):
        calls.append(record(*args))
        return real(*args)

    monkeypatch.setattr(owner, name, spy)
    return calls


# ----------------------------------------------------------------------------------------------- torch.compile
def assert_compiled_matches_eager(backend, fusion, q, layers, gather_index) -> None:
    """A sparse backend's custom ops under torch.compile(fullgraph, aot_eager): one graph, and the compiled forward
    and every gradient equal eager exactly (aot_eager traces through the ops' fake impls; no C compiler needed)."""
    import torch._dynamo
    import torch._dynamo.testing

    M = fusion.config.num_bank_layers
    rows = backend.bank_rows(backend.route(fusion, q).topk_idx, M)
    rows.host_offsets()  # the torch/cuda backends slice on the host: copy the offsets outside the graph

    def fused(q, layers, gather_index):
        routing = backend.route(fusion, q)
        bank = backend.open_bank(fusion, routing.alpha, gather_index, rows, range(M), fusion.projector.fc1)
        for i in range(M):
            backend.add_layer(bank, i, layers[i])
        return backend.output(fusion, q, backend.close_bank(bank)), routing.alpha

    def run(fn):
        fusion.zero_grad(set_to_none=True)
        q_leaf = q.detach().clone().requires_grad_()
        q_hat, alpha = fn(q_leaf, layers, gather_index)
        (q_hat.sum() + alpha[:, 0].sum()).backward()
        return [q_hat.detach(), alpha.detach(), q_leaf.grad] + [p.grad for p in fusion.parameters()]

    eager = run(fused)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = run(torch.compile(fused, backend=counter, fullgraph=True))
    assert counter.frame_count == 1
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------- fuzz cases
def build_fuzz_case(case):
    """The fusion and inputs of one tests/test_fuzz_parity.py example (a dict of the drawn choices): fresh random
    parameters with the drawn ties and unused layers, q / layers / gather_index in the drawn memory layouts."""
    shape, dtype, seed = case["shape"], case["dtype"], case["seed"]
    fusion = make_fusion(shape, dtype, seed=seed, layer_norm_eps=case["eps"])
    with torch.no_grad():
        w, b = fusion.router.fc2.weight, fusion.router.fc2.bias
        for i in case["tied"]:  # exactly equal logits: zero weight rows (an exact 0 dot product), equal biases
            w[i].zero_()
            b[i] = 1.5
        for i in case["unused"]:
            if i not in case["tied"]:
                w[i].zero_()
                b[i] = -1e4  # never in any token's top-K while a finite logit is left: a layer with no pairs
    g = torch.Generator().manual_seed(seed + 1)
    N = shape.N
    q = torch.randn(shape.L, shape.D, generator=g, dtype=torch.float64).to(dtype)
    if case["q_layout"] == "column-slice":
        wide = torch.randn(shape.L, shape.D + 3, generator=g, dtype=torch.float64).to(dtype)
        wide[:, 1:1 + shape.D] = q
        q = wide[:, 1:1 + shape.D]
    layers = []
    for i in range(shape.M):
        x = (torch.randn(N, shape.Dg, generator=g, dtype=torch.float64) * (1 + i) + 0.3 * i).to(dtype)
        if case["layer_layout"] == "padded-rows":
            pad = torch.zeros(N, shape.Dg + 5, dtype=dtype)
            pad[:, :shape.Dg] = x
            x = pad[:, :shape.Dg]
        elif case["layer_layout"] == "transposed-copy":
            x = x.t().contiguous().t()  # column-major: unit stride along rows, not along D'
        layers.append(x)
    gi = torch.randint(0, N, (shape.L, shape.G), generator=g)
    if case["index_layout"] == "int32":
        gi = gi.to(torch.int32)
    elif case["index_layout"] == "transposed":
        gi = gi.t().contiguous().t()
    return fusion, q.requires_grad_(True), layers, gi


def reference_in_fp64(fusion, q, layers, gi, grad_out):
    """The reference on the same (rounded) inputs and parameters, in fp64: the exact answer to within fp64."""
    import copy

    f64 = copy.deepcopy(fusion).double()
    q64 = q.detach().double().requires_grad_(True)
    return run_backend(f64, "reference", q64, [x.double() for x in layers], gi, grad_out.double())
