"""Shared builders and checks for the fusion tests: fresh random modules and inputs (never zeros or default LN
params), the parity shapes, the per-dtype tolerances and the parity assertion.

Tolerances (max |fast - ref| divided by max |ref| over each tensor), for torch-vs-reference parity:
  float64: 1e-12. Both paths do the same arithmetic in a different order and on different row subsets, so the
           difference is a few ulps (eps 2.2e-16) times the depth of the sums (<= G*D' = 160 terms, 4 chained GEMMs).
  float32: 5e-5. The same argument with eps 1.2e-7: ~sqrt(160) * 4 chained reductions ~ 1e-5 typical; 5e-5 leaves
           headroom for the worst tensor (dW1 sums over every routed pair) without hiding a wrong row or a dropped
           term, which shows up at O(1).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np

import pytest
import torch

from geoalign import GeoAlignConfig, GeoAlignFusion
from geoalign.backends import available_backends
from geoalign.routing import bank_rows, kept_softmax_backward, topk_lower_index


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
#: Triton kernels vs the torch backend / reference, at test_triton_kernels.py's shapes (D' <= 40, H <= 48):
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


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    """Finite (a kernel that left a poisoned entry unwritten fails here) and within ``tol`` relative error."""
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (unwritten / poisoned entries?)"
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.1g}"


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


# ----------------------------------------------------------------------------------- the cuda backend without a GPU
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


# ----------------------------------------------------------------------------------- the bank's backward, called alone
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


# ----------------------------------------------------------------------------------- benchmark data for the eval tests
def write_video(path, n=12, size=32, width=None):
    """Frame i is a solid grey of value 20*i (so sampled indices can be checked); size x width px."""
    import av
    width = width or size
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(path, "w") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height = width, size
        s.pix_fmt = "yuv420p"
        for i in range(n):
            f = av.VideoFrame.from_ndarray(np.full((size, width, 3), 20 * i, np.uint8), format="rgb24")
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def write_frames(folder, n=10, size=16, width=None):
    """ScanNet posed_images layout: 00000.jpg colour + 00000.png depth + 00000.txt pose."""
    from PIL import Image
    width = width or size
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((size, width, 3), 20 * i, np.uint8)).save(os.path.join(folder, f"{i:05d}.jpg"))
        Image.fromarray(np.full((size, width), 255, np.uint8)).save(os.path.join(folder, f"{i:05d}.png"))
        open(os.path.join(folder, f"{i:05d}.txt"), "w").write("1 0 0 0\n")


VSI_DOCS = [
    # (question_type, options, ground_truth, dataset, scene)
    ("object_counting", None, "3", "scannet", "scene0000_00"),
    ("object_abs_distance", None, "2.5", "scannet", "scene0000_00"),
    ("object_size_estimation", None, "80", "arkitscenes", "41069025"),
    ("room_size_estimation", None, "20.4", "arkitscenes", "41069025"),
    ("object_rel_distance", ["A. chair", "B. table", "C. sofa", "D. bed"], "B", "scannet", "scene0000_00"),
    ("object_rel_direction_easy", ["A. left", "B. right"], "A", "scannetpp", "0a5c013435"),
    ("object_rel_direction_medium", ["A. left", "B. right", "C. back"], "C", "scannetpp", "0a5c013435"),
    ("object_rel_direction_hard", ["A. front-left", "B. front-right", "C. back-left", "D. back-right"], "D",
     "scannetpp", "0a5c013435"),
    ("route_planning", ["A. Turn Left", "B. Turn Right", "C. Go Forward"], "A", "scannet", "scene0000_00"),
    ("obj_appearance_order", ["A. a, b, c", "B. b, a, c", "C. c, a, b", "D. a, c, b"], "C", "arkitscenes",
     "41069025"),
]


def make_vsibench(d, size=32, width=None, frames_per_dataset=None):
    """A VSI-Bench folder: test.jsonl + {dataset}/{scene}.mp4 (``frames_per_dataset``: video length per
    dataset, default 12)."""
    rows = []
    for i, (qt, opts, gt, ds, scene) in enumerate(VSI_DOCS):
        rows.append({"id": i, "dataset": ds, "scene_name": scene, "question_type": qt,
                     "question": f"Question {i} about {qt}?", "options": opts, "ground_truth": gt})
        p = d / ds / f"{scene}.mp4"
        if not p.exists():
            write_video(str(p), n=(frames_per_dataset or {}).get(ds, 12), size=size, width=width)
    with open(d / "test.jsonl", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    return str(d)


def make_scanqa(d, size=None, width=None):
    """A ScanQA folder: ScanQA_v1.0_val.json, scene0011_00 as a posed_images frame folder (10 frames),
    scene0015_00 as a 12-frame video. Frames 16x16 (folder) / 32x32 (video) unless ``size``/``width``."""
    docs = [
        {"question_id": "val-scene0011_00-0", "scene_id": "scene0011_00", "question": "What color is the chair?",
         "answers": ["brown", "brown wooden"], "object_ids": [1], "object_names": ["chair"]},
        {"question_id": "val-scene0011_00-1", "scene_id": "scene0011_00", "question": "What is by the door?",
         "answers": ["trash can"], "object_ids": [2], "object_names": ["trash_can"]},
        {"question_id": "val-scene0015_00-0", "scene_id": "scene0015_00", "question": "How many tables?",
         "answers": ["2", "two tables"], "object_ids": [3], "object_names": ["table"]},
    ]
    (d / "ScanQA_v1.0_val.json").write_text(json.dumps(docs))
    write_frames(str(d / "scannet" / "posed_images" / "scene0011_00"), size=size or 16, width=width)
    write_video(str(d / "scannet" / "posed_images" / "scene0015_00.mp4"), size=size or 32, width=width)
    return str(d)


def make_sqa3d(d, size=None, width=None, folder_frames=5):
    """An SQA3D folder: balanced/ question + annotation files, scene0050_00 as a 12-frame video,
    scene0060_00 as a frame folder of ``folder_frames`` frames."""
    b = d / "balanced"
    b.mkdir()
    qs = [{"question_id": 220602000000 + i, "scene_id": s, "situation": sit, "question": q,
           "alternative_situation": []}
          for i, (s, sit, q) in enumerate([
              ("scene0050_00", "I am sitting on the sofa.", "What is in front of me?"),
              ("scene0050_00", "I am facing the window.", "Is the door on my left?"),
              ("scene0060_00", "I just entered the room.", "How many chairs can I see?")])]
    ans = ["table", "yes", "2"]
    anns = [{"question_id": q["question_id"], "scene_id": q["scene_id"],
             "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": 1}]} for q, a in zip(qs, ans)]
    (b / "v1_balanced_questions_test_scannetv2.json").write_text(json.dumps({"questions": qs}))
    (b / "v1_balanced_sqa_annotations_test_scannetv2.json").write_text(json.dumps({"annotations": anns}))
    write_video(str(d / "videos" / "scene0050_00.mp4"), size=size or 32, width=width)
    write_frames(str(d / "videos" / "scene0060_00"), n=folder_frames, size=size or 16, width=width)
    return str(d)


def lines(path):
    with open(path) as f:
        return [json.loads(x) for x in f if x.strip()]


def frame_means(frames):
    """Mean grey value of each frame (the builders above paint frame i with 20*i)."""
    return [float(np.asarray(f).mean()) for f in frames]


class RecordingPredictor:
    """The fake predictor's hash answers; every sample asked about is kept in ``RecordingPredictor.seen`` (for a
    ``--predictor helpers:RecordingPredictor`` run, whose predictor object the test never sees)."""

    seen: list = []

    def __init__(self, model_dir=None, **kwargs):
        from geoalign.eval.fake import FakePredictor

        self.fake = FakePredictor(model_dir, **kwargs)
        self.max_batch_size = self.fake.max_batch_size

    def predict(self, samples):
        RecordingPredictor.seen.extend(samples)
        return self.fake.predict(samples)


# ----------------------------------------------------------------------------- media


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


# ------------------------------------------------------------------------------------------------------ training
def train_config(data, out, **kw):
    """A TrainConfig for the tiny model on the synthetic colour dataset ``data`` = (records path, media root),
    single process, CPU, fp32, no logging or checkpoints unless asked."""
    from geoalign.training.config import TrainConfig

    path, root = data
    base = dict(train_data=[path], media_root=root, output_dir=str(out), precision="no", distributed="ddp",
                global_batch_size=2, per_device_batch_size=1, learning_rate=3e-3, num_workers=0, logging_steps=0,
                save_steps=0, progress_bar=False, num_frames=4, save_final_model=False)
    base.update(kw)
    return TrainConfig(**base)


def tiny_trainer(cfg, seed=0, perturb=False):
    """A GeoAlignTrainer on a tiny random model; perturb: shift every trainable weight (a resume must overwrite)."""
    from geoalign.processing import GeoAlignProcessor
    from geoalign.tiny import tiny_model
    from geoalign.training.trainer import GeoAlignTrainer

    model, tok = tiny_model(seed=seed)
    if perturb:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if not name.startswith("model.vggt.") and ".visual." not in name:
                    p.add_(torch.randn_like(p) * 0.1)
    proc = GeoAlignProcessor(tok, None, group_size=4, num_frames=cfg.num_frames)
    return GeoAlignTrainer(cfg, model=model, processor=proc)


def write_base_checkpoints(root, seed: int = 0):
    """A tiny Qwen2.5-VL directory (with tokenizer and chat template) and a VGGT checkpoint (official
    ``aggregator.*`` names + vggt_config.json) under ``root``: what ``qwen_path`` / ``vggt_path`` name. Returns
    (qwen_dir, vggt_dir)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from geoalign.atomic_files import save_safetensors, write_json
    from geoalign.geometry.aggregator import VGGTAggregator
    from geoalign.processing import GeoAlignProcessor
    from geoalign.tiny import make_tokenizer, tiny_qwen_config, tiny_vggt_config

    torch.manual_seed(seed)
    tok = make_tokenizer()
    qwen_dir, vggt_dir = os.path.join(root, "qwen"), os.path.join(root, "vggt")
    Qwen2_5_VLForConditionalGeneration(tiny_qwen_config(tok)).save_pretrained(qwen_dir)
    GeoAlignProcessor(tok, None, group_size=4).save_pretrained(qwen_dir)
    vggt = VGGTAggregator(tiny_vggt_config())
    save_safetensors(os.path.join(vggt_dir, "model.safetensors"),
                     {"aggregator." + k: v.contiguous() for k, v in vggt.state_dict().items()})
    write_json(os.path.join(vggt_dir, "vggt_config.json"), vggt.config.to_dict())
    return qwen_dir, vggt_dir


