"""Parity of the Triton backend (package geoalign_kernels) with the torch sparse backend and the dense reference.

Runs under the Triton interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1 without CUDA), so shapes are tiny
(D' <= 40, H <= 48, D <= 40, L <= 40) but chosen to cross the interpreter's 32-wide blocks and exercise masking.

Error metric: max|triton - torch| / max|torch| per tensor (a relative error w.r.t. the tensor's scale, so gradients of
very different magnitudes share one tolerance); tolerances: helpers.TRITON_TOL, argued there.
Routing indices must match exactly (the kernel rounds logits to the parameter dtype as nn.Linear does).
Every buffer a kernel must fully write is allocated NaN-filled (ints -7) here (geoalign_kernels.utils.POISON), so a
row or column a kernel forgets to write fails the comparison.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.triton

import geoalign_kernels.utils as kutils  # noqa: E402
import helpers  # noqa: E402
from helpers import TRITON_TOL, rel_err  # noqa: E402
from geoalign import GeoAlignConfig, GeoAlignFusion  # noqa: E402
from geoalign.backends.base import Bank  # noqa: E402
from geoalign.backends.torch_sparse import TorchBackend  # noqa: E402
from geoalign.routing import bank_rows, topk_lower_index  # noqa: E402
from geoalign_kernels import configs  # noqa: E402
from geoalign.backends.triton_backend import TritonBackend  # noqa: E402
from geoalign_kernels.output import fold_output_weights, output as triton_output, output_folded_op  # noqa: E402
from geoalign_kernels.routing import route_op  # noqa: E402

DTYPES = [torch.float32, torch.float16]


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(kutils, "POISON", True)
    yield


def assert_close(actual, expected, dtype, what=""):
    helpers.assert_close(actual, expected, TRITON_TOL[dtype], what)


def make_fusion(dtype, L=37, D=40, Dg=37, H=48, M=4, K=2, G=4, R=24, seed=0, n_rows_extra=5):
    """A fusion with every parameter randomised (LayerNorm weights/biases included), q, M layers, gather_index."""
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


def check_fusion_parity(fusion, q, layers, gather_index, dtype, zero_grads=()):
    """zero_grads: parameter names whose gradient is mathematically 0 here (both sides are rounding noise: checked
    against an absolute bound relative to the scale of dq)."""
    ref = run_fusion(fusion, q, layers, gather_index, "torch")
    out = run_fusion(fusion, q, layers, gather_index, "triton")
    assert out[1].topk_idx.dtype == torch.int64
    assert torch.equal(out[1].topk_idx, ref[1].topk_idx)
    assert out[1].alpha.dtype == ref[1].alpha.dtype
    assert_close(out[1].alpha, ref[1].alpha, dtype, "alpha")
    assert_close(out[0], ref[0], dtype, "q_hat")
    assert_close(out[2], ref[2], dtype, "dq")
    scale = ref[2].abs().max().item()
    for name in ref[3]:
        if name in zero_grads:
            for grads in (out[3], ref[3]):
                assert grads[name].abs().max().item() <= TRITON_TOL[dtype] * scale, name
        else:
            assert_close(out[3][name], ref[3][name], dtype, f"grad {name}")
    return ref, out


# ------------------------------------------------------------------------------------------------ end to end
SHAPES = {
    # odd L and D' crossing the 32-wide blocks, H=48 crosses too
    "odd": dict(L=37, D=40, Dg=37, H=48, M=4, K=2, G=4),
    # L=1, K=1, G=8 (video path)
    "L1_K1_G8": dict(L=1, D=24, Dg=20, H=40, M=3, K=1, G=8),
    # K = M: every token uses every layer; 39 pairs per layer cross the 32-row pair block
    "K_eq_M": dict(L=39, D=24, Dg=33, H=24, M=2, K=2, G=4),
    # a single bank layer
    "M1": dict(L=5, D=16, Dg=16, H=16, M=1, K=1, G=4),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_fusion_parity(shape, dtype):
    fusion, q, layers, gather_index = make_fusion(dtype, **SHAPES[shape], seed=list(SHAPES).index(shape))
    check_fusion_parity(fusion, q, layers, gather_index, dtype)


def test_fusion_parity_fp64_matches_reference():
    """fp64 against the dense reference (the oracle), forward and every gradient."""
    dtype = torch.float64
    fusion, q, layers, gather_index = make_fusion(dtype, L=11, D=24, Dg=19, H=24, M=3, K=2, G=4, seed=3)
    ref = run_fusion(fusion, q, layers, gather_index, "reference")
    out = run_fusion(fusion, q, layers, gather_index, "triton")
    assert torch.equal(out[1].topk_idx, ref[1].topk_idx)
    assert_close(out[1].alpha, ref[1].alpha, dtype, "alpha")
    assert_close(out[0], ref[0], dtype, "q_hat")
    assert_close(out[2], ref[2], dtype, "dq")
    for name in ref[3]:
        assert_close(out[3][name], ref[3][name], dtype, f"grad {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fusion_forced_ties_and_empty_layers(dtype):
    """All router logits equal: lower index wins, so layers >= K get no routed pairs (their LN grads are zero)."""
    fusion, q, layers, gather_index = make_fusion(dtype, L=12, D=24, Dg=20, H=24, M=4, K=2, G=4, seed=5)
    with torch.no_grad():
        fusion.router.fc2.weight.copy_(fusion.router.fc2.weight[:1].expand_as(fusion.router.fc2.weight))
        fusion.router.fc2.bias.fill_(0.25)
    # identical router rows: d_hid = (sum_m dS_m) * V2[0] = 0, so router.fc1's gradient is exactly 0
    ref, out = check_fusion_parity(fusion, q, layers, gather_index, dtype,
                                   zero_grads=("router.fc1.weight", "router.fc1.bias"))
    assert torch.equal(out[1].topk_idx, torch.arange(2).expand(12, 2))
    for i in (2, 3):
        assert torch.count_nonzero(out[3][f"layer_norms.{i}.weight"]) == 0
        assert torch.count_nonzero(out[3][f"layer_norms.{i}.bias"]) == 0


def test_fusion_parity_bf16_interpreter():
    """bf16 parameters and layers (on CPU the kernels upcast bf16 dot operands to fp32; see utils.dot_dtype)."""
    dtype = torch.bfloat16
    fusion, q, layers, gather_index = make_fusion(dtype, L=21, D=24, Dg=20, H=40, M=3, K=2, G=4, seed=7)
    check_fusion_parity(fusion, q, layers, gather_index, dtype)


def test_small_blocks_cross_pair_boundary():
    """Force 16-wide blocks everywhere (pairs, H, D', router rows) at the 'odd' shape."""
    configs.OVERRIDE.update(BLOCK_SIZE_M=16, BLOCK_SIZE_N=16, BLOCK_SIZE_K=16)
    try:
        fusion, q, layers, gather_index = make_fusion(torch.float32, **SHAPES["odd"], seed=11)
        check_fusion_parity(fusion, q, layers, gather_index, torch.float32)
    finally:
        configs.OVERRIDE.clear()


def test_streaming_any_order_no_grad():
    """Streaming under no_grad (nothing saved), layers added in reverse order: same Q_hat as the torch backend."""
    dtype = torch.float32
    fusion, q, layers, gather_index = make_fusion(dtype, L=21, D=24, Dg=20, H=40, M=3, K=2, G=4, seed=7)
    with torch.no_grad():
        expected = fusion(q, layers, gather_index, backend="torch")
        stream = fusion.begin(q, gather_index, backend="triton")
        for i in reversed(range(3)):
            stream.add(i, layers[i])
        q_hat, _ = stream.finish()
    assert_close(q_hat, expected, dtype, "q_hat")


# ------------------------------------------------------------------------------------------------ routing kernel
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("L,M,K", [(37, 5, 2), (1, 3, 1), (20, 4, 4), (7, 1, 1), (40, 12, 3)])
def test_route_kernel(L, M, K, dtype):
    gen = torch.Generator().manual_seed(L * 100 + M * 10 + K)
    R = 24
    hid = torch.randn(L, R, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    w2 = (torch.randn(M, R, generator=gen, dtype=torch.float64) * 0.3).to(dtype).requires_grad_()
    b2 = (torch.randn(M, generator=gen, dtype=torch.float64) * 0.3).to(dtype).requires_grad_()
    idx, alpha = route_op(hid, w2, b2, K)
    logits = F.linear(hid, w2, b2)
    ref_idx = topk_lower_index(logits, K)
    ref_alpha = torch.softmax(logits.gather(1, ref_idx).to(alpha.dtype), dim=-1)
    assert idx.dtype == torch.int64 and idx.shape == (L, K)
    assert torch.equal(idx.long(), ref_idx)
    assert_close(alpha, ref_alpha, dtype, "alpha")
    d_alpha = torch.randn(alpha.shape, generator=gen, dtype=torch.float64).to(alpha.dtype)
    got = torch.autograd.grad((alpha * d_alpha).sum(), (hid, w2, b2))
    exp = torch.autograd.grad((ref_alpha * d_alpha).sum(), (hid, w2, b2))
    for name, a, e in zip(("d_hid", "d_w2", "d_b2"), got, exp):
        if K == M == 1:  # softmax over one logit: alpha == 1, every gradient is exactly 0
            assert torch.count_nonzero(a) == 0 and torch.count_nonzero(e) == 0
        else:
            assert_close(a, e, dtype, name)


def test_route_kernel_partial_ties():
    """Columns 1 and 3 tie for the max and 0, 2 tie below: order must be 1, 3, 0, 2 (lower index first)."""
    L, R, M = 9, 16, 5
    hid = torch.randn(L, R)
    w2 = torch.randn(M, R)
    w2[3] = w2[1]
    w2[2] = w2[0]
    b2 = torch.tensor([0.0, 50.0, 0.0, 50.0, -50.0])
    idx, alpha = route_op(hid, w2, b2, 4)
    assert torch.equal(idx.long(), topk_lower_index(F.linear(hid, w2, b2), 4))
    assert torch.equal(idx[:, :2].long(), torch.tensor([1, 3]).expand(L, 2))
    torch.testing.assert_close(alpha[:, 0], alpha[:, 1], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ bank kernels
def _bank_case(dtype, G, L=23, Dg=37, H=48, K=2, M=3, seed=0, layer_dtype=None):
    """M layers with their own random LayerNorm affine, a random routing, random alpha / W1 / b1, and a random
    (not zero) starting h_bar, so the kernels must read-add-write."""
    gen = torch.Generator().manual_seed(seed)
    N = L * G + 3

    def rnd(*shape, scale=1.0, shift=0.0, dt=dtype):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + shift).to(dt)

    layers = [rnd(N, Dg, scale=2.0, shift=0.5, dt=layer_dtype or dtype) for _ in range(M)]
    gather_index = torch.randint(0, N, (L, G), generator=gen)
    topk = topk_lower_index(torch.randn(L, M, generator=gen), K)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    alpha = torch.softmax(torch.randn(L, K, generator=gen, dtype=acc), -1).requires_grad_()
    ln_ws = [rnd(Dg, scale=0.3, shift=1.0).requires_grad_() for _ in range(M)]
    ln_bs = [rnd(Dg, scale=0.3).requires_grad_() for _ in range(M)]
    w1 = rnd(H, G * Dg, scale=(G * Dg) ** -0.5).requires_grad_()
    b1 = rnd(H, scale=0.3).requires_grad_()
    h0 = torch.randn(L, H, generator=gen, dtype=acc)
    return dict(layers=layers, gather_index=gather_index, rows=bank_rows(topk, M), alpha=alpha, ln_ws=ln_ws,
                ln_bs=ln_bs, w1=w1, b1=b1, h0=h0)


def _run_bank(backend, case, order=None, eps=1e-5, seed=2, grad=True):
    """Drive a Bank through ``backend`` (layers in ``order``); -> (h_bar, grads of alpha, W1, b1, every LN affine)."""
    c = case
    M = len(c["layers"])
    with torch.set_grad_enabled(grad):
        bank = Bank(c["h0"].clone(), c["alpha"], c["gather_index"], c["rows"], c["ln_ws"], c["ln_bs"], c["w1"],
                    c["b1"], eps)
        backend.prepare_bank(bank)
        for j in order if order is not None else range(M):
            backend.add_layer(bank, j, c["layers"][j])
        h = backend.close_bank(bank)
    if not grad:
        return h, None
    params = (c["alpha"], c["w1"], c["b1"], *c["ln_ws"], *c["ln_bs"])
    g = torch.randn(h.shape, generator=torch.Generator().manual_seed(seed), dtype=h.dtype)
    grads = torch.autograd.grad((h * g).sum(), params, allow_unused=True)
    return h.detach(), [gr if gr is not None else torch.zeros_like(p) for gr, p in zip(grads, params)]


def _grad_names(M):
    return ["d_alpha", "d_w1", "d_b1"] + [f"d_ln_w{j}" for j in range(M)] + [f"d_ln_b{j}" for j in range(M)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("G", [4, 8])
def test_bank_parity(G, dtype):
    """The whole bank (layers streamed in a scrambled order, one grouped backward) against the torch backend."""
    case = _bank_case(dtype, G, Dg=37 if G == 4 else 19, M=4, seed=G)
    exp_h, exp_g = _run_bank(TorchBackend(), case, order=[2, 0, 3, 1])
    got_h, got_g = _run_bank(TritonBackend(), case, order=[2, 0, 3, 1])
    assert_close(got_h, exp_h, dtype, "h_bar")
    for name, a, e in zip(_grad_names(4), got_g, exp_g):
        assert_close(a, e, dtype, name)


def test_closing_a_bank_with_a_missing_layer_is_refused():
    """A bank closed before every layer was added would hand GEMM1 unwritten tape rows: refused, naming the layers."""
    case = _bank_case(torch.float32, 4, L=7, Dg=8, H=16, M=3, seed=3)
    bank = Bank(case["h0"].clone(), case["alpha"], case["gather_index"], case["rows"], case["ln_ws"], case["ln_bs"],
                case["w1"], case["b1"], 1e-5)
    backend = TritonBackend()
    backend.prepare_bank(bank)
    backend.add_layer(bank, 1, case["layers"][1])
    with pytest.raises(RuntimeError, match=r"bank layers \[0, 2\] of 3 were never added"):
        backend.close_bank(bank)


def test_bank_inference_uses_a_scratch_buffer():
    """Without a gradient nothing is taped: x_hat goes to one min(L, L*K)-row scratch buffer reused by each layer."""
    case = _bank_case(torch.float32, 4, L=19, Dg=21, H=40, M=3, seed=5)
    exp_h, _ = _run_bank(TorchBackend(), case, grad=False)
    got_h, _ = _run_bank(TritonBackend(), case, grad=False)
    assert not got_h.requires_grad
    assert_close(got_h, exp_h, torch.float32, "h_bar")
    with torch.no_grad():
        bank = Bank(case["h0"].clone(), case["alpha"], case["gather_index"], case["rows"], case["ln_ws"],
                    case["ln_bs"], case["w1"], case["b1"], 1e-5)
        TritonBackend().prepare_bank(bank)
    assert not bank.save and bank.tape == [] and bank.scratch[0].shape == (19, 4 * 21)


def test_bank_noncontiguous_and_mixed_dtype():
    """A strided layer view (copied once in the launcher), int32 gather_index, fp32 layers with fp16 parameters."""
    dtype = torch.float16
    case = _bank_case(dtype, 4, L=17, Dg=21, H=40, seed=9, layer_dtype=torch.float32)
    strided = []
    for layer in case["layers"]:
        wide = torch.randn(layer.shape[0], 2 * layer.shape[1])
        wide[:, ::2] = layer
        strided.append(wide[:, ::2])
    case["layers"] = strided
    assert not strided[0].is_contiguous()
    exp_h, exp_g = _run_bank(TorchBackend(), case)
    case["gather_index"] = case["gather_index"].to(torch.int32)
    got_h, got_g = _run_bank(TritonBackend(), case)
    assert_close(got_h, exp_h, dtype, "h_bar")
    for name, a, e in zip(_grad_names(3), got_g, exp_g):
        assert_close(a, e, dtype, name)


def test_bank_layers_without_pairs():
    """Every pair on layer 0: layers 1 and 2 leave h_bar alone and get exactly zero LayerNorm grads."""
    case = _bank_case(torch.float32, 4, L=9, Dg=16, H=16, M=3, K=1, seed=4)
    case["rows"] = bank_rows(torch.zeros(9, 1, dtype=torch.int64), 3)
    exp_h, exp_g = _run_bank(TorchBackend(), case)
    got_h, got_g = _run_bank(TritonBackend(), case)
    assert_close(got_h, exp_h, torch.float32, "h_bar")
    names = _grad_names(3)
    for name, a, e in zip(names, got_g, exp_g):
        assert_close(a, e, torch.float32, name)
    for name, g in zip(names, got_g):
        if name in ("d_ln_w1", "d_ln_w2", "d_ln_b1", "d_ln_b2"):
            assert torch.count_nonzero(g) == 0, name


@pytest.mark.parametrize("L,M,K,idx_dtype", [(37, 5, 2, torch.int64), (1, 3, 1, torch.int64), (20, 4, 4, torch.int32),
                                             (300, 12, 2, torch.int64), (9, 6, 1, torch.int32)])
def test_bank_rows_kernel(L, M, K, idx_dtype):
    """One counting-sort launch gives geoalign.routing.bank_rows' grouping exactly, int32 or int64 routes, with
    layers that get no pair ((9, 6, 1) routes every token to layers 0-2), and positions is its inverse."""
    from geoalign_kernels.bank import bank_rows_op

    gen = torch.Generator().manual_seed(L * 7 + M)
    logits = torch.randn(L, M, generator=gen)
    if (L, M, K) == (9, 6, 1):
        logits[:, 3:] = -10.0
    topk = topk_lower_index(logits, K)
    expected = bank_rows(topk, M)
    tokens, slots, offsets, positions = bank_rows_op(topk.to(idx_dtype), M)
    for t in (tokens, slots, offsets, positions):
        assert t.dtype == torch.int64
    assert torch.equal(offsets, expected.offsets)
    assert torch.equal(tokens, expected.tokens) and torch.equal(slots, expected.slots)
    flat = torch.arange(L * K)
    assert torch.equal(tokens[positions], flat // K) and torch.equal(slots[positions], flat % K)


def test_bank_rows_kernel_scans_in_several_blocks(monkeypatch):
    """More pairs than one scan block (the launcher's 1024 is patched down to 64 here): the running position carries
    across blocks."""
    import geoalign_kernels.bank as kbank

    real = kbank.triton.next_power_of_2
    monkeypatch.setattr(kbank.triton, "next_power_of_2", lambda n: min(real(n), 64))
    topk = topk_lower_index(torch.randn(150, 7, generator=torch.Generator().manual_seed(3)), 3)
    expected = bank_rows(topk, 7)
    tokens, slots, offsets, positions = kbank.bank_rows_op(topk, 7)
    assert torch.equal(offsets, expected.offsets)
    assert torch.equal(tokens, expected.tokens) and torch.equal(slots, expected.slots)
    assert torch.equal(tokens[positions], torch.arange(450) // 3)


def test_bank_rows_kernel_marks_routes_outside_the_bank(monkeypatch):
    """Ids outside [0, M) (only possible with guard mode's host check off) belong to no layer: their positions are
    -1 and the unused tail of tokens / slots is -1, so the combine turns those tokens' rows NaN instead of reading a
    stale pair; the valid routes are grouped as usual."""
    from geoalign_kernels import guard
    from geoalign_kernels.bank import bank_rows_op

    monkeypatch.setattr(guard, "check_index_range", lambda *a, **k: None)
    topk = torch.tensor([[0, 2], [5, 1], [2, -3], [1, 0]])
    tokens, slots, offsets, positions = bank_rows_op(topk, 3)
    assert offsets.tolist() == [0, 2, 4, 6]
    assert tokens.tolist() == [0, 3, 1, 3, 0, 2, -1, -1] and slots.tolist() == [0, 1, 1, 0, 1, 0, -1, -1]
    assert positions.tolist() == [0, 4, -1, 2, 5, -1, 3, 1]


def test_split_bank_with_an_empty_layer_is_exact_poisoned():
    """projector="split" runs a one-layer bank per layer; with feature_usage="single" every other layer's bank has no
    pair. Its normalise launch still has a program that stacks the layer's affine (the buffer starts NaN here), so
    the backward's dW1 = gamma M + beta db1 over zero pairs is exactly zero, not NaN."""
    gen = torch.Generator().manual_seed(21)
    cfg = GeoAlignConfig(hidden_size=24, geo_dim=20, bank_layers=[0, 1, 2], top_k=1, group_size=4,
                         projector_hidden=28, router_hidden=12, projector="split", feature_usage="single",
                         single_layer=1)
    fusion = GeoAlignFusion(cfg)
    q = torch.randn(9, 24, generator=gen)
    layers = [torch.randn(40, 20, generator=gen) for _ in range(3)]
    gather_index = torch.randint(0, 40, (9, 4), generator=gen)
    ref = run_fusion(fusion, q, layers, gather_index, "torch")
    out = run_fusion(fusion, q, layers, gather_index, "triton")
    assert_close(out[0], ref[0], torch.float32, "q_hat")
    for name in ref[3]:
        assert torch.isfinite(out[3][name]).all(), name
        assert_close(out[3][name], ref[3][name], torch.float32, name)
    assert torch.count_nonzero(out[3]["projectors.0.fc1.weight"]) == 0


@pytest.mark.parametrize("block_m", [16, 32])
def test_bank_tape_forward_against_torch(block_m):
    """GEMM1 once over every layer's taped pairs (row tiles walking the layers, one of them without pairs, tiles
    crossing no layer boundary) gives z and h_bar += sum_s alpha GELU(z) as torch computes them; z starts NaN, so a
    tape row the grouped launch misses fails."""
    from geoalign_kernels.bank import bank_rows_op, bank_tape_forward_op

    gen = torch.Generator().manual_seed(block_m)
    L, K, M, G, Dg, H = 29, 2, 5, 4, 13, 40
    logits = torch.randn(L, M, generator=gen)
    logits[:, 2] = -10.0  # layer 2 gets no pair
    rows = bank_rows(topk_lower_index(logits, K), M)
    positions = bank_rows_op(topk_lower_index(logits, K), M)[3]
    P = L * K
    x_hat = torch.randn(P, G * Dg, generator=gen)
    affine = torch.randn(2, M, Dg, generator=gen) * 0.3 + torch.tensor([1.0, 0.0])[:, None, None]
    w1, b1 = torch.randn(H, G * Dg, generator=gen) / 8, torch.randn(H, generator=gen)
    alpha = torch.softmax(torch.randn(L, K, generator=gen), -1)
    h0 = torch.randn(L, H, generator=gen)
    layer_of_pair = torch.repeat_interleave(torch.arange(M), rows.offsets.diff())
    x = (x_hat.view(P, G, Dg) * affine[0, layer_of_pair][:, None] + affine[1, layer_of_pair][:, None]).view(P, -1)
    z_exp = x @ w1.t() + b1
    h_exp = h0 + (alpha[:, :, None] * F.gelu(z_exp[positions].view(L, K, H))).sum(1)
    z, h = kutils.alloc((P, H), torch.float32, "cpu"), h0.clone()
    configs.OVERRIDE.update(BLOCK_SIZE_M=block_m, BLOCK_SIZE_N=16, BLOCK_SIZE_K=16)
    try:
        bank_tape_forward_op(h, alpha, affine, w1, b1, rows.offsets, positions, x_hat, z)
    finally:
        configs.OVERRIDE.clear()
    assert_close(z, z_exp, torch.float32, "z")
    assert_close(h, h_exp, torch.float32, "h_bar")


@pytest.mark.parametrize("need_ln,need_w1", [(False, True), (True, False), (False, False)])
def test_bank_backward_skips_what_is_not_needed(need_ln, need_w1):
    """need_ln / need_w1 off: those gradients come back exactly zero and the rest equal the full backward's."""
    from geoalign_kernels.bank import bank_backward_op

    case = _bank_case(torch.float32, 4, L=19, Dg=21, H=40, M=3, seed=8)
    with torch.enable_grad():
        bank = Bank(case["h0"].clone(), case["alpha"], case["gather_index"], case["rows"], case["ln_ws"],
                    case["ln_bs"], case["w1"], case["b1"], 1e-5)
        backend = TritonBackend()
        backend.prepare_bank(bank)
        for j in range(3):
            backend.add_layer(bank, j, case["layers"][j])
        backend.complete_bank(bank)
    x_hat, z, affine = bank.tape
    rows = case["rows"]
    d_h = torch.randn(19, 40, generator=torch.Generator().manual_seed(1))
    args = (d_h, case["alpha"].detach(), affine, case["w1"].detach(), rows.tokens, rows.slots, rows.offsets, x_hat, z)
    full = bank_backward_op(*args, True, True)
    got = bank_backward_op(*args, need_ln, need_w1)
    for name, a, e, needed in zip(("d_alpha", "d_ln_w", "d_ln_b", "d_w1", "d_b1"), got, full,
                                  (True, need_ln, need_ln, need_w1, True)):
        if needed:
            assert torch.equal(a, e), name
        else:
            assert a.shape == e.shape and torch.count_nonzero(a) == 0, name


# ------------------------------------------------------------------------------------------------ output stage
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_output_parity_and_folded(dtype):
    gen = torch.Generator().manual_seed(13)
    L, D, H = 37, 40, 48

    def rnd(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    q = rnd(L, D).requires_grad_()
    h_bar = torch.randn(L, H, generator=gen).requires_grad_()
    w2, b2, w_out = rnd(D, H, scale=H ** -0.5), rnd(D, scale=0.3), rnd(D, D, scale=D ** -0.5)
    for p in (w2, b2, w_out):
        p.requires_grad_()
    inputs = (q, h_bar, w2, b2, w_out)
    g = rnd(L, D)
    exp = q + F.linear(F.linear(h_bar.to(dtype), w2, b2), w_out)
    got = triton_output(q, h_bar, w2, b2, w_out)
    assert_close(got, exp, dtype, "q_hat")
    exp_g = torch.autograd.grad((exp * g).sum(), inputs)
    got_g = torch.autograd.grad((got * g).sum(), inputs)
    for name, a, e in zip(("dq", "d_h_bar", "d_w2", "d_b2", "d_w_out"), got_g, exp_g):
        assert a.dtype == e.dtype, name
        assert_close(a, e, dtype, name)
    with torch.no_grad():  # folded W_out.W2 (inference only): one more rounding of W_f to the parameter dtype
        folded = output_folded_op(q, h_bar, *fold_output_weights(w2, b2, w_out))
    assert_close(folded, exp.detach(), dtype, "q_hat folded")


def test_backend_fold_output_flag():
    dtype = torch.float32
    fusion, q, layers, gather_index = make_fusion(dtype, L=10, D=24, Dg=16, H=24, M=2, K=1, G=4, seed=17)
    backend = TritonBackend(fold_output=True)
    with torch.no_grad():
        routing = backend.route(fusion, q)
        rows = bank_rows(routing.topk_idx, 2)
        bank = backend.open_bank(fusion, routing.alpha, gather_index, rows, range(2), fusion.projector.fc1)
        for i in range(2):
            backend.add_layer(bank, i, layers[i])
        h_bar = backend.close_bank(bank)
        folded = backend.output(fusion, q, h_bar)
        assert backend._fold is not None
        expected = fusion(q, layers, gather_index, backend="torch")
    assert_close(folded, expected, dtype, "q_hat folded")
    # with grad enabled the unfolded (differentiable) path is used
    out = backend.output(fusion, q, h_bar)
    assert out.requires_grad


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_parity_gpu():
    """bf16 on a real GPU at a moderate shape. bf16 unit roundoff is 3.9e-3; tolerance 3e-2 (a few ulps through the
    chained roundings, as for fp16 above)."""
    dtype = torch.bfloat16
    fusion, q, layers, gather_index = make_fusion(dtype, L=515, D=256, Dg=264, H=384, M=6, K=2, G=4, R=64, seed=21)
    fusion, q = fusion.cuda(), q.cuda()
    layers, gather_index = [x.cuda() for x in layers], gather_index.cuda()
    ref = run_fusion(fusion, q, layers, gather_index, "torch")
    out = run_fusion(fusion, q, layers, gather_index, "triton")
    agree = (out[1].topk_idx == ref[1].topk_idx).all(1)
    assert agree.float().mean() > 0.99  # bf16 logits may round differently in near-ties
    tol = 3e-2
    assert rel_err(out[0], ref[0]) < tol
    assert rel_err(out[2], ref[2]) < tol
    for name in ref[3]:
        assert rel_err(out[3][name], ref[3][name]) < tol, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_int64_offsets_gpu():
    """Layers with more than 2^31 elements (N * D' > 2^31, 4.3 GB each in fp16); gather_index points past element
    2^31, so an int32 row * stride product would wrap. Compared with the torch backend."""
    dtype, Dg = torch.float16, 2048
    N = (1 << 31) // Dg + 257
    fusion, q, _, _ = make_fusion(dtype, L=64, D=64, Dg=Dg, H=64, M=2, K=1, G=4, R=32, seed=23, n_rows_extra=0)
    fusion, q = fusion.cuda(), q.cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)
    layers = [torch.randn(N, Dg, device="cuda", dtype=dtype, generator=gen) for _ in range(2)]
    gather_index = torch.randint(N - 4096, N, (64, 4), device="cuda", generator=gen)
    ref = run_fusion(fusion, q, layers, gather_index, "torch")
    out = run_fusion(fusion, q, layers, gather_index, "triton")
    assert torch.equal(out[1].topk_idx, ref[1].topk_idx)
    assert rel_err(out[0], ref[0]) < TRITON_TOL[dtype]
    for name in ("projector.fc1.weight", "layer_norms.0.weight", "layer_norms.1.bias"):
        assert rel_err(out[3][name], ref[3][name]) < TRITON_TOL[dtype], name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fusion_step_in_a_cuda_graph_gpu(monkeypatch):
    """Forward + backward of the triton fusion with input value checks off and guard mode off: no host sync
    (torch.cuda.set_sync_debug_mode("error") raises on one), so the whole step is captured in one CUDAGraph; a
    replay on new inputs copied into the static ones gives the eager torch backend's output and gradients."""
    from geoalign_kernels import guard

    monkeypatch.setattr(guard, "ENABLED", False)
    dtype = torch.float32
    fusion, q, layers, gather_index = make_fusion(dtype, L=301, D=128, Dg=96, H=160, M=6, K=2, G=4, R=64, seed=31)
    fusion = fusion.cuda()
    fusion.check_inputs = False
    static_q = q.cuda().requires_grad_()
    static_layers, static_gi = [x.cuda() for x in layers], gather_index.cuda()
    static_g = torch.randn_like(static_q)

    def step():
        fusion.zero_grad(set_to_none=True)
        static_q.grad = None
        out = fusion(static_q, static_layers, static_gi, backend="triton")
        out.backward(static_g)
        return out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (Triton compiles) on a side stream, as CUDA graph capture requires
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()  # eager, no sync
        fusion.zero_grad(set_to_none=True)
        static_q.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = fusion(static_q, static_layers, static_gi, backend="triton")
            static_out.backward(static_g)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    _, q2, layers2, gi2 = make_fusion(dtype, L=301, D=128, Dg=96, H=160, M=6, K=2, G=4, R=64, seed=32)
    with torch.no_grad():
        static_q.copy_(q2.cuda())
        for s, x in zip(static_layers, layers2):
            s.copy_(x.cuda())
        static_gi.copy_(gi2.cuda())
    graph.replay()
    torch.cuda.synchronize()
    got = (static_out.detach().clone(), static_q.grad.clone(),
           {n: p.grad.clone() for n, p in fusion.named_parameters() if p.grad is not None})
    fusion.check_inputs = True
    fusion.zero_grad(set_to_none=True)
    q_ref = q2.cuda().requires_grad_()
    out_ref = fusion(q_ref, [x.cuda() for x in layers2], gi2.cuda(), backend="torch")
    out_ref.backward(static_g)
    assert rel_err(got[0], out_ref.detach()) < TRITON_TOL[dtype]
    assert rel_err(got[1], q_ref.grad) < TRITON_TOL[dtype]
    for name, p in fusion.named_parameters():
        assert rel_err(got[2][name], p.grad) < TRITON_TOL[dtype], name


# ------------------------------------------------------------------------------------------------ split-K GEMM
@pytest.mark.parametrize("split_k", [1, 2, 3, 7, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_split_k_matmul(split_k, dtype):
    """C = A @ B with K split into ranges reduced by a sum, against torch in fp64: odd sizes, K not a multiple of the
    block (32 under the interpreter), strided (transposed) operands as the router's dW2 = dS^T H, and more splits
    than K-steps (40 > 517/32: the last ranges are empty and must add zero). Into a poisoned output, with A's row
    sums (the router's d_b2 = sum_l dS) from the same launch into a poisoned vector."""
    from geoalign_kernels.gemm import matmul

    gen = torch.Generator().manual_seed(split_k)
    ds = torch.randn(517, 12, generator=gen, dtype=torch.float64).to(dtype)  # [L, M]
    hid = torch.randn(517, 37, generator=gen, dtype=torch.float64).to(dtype)  # [L, R]
    out = torch.full((12, 37), float("nan"), dtype=dtype)
    sums = torch.full((12,), float("nan"), dtype=dtype)
    got = matmul(ds.t(), hid, out=out, split_k=split_k, row_sum=sums)
    assert got is out
    expected = ds.double().t() @ hid.double()
    tol = {torch.float32: 1e-6, torch.float16: 1e-3}[dtype]
    assert rel_err(got, expected) < tol
    assert rel_err(sums, ds.double().sum(0)) < tol


def test_split_k_with_an_epilogue_is_refused():
    from geoalign_kernels.gemm import matmul

    a, b = torch.randn(4, 64), torch.randn(64, 5)
    with pytest.raises(ValueError, match="split_k"):
        matmul(a, b, bias=torch.randn(5), split_k=2)
    with pytest.raises(ValueError, match="split_k"):
        matmul(a, b, split_k=0)


def test_split_k_rule():
    """Split only when C's tiles fill less than half the SMs; about one program per SM, >= 4 K-steps each, <= 32."""
    from geoalign_kernels.gemm import split_k_for

    cfg = dict(BLOCK_SIZE_M=64, BLOCK_SIZE_N=128, BLOCK_SIZE_K=64)
    assert split_k_for(12, 512, 8064, cfg, 132) == 31  # router dW2 at paper scale: 4 tiles, 126 K-steps // 4
    assert split_k_for(12, 512, 1024, cfg, 132) == 4  # 16 K-steps: 4 of 4 each
    assert split_k_for(2048, 2048, 8064, cfg, 132) == 1  # 512 tiles: no split
    assert split_k_for(12, 512, 100, cfg, 132) == 1  # too short to split
