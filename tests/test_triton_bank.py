"""The bank kernels (geoalign_kernels.bank: row grouping, gather + LayerNorm, the tape's GEMM1 + GELU, the grouped
backward) through the Triton backend's bank and called alone, against the torch sparse backend and torch.

Conventions shared by every tests/test_triton_*.py (interpreter shapes, error metric, tolerances, poisoned outputs):
tests/triton_helpers.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")
pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("poison_outputs")]

import geoalign_kernels.utils as kutils  # noqa: E402
from helpers import TRITON_TOL, assert_close  # noqa: E402
from triton_helpers import DTYPES, run_fusion  # noqa: E402
from geoalign import GeoAlignConfig, GeoAlignFusion  # noqa: E402
from geoalign.backends.base import Bank  # noqa: E402
from geoalign.backends.torch_sparse import TorchBackend  # noqa: E402
from geoalign.routing import bank_rows, topk_lower_index  # noqa: E402
from geoalign_kernels import configs  # noqa: E402
from geoalign.backends.triton_backend import TritonBackend  # noqa: E402


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
    assert_close(got_h, exp_h, TRITON_TOL[dtype], "h_bar")
    for name, a, e in zip(_grad_names(4), got_g, exp_g):
        assert_close(a, e, TRITON_TOL[dtype], name)


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
    """Without a gradient nothing is taped: GEMM1's operand x goes to one min(L, L*K)-row scratch buffer reused by
    each layer."""
    case = _bank_case(torch.float32, 4, L=19, Dg=21, H=40, M=3, seed=5)
    exp_h, _ = _run_bank(TorchBackend(), case, grad=False)
    got_h, _ = _run_bank(TritonBackend(), case, grad=False)
    assert not got_h.requires_grad
    assert_close(got_h, exp_h, TRITON_TOL[torch.float32], "h_bar")
    with torch.no_grad():
        bank = Bank(case["h0"].clone(), case["alpha"], case["gather_index"], case["rows"], case["ln_ws"],
                    case["ln_bs"], case["w1"], case["b1"], 1e-5)
        TritonBackend().prepare_bank(bank)
    assert not bank.save and bank.tape == [] and bank.scratch.shape == (19, 4 * 21)


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
    assert_close(got_h, exp_h, TRITON_TOL[dtype], "h_bar")
    for name, a, e in zip(_grad_names(3), got_g, exp_g):
        assert_close(a, e, TRITON_TOL[dtype], name)


@pytest.mark.parametrize("grad", [True, False])
def test_bank_layers_without_pairs(grad):
    """Every pair on layer 0: layers 1 and 2 leave h_bar alone and get exactly zero LayerNorm grads (and at
    inference their GEMM1 tiles all exit)."""
    case = _bank_case(torch.float32, 4, L=9, Dg=16, H=16, M=3, K=1, seed=4)
    case["rows"] = bank_rows(torch.zeros(9, 1, dtype=torch.int64), 3)
    exp_h, exp_g = _run_bank(TorchBackend(), case, grad=grad)
    got_h, got_g = _run_bank(TritonBackend(), case, grad=grad)
    assert_close(got_h, exp_h, TRITON_TOL[torch.float32], "h_bar")
    if not grad:
        return
    names = _grad_names(3)
    for name, a, e in zip(names, got_g, exp_g):
        assert_close(a, e, TRITON_TOL[torch.float32], name)
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
    assert_close(out[0], ref[0], TRITON_TOL[torch.float32], "q_hat")
    for name in ref[3]:
        assert torch.isfinite(out[3][name]).all(), name
        assert_close(out[3][name], ref[3][name], TRITON_TOL[torch.float32], name)
    assert torch.count_nonzero(out[3]["projectors.0.fc1.weight"]) == 0


@pytest.mark.parametrize("block_m,Dg,H,even_k,even_n", [(16, 13, 40, False, False), (32, 16, 48, True, True),
                                                      (16, 13, 48, False, True), (32, 16, 40, True, False)])
def test_bank_tape_forward_against_torch(block_m, Dg, H, even_k, even_n):
    """GEMM1 once over every taped pair: a plain GEMM z = x W1^T + b1 on the operand x that the normalise pass wrote
    (the affine already applied), then h_bar += sum_s alpha GELU(z), as torch computes them. Every combination of
    the K (G*D') and N (H) extents being whole tiles (EVEN_K / EVEN_N: those loads unmasked) or not, and P = 58
    rows not a multiple of the row tile; z starts NaN, so a row or column the launch misses fails."""
    from geoalign_kernels.bank import _even, bank_rows_op, bank_tape_forward_op

    gen = torch.Generator().manual_seed(block_m + Dg + H)
    L, K, M, G = 29, 2, 5, 4
    logits = torch.randn(L, M, generator=gen)
    logits[:, 2] = -10.0  # layer 2 gets no pair
    positions = bank_rows_op(topk_lower_index(logits, K), M)[3]
    P = L * K
    x = torch.randn(P, G * Dg, generator=gen)
    w1, b1 = torch.randn(H, G * Dg, generator=gen) / 8, torch.randn(H, generator=gen)
    alpha = torch.softmax(torch.randn(L, K, generator=gen), -1)
    h0 = torch.randn(L, H, generator=gen)
    z_exp = x @ w1.t() + b1
    h_exp = h0 + (alpha[:, :, None] * F.gelu(z_exp[positions].view(L, K, H))).sum(1)
    z, h = kutils.alloc((P, H), torch.float32, "cpu"), h0.clone()
    configs.OVERRIDE.update(BLOCK_SIZE_M=block_m, BLOCK_SIZE_N=16, BLOCK_SIZE_K=16)
    try:
        assert _even(configs.get_config("bank_gemm1", P, z.device), G * Dg, H) == dict(EVEN_K=even_k, EVEN_N=even_n)
        bank_tape_forward_op(h, alpha, w1, b1, positions, x, z)
    finally:
        configs.OVERRIDE.clear()
    assert_close(z, z_exp, TRITON_TOL[torch.float32], "z")
    assert_close(h, h_exp, TRITON_TOL[torch.float32], "h_bar")


@pytest.mark.parametrize("block_m", [16, 32])
@pytest.mark.parametrize("grad", [True, False])
def test_bank_layers_at_tile_boundaries(block_m, grad):
    """Layers of 32, 33, 31, 0 and 1 pairs (K = 1, L = 97): with 16- and 32-row tiles a layer ends exactly on a tile
    boundary, one row past it and one row short of it, one is empty and one is a single row. Training's GEMM1 runs
    over all 97 rows at once; inference's runs per layer with a grid sized for 97 rows (the tiles past n_j exit).
    Forward and every gradient against the torch backend, on odd widths (D' = 11, H = 20)."""
    sizes = [32, 33, 31, 0, 1]
    L, M = sum(sizes), len(sizes)
    case = _bank_case(torch.float32, 2, L=L, Dg=11, H=20, M=M, K=1, seed=block_m)
    layer_of_token = torch.repeat_interleave(torch.arange(M), torch.tensor(sizes))
    layer_of_token = layer_of_token[torch.randperm(L, generator=torch.Generator().manual_seed(5))]
    case["rows"] = bank_rows(layer_of_token[:, None], M)
    assert case["rows"].offsets.diff().tolist() == sizes
    exp_h, exp_g = _run_bank(TorchBackend(), case, grad=grad)
    configs.OVERRIDE.update(BLOCK_SIZE_M=block_m)
    try:
        got_h, got_g = _run_bank(TritonBackend(), case, grad=grad)
    finally:
        configs.OVERRIDE.clear()
    assert_close(got_h, exp_h, TRITON_TOL[torch.float32], "h_bar")
    for name, a, e in zip(_grad_names(M), got_g or [], exp_g or []):
        assert_close(a, e, TRITON_TOL[torch.float32], name)


def _round_as_the_kernel(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 ``t`` rounded to ``dtype`` as a kernel's .to(dtype) rounds it: to nearest even, except the Triton
    interpreter's fp32 -> bf16, which truncates (on a GPU it rounds to nearest even)."""
    if dtype == torch.bfloat16 and kutils.INTERPRET:
        return (t.float().view(torch.int32) & -65536).view(torch.float32).to(dtype)  # exact: low 16 bits zero
    return t.to(dtype)


def _normalize_reference(case, j, dtype, eps):
    """x_hat [n_j*G, D'] of layer j as the torch backend computes it."""
    rows = case["rows"]
    lo, hi = rows.offsets[j].item(), rows.offsets[j + 1].item()
    x_hat = TorchBackend().normalized_rows(case["layers"][j], case["gather_index"], rows.tokens[lo:hi], eps, dtype)
    return x_hat.reshape(-1, x_hat.shape[-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tape", [True, False])
@pytest.mark.parametrize("path,programs", [("registers", 2), ("registers", 1), ("registers", 64), ("chunked", 2)])
def test_normalize_pass_writes_x_hat_and_x(monkeypatch, dtype, tape, path, programs):
    """The normalise pass alone, layer by layer into NaN-poisoned buffers: x_hat (training only) matches the torch
    backend's normalised rows, and x = gamma x_hat + beta equals, bit for bit, the fp32 value of the kernel's own
    x_hat rounded once to the parameter dtype (the rounding GEMM1's A-load applied before issue 31). Training writes the layer's tape
    rows only (the other layers' stay NaN, the stacked affine gets the layer's); inference writes rows 0..n_j*G-1 of
    the scratch. Rows held in registers (one read per row) and streamed in chunks (D' = 37 over 32-column chunks, as
    for rows wider than _MAX_ROW_BLOCK); the grid-stride loop with one program, two (several row blocks each) and more
    programs than row blocks."""
    import geoalign_kernels.bank as kbank

    monkeypatch.setattr(kbank, "_CPU_ROW_PROGRAMS", programs)
    if path == "chunked":
        monkeypatch.setattr(kbank, "_MAX_ROW_BLOCK", 32)
    eps = 1e-5
    case = _bank_case(dtype, 4, L=23, Dg=37, H=16, M=3, seed=11)
    rows, (L, G), Dg = case["rows"], case["gather_index"].shape, 37
    P, width = rows.tokens.numel(), G * Dg
    assert kbank._normalize_blocks(Dg, configs.get_config("rows", L * G, torch.device("cpu")))["ROW_IN_REGISTERS"] \
        == (path == "registers")
    x_hat = kutils.alloc((P, width), dtype, "cpu") if tape else torch.empty(0, width, dtype=dtype)
    affine = kutils.alloc((2, 3, Dg), dtype, "cpu") if tape else torch.empty(2, 0, Dg, dtype=dtype)
    for j in (1, 0, 2):
        x = kutils.alloc((P if tape else min(L, P), width), dtype, "cpu")
        h = case["h0"].clone()
        kbank.bank_layer_forward(h, case["alpha"].detach(), case["ln_ws"][j].detach(), case["ln_bs"][j].detach(),
                                 case["w1"].detach(), case["b1"].detach(), case["layers"][j], rows.tokens, rows.slots,
                                 rows.offsets, j, case["gather_index"], eps, x_hat, x, affine, tape)
        lo, hi = rows.offsets[j].item(), rows.offsets[j + 1].item()
        exp_x_hat = _normalize_reference(case, j, dtype, eps)
        got_x = (x[lo:hi] if tape else x[:hi - lo]).reshape(-1, Dg)
        rest = torch.cat([x[:lo], x[hi:]]) if tape else x[hi - lo:]
        assert rest.isnan().all(), "rows outside the layer's were written"
        if tape:
            got_x_hat = x_hat[lo:hi].reshape(-1, Dg)
            assert_close(got_x_hat, exp_x_hat, TRITON_TOL[dtype], f"x_hat layer {j}")
            assert torch.equal(affine[0, j], case["ln_ws"][j].detach())
            assert torch.equal(affine[1, j], case["ln_bs"][j].detach())
            assert torch.equal(h, case["h0"]), "training leaves h_bar to bank_tape_forward"
        else:
            got_x_hat = exp_x_hat  # (not written without a tape: x from the reference's x_hat, to a tolerance)
        w, b = case["ln_ws"][j].detach().float(), case["ln_bs"][j].detach().float()
        exp_x = _round_as_the_kernel(got_x_hat.float() * w + b, dtype)
        if tape:
            assert torch.equal(got_x, exp_x), f"x layer {j}: not gamma x_hat + beta rounded once"
        else:
            assert_close(got_x, exp_x, TRITON_TOL[dtype], f"x layer {j}")


def test_normalize_blocks_and_programs():
    """The normalise pass's blocks: whole rows in registers up to _MAX_ROW_BLOCK columns (D' = 2048 at paper scale:
    2 rows of 2048 per step), chunked beyond; its grid: at most one program per row block, at least one (it stacks
    the affine even for an empty layer), a bounded number off a GPU."""
    import geoalign_kernels.bank as kbank

    cfg = dict(BLOCK_SIZE_M=32, BLOCK_SIZE_N=256)
    assert kbank._normalize_blocks(2048, cfg) == dict(ROW_IN_REGISTERS=True, BLOCK_SIZE_M=2, BLOCK_SIZE_N=2048)
    assert kbank._normalize_blocks(37, cfg) == dict(ROW_IN_REGISTERS=True, BLOCK_SIZE_M=32, BLOCK_SIZE_N=64)
    assert kbank._normalize_blocks(kbank._MAX_ROW_BLOCK + 1, cfg) == dict(ROW_IN_REGISTERS=False, BLOCK_SIZE_M=32,
                                                                          BLOCK_SIZE_N=256)
    cpu = torch.device("cpu")
    assert kbank._row_programs(cpu, 4, 0) == 1
    assert kbank._row_programs(cpu, 4, 1) == 1
    assert kbank._row_programs(cpu, 4, 10**6) == kbank._CPU_ROW_PROGRAMS


def test_layer_positions_are_not_specialised():
    """layer_pos (the bank layer a launch normalises / multiplies) is a do_not_specialize argument of the normalise
    pass and GEMM1: layers 0, 1, 16 and 5 give one specialisation (Triton would otherwise make 1 a constant and mark
    multiples of 16), so a bank compiles each kernel once, not three times. Checked with Triton's own launch binder
    for an sm_90 target, outside the interpreter (which keeps no specialisation)."""
    import os
    import subprocess
    import sys

    code = """
import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import create_function_from_signature
from geoalign_kernels import bank

backend = make_backend(GPUTarget("cuda", 90, 32))
for fn in (bank._gather_normalize_kernel, bank._bank_gemm1_kernel):
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    pos = fn.arg_names.index("layer_pos")
    seen = set()
    for layer_pos in (0, 1, 16, 5):
        args = [torch.empty(16) if name.endswith("_ptr") else (layer_pos if name == "layer_pos" else 7)
                for name in fn.arg_names]
        kwargs = {name: args[i] for i, name in enumerate(fn.arg_names) if fn.params[i].is_constexpr}
        args = [a for i, a in enumerate(args) if not fn.params[i].is_constexpr]
        specialization = binder(*args, **kwargs)[1]
        seen.add(str(specialization[pos]))
    assert len(seen) == 1, (fn.__name__, seen)
    print(fn.__name__, seen)
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("{") == 2, proc.stdout


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