def assert_greedy_by_full_forwards(model, inputs: dict, new_tokens: torch.Tensor) -> None:
    """``new_tokens`` [1, n] (what generate decoded after ``inputs``) equal greedy decoding by full forwards
    without a cache, one token at a time."""
    ids, att = inputs["input_ids"], inputs["attention_mask"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    for step in range(new_tokens.shape[1]):
        kw = dict(extra)
        if "mm_token_type_ids" in inputs:
            kw["mm_token_type_ids"] = torch.cat(
                [inputs["mm_token_type_ids"], torch.zeros(1, step, dtype=torch.int64)], dim=1)
        with torch.no_grad():
            nxt = model(input_ids=ids, attention_mask=att, **kw).logits[:, -1].argmax(-1, keepdim=True)
        assert nxt.item() == new_tokens[0, step].item(), step
        ids, att = torch.cat([ids, nxt], dim=1), torch.cat([att, torch.ones_like(nxt)], dim=1)


def boxes_overlap(a, b) -> bool:
    """Whether two matplotlib bounding boxes (window extents) overlap."""
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


class CodeOnLoad:
    """An object whose pickle runs ``touch MARKER`` when unpickled with arbitrary globals (os.system): what a hostile
    checkpoint file would hold. Safe loaders must refuse it without creating the marker."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def hostile_torch_file(path, marker) -> None:
    """``torch.save`` of a dict holding a CodeOnLoad (torch's format, as accelerate's .bin / .pkl files are)."""
    torch.save({"state": CodeOnLoad(marker), "x": torch.zeros(2)}, str(path))


def reseal_checkpoint(path) -> None:
    """Recompute the manifest of a checkpoint's state file after files in it were replaced: a tampered checkpoint
    whose manifest is consistent (an attacker can compute SHA-256), so only the safe loaders stand in the way."""
    from geoalign.training import checkpoint as ckpt

    state_file = os.path.join(str(path), ckpt.STATE_FILE)
    with open(state_file) as f:
        state = json.load(f)
    state["files"] = ckpt.manifest(str(path))
    with open(state_file, "w") as f:
        json.dump(state, f)


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


def write_train_setup(root):
    """Under ``root``: a tiny saved GeoAlign model (``model/``), a synthetic colour dataset of 8 records
    (``data/``) and ``train.yaml`` training it on one CPU process (3 steps of 4 records, a checkpoint every 2 steps,
    a log record every step). Returns ``root``."""
    import textwrap

    from geoalign.processing import GeoAlignProcessor
    from geoalign.tiny import tiny_model
    from geoalign.training.synthetic import make_colour_dataset

    data = make_colour_dataset(str(root / "data"), 8, frame_counts=(1, 2), height=8)
    model, tok = tiny_model(seed=0)
    model.save_pretrained(str(root / "model"), processor=GeoAlignProcessor(tok, None, group_size=4, num_frames=4))
    (root / "train.yaml").write_text(textwrap.dedent(f"""
        model_path: {root / 'model'}
        train_data: [{data}]
        media_root: {root / 'data'}
        num_frames: 4
        precision: "no"
        distributed: ddp
        global_batch_size: 4
        per_device_batch_size: 1
        learning_rate: 3.0e-3
        max_steps: 3
        save_steps: 2
        logging_steps: 1
        num_workers: 0
        progress_bar: false
        save_final_model: false
    """))
    return root
