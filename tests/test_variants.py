"""The paper's Table 4 ablation variants and GAP-MLLM-style gated fusion as GeoAlignConfig options.

Each fast path (torch; triton under the interpreter at tiny shapes) is checked against the reference backend, which
implements every variant literally (dense bank, dense alpha): outputs, routing, and gradients of q and of every
parameter. Tolerances as in test_parity.py. A parameter the fast path leaves without a gradient (a split projector's
fc1 for a layer no token was routed to) must have an exactly zero reference gradient.
"""
from __future__ import annotations

import pytest
import torch

from helpers import TOL, Shape, assert_parity, fast_backends, make_fusion, make_inputs, rel_err, run_backend
from geoalign import GeoAlignConfig, GeoAlignFusion
from geoalign.config import select_bank_layers
from geoalign.routing import route_fixed

def check(backend, dtype, shape, **options):
    fusion = make_fusion(shape, dtype, **options)
    q, layers, gather_index = make_inputs(shape, dtype)
    grad_out = torch.randn(q.shape, dtype=dtype, generator=torch.Generator().manual_seed(7))
    ref = run_backend(fusion, "reference", q, layers, gather_index, grad_out)
    fast = run_backend(fusion, backend, q, layers, gather_index, grad_out)
    assert_parity(fast, ref, TOL[dtype], f"{backend}/{dtype}/{shape}/{options}", zero_grad_may_be_none=True)
    return fusion


S = Shape(L=13, M=5, K=2, G=4)
S8 = Shape(L=9, M=4, K=3, G=8, D=16, Dg=12, H=20, R=8)

VARIANTS = {
    "single": dict(feature_usage="single", single_layer=3),
    "mean": dict(feature_usage="mean"),
    "dense": dict(feature_usage="dense"),
    "split": dict(projector="split"),
    "film": dict(fusion="film"),
    "gated_2d": dict(fusion="gated_2d"),
    "gated_2d3d": dict(fusion="gated_2d3d"),
    "gated_2d_token": dict(fusion="gated_2d", gate_granularity="token"),
    "gated_2d3d_token": dict(fusion="gated_2d3d", gate_granularity="token"),
    "split_mean_film": dict(projector="split", feature_usage="mean", fusion="film"),
    "split_single_gated": dict(projector="split", feature_usage="single", single_layer=0, fusion="gated_2d3d"),
    "dense_split_gated_token": dict(feature_usage="dense", projector="split", fusion="gated_2d",
                                    gate_granularity="token"),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_torch_variant_parity(variant, dtype):
    check("torch", dtype, S, **VARIANTS[variant])
    check("torch", dtype, S8, **{**VARIANTS[variant], **({"single_layer": 2} if "single_layer" in VARIANTS[variant]
                                                          else {})})


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.triton
def test_triton_variant_parity(variant):
    if "triton" not in fast_backends():
        pytest.skip("triton is not available here")
    check("triton", torch.float32, Shape(L=7, M=3, K=2, G=4, D=16, Dg=12, H=20, R=8),
          **{**VARIANTS[variant], **({"single_layer": 1} if "single_layer" in VARIANTS[variant] else {})})


@pytest.mark.parametrize("K", [1, 2, 3, 4, 5])
def test_any_k(K):
    check("torch", torch.float64, Shape(L=11, M=5, K=K, G=4))


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.triton
def test_any_k_triton(K):
    if "triton" not in fast_backends():
        pytest.skip("triton is not available here")
    check("triton", torch.float32, Shape(L=7, M=3, K=K, G=4, D=16, Dg=12, H=20, R=8))


def test_routes_of_fixed_usages():
    shape = Shape(L=6, M=4, K=2, G=4)
    q, _, _ = make_inputs(shape, torch.float32)
    single = make_fusion(shape, torch.float32, feature_usage="single", single_layer=2)
    for backend in ["reference"] + fast_backends():
        r = single.route(q, backend=backend)
        assert r.topk_idx.tolist() == [[2]] * 6 and torch.equal(r.alpha, torch.ones(6, 1))
        r = make_fusion(shape, torch.float32, feature_usage="mean").route(q, backend=backend)
        assert r.topk_idx.tolist() == [[0, 1, 2, 3]] * 6 and torch.allclose(r.alpha, torch.full((6, 4), 0.25))
    assert not hasattr(single, "router")  # single/mean have no router parameters


@pytest.mark.parametrize("variant", ["add", "film", "gated_2d", "gated_2d3d", "gated_2d_token"])
def test_inject_by_hand(variant):
    """Eq. 8 and its Table 4 variants, written out with the module's weights (fp64): the reference and the fast
    paths share inject, so parity cannot see a wrong formula there."""
    shape = Shape(L=7, M=3, K=2, G=4)
    options = {"add": {}, "gated_2d_token": dict(fusion="gated_2d", gate_granularity="token")}.get(
        variant, dict(fusion=variant))
    fusion = make_fusion(shape, torch.float64, **options)
    gen = torch.Generator().manual_seed(11)
    q, f = (torch.randn(shape.L, shape.D, generator=gen, dtype=torch.float64) for _ in range(2))
    w_out = fusion.out_proj.weight
    if variant == "add":
        expected = q + f @ w_out.t()
    elif variant == "film":
        expected = q * (1 + f @ fusion.film_scale.weight.t()) + f @ w_out.t()
    else:
        gate_in = torch.cat([q, f], dim=1) if variant == "gated_2d3d" else q
        gate = torch.sigmoid(gate_in @ fusion.gate.weight.t() + fusion.gate.bias)
        expected = q + (gate * f) @ w_out.t()
    with torch.no_grad():  # the same fp64 products, possibly summed in another order: a few ulps (eps 2.2e-16)
        assert rel_err(fusion.inject(q, f), expected) <= 1e-13


FIXED = {"single": dict(feature_usage="single", single_layer=2), "mean": dict(feature_usage="mean"),
         "dense": dict(feature_usage="dense")}


@pytest.mark.parametrize("usage", list(FIXED))
def test_fixed_routes_on_the_query_device(usage):
    """The fixed routes (route_fixed) and the reference's dense alpha are made on q's device, not the default one:
    checked on the meta device (a non-CPU device on every machine; shapes and dtypes only)."""
    shape = Shape(L=6, M=4, K=2, G=4)
    fusion = make_fusion(shape, torch.float32, **FIXED[usage]).to("meta")
    fusion.check_inputs = False  # the value checks need data
    q = make_inputs(shape, torch.float32)[0].detach().to("meta")
    for backend in ("reference", "torch"):
        routing = fusion.route(q, backend=backend)
        assert routing.topk_idx.device.type == routing.alpha.device.type == "meta", backend
        assert routing.topk_idx.shape == routing.alpha.shape == (shape.L, 1 if usage == "single" else shape.M)


@pytest.mark.parametrize("usage", list(FIXED))
def test_fixed_routes_of_a_bf16_fusion(usage):
    """bf16 parameters: route_fixed's alpha is fp32 (dense: the softmax of the bf16 logits taken in fp32, within
    1e-6 of fp64, where a bf16 softmax is off by ~2^-9), and the reference's alpha is that alpha in bf16."""
    shape = Shape(L=6, M=4, K=2, G=4)
    fusion = make_fusion(shape, torch.bfloat16, **FIXED[usage])
    q = make_inputs(shape, torch.bfloat16)[0].detach()
    fast = fusion.route(q, backend="torch")
    assert fast.alpha.dtype == torch.float32
    if usage == "dense":
        with torch.no_grad():
            assert rel_err(fast.alpha, torch.softmax(fusion.router(q).double(), dim=-1)) <= 1e-6
    ref = fusion.route(q, backend="reference")
    assert torch.equal(ref.topk_idx, fast.topk_idx)
    assert ref.alpha.dtype == torch.bfloat16 and torch.equal(ref.alpha, fast.alpha.to(torch.bfloat16))


def test_route_fixed_refuses_dynamic_routing():
    shape = Shape(L=4, M=3, K=2, G=4)
    fusion = make_fusion(shape, torch.float32)
    q = make_inputs(shape, torch.float32)[0].detach()
    with pytest.raises(ValueError, match="route_fixed serves feature_usage 'single', 'mean', 'dense', got 'dynamic'"):
        route_fixed(fusion, q)


def test_mean_equals_uniform_dense_softmax():
    """mean == dense with a constant router (equal logits -> softmax 1/M)."""
    shape = Shape(L=8, M=4, K=2, G=4)
    q, layers, gi = make_inputs(shape, torch.float64)
    mean = make_fusion(shape, torch.float64, feature_usage="mean")
    dense = make_fusion(shape, torch.float64, feature_usage="dense")
    dense.load_state_dict(mean.state_dict(), strict=False)
    with torch.no_grad():
        dense.router.fc2.weight.zero_()
        dense.router.fc2.bias.zero_()
        assert rel_err(dense(q, layers, gi), mean(q, layers, gi)) <= 1e-12


def test_default_parameter_names_unchanged():
    names = [n for n, _ in GeoAlignFusion(Shape(L=1, M=3, K=2, G=4).config()).named_parameters()]
    assert names == ["layer_norms.0.weight", "layer_norms.0.bias", "layer_norms.1.weight", "layer_norms.1.bias",
                     "layer_norms.2.weight", "layer_norms.2.bias", "projector.fc1.weight", "projector.fc1.bias",
                     "projector.fc2.weight", "projector.fc2.bias", "router.fc1.weight", "router.fc1.bias",
                     "router.fc2.weight", "router.fc2.bias", "out_proj.weight"]
    split = GeoAlignFusion(Shape(L=1, M=3, K=2, G=4).config(projector="split", fusion="gated_2d3d",
                                                               gate_granularity="token"))
    sd = split.state_dict()
    assert "projectors.2.fc1.weight" in sd and "projector.fc1.weight" not in sd
    assert tuple(sd["gate.weight"].shape) == (1, 48)
    # the Table 4 variants' extra parameters: film_scale [D, D] without a bias, a channel gate [D, D or 2D] with one
    shapes = {}
    for options in (dict(fusion="film"), dict(fusion="gated_2d"), dict(fusion="gated_2d3d")):
        sd = GeoAlignFusion(Shape(L=1, M=3, K=2, G=4).config(**options)).state_dict()
        shapes.update({n: tuple(t.shape) for n, t in sd.items() if n.split(".")[0] in ("out_proj", "film_scale", "gate")})
    assert shapes == {"out_proj.weight": (24, 24), "film_scale.weight": (24, 24), "gate.weight": (24, 48),
                      "gate.bias": (24,)}
    sd = GeoAlignFusion(Shape(L=1, M=3, K=2, G=4).config(fusion="gated_2d")).state_dict()
    assert (tuple(sd["gate.weight"].shape), tuple(sd["gate.bias"].shape)) == ((24, 24), (24,))


def test_default_config():
    """GeoAlignFusion() (no config) builds GeoAlignConfig()'s module (on the meta device: shapes only, no memory)."""
    with torch.device("meta"):
        fusion = GeoAlignFusion()
    assert fusion.config == GeoAlignConfig()
    cfg = fusion.config
    assert tuple(fusion.out_proj.weight.shape) == (cfg.hidden_size, cfg.hidden_size)
    assert len(fusion.layer_norms) == cfg.num_bank_layers


def test_split_stream_on_the_query_device():
    """With projector="split" the stream's F_hat accumulator is made on q's device, not the default one: a CPU
    forward run with the meta device as the default device gives the same CPU result."""
    shape = Shape(L=6, M=4, K=2, G=4)
    fusion = make_fusion(shape, torch.float64, projector="split")
    q, layers, gi = make_inputs(shape, torch.float64)
    with torch.no_grad():
        expected = fusion(q, layers, gi, backend="torch")
        with torch.device("meta"):
            q_hat = fusion(q, layers, gi, backend="torch")
    assert q_hat.device.type == "cpu" and torch.equal(q_hat, expected)


# ------------------------------------------------------------------------------------------------- bank selection
def test_bank_selection():
    assert GeoAlignConfig().bank_layers == tuple(range(12, 24))
    assert GeoAlignConfig().bank_selection == "latter"
    assert GeoAlignConfig(bank_selection="former").bank_layers == tuple(range(12))
    assert GeoAlignConfig(bank_selection="uniform").bank_layers == tuple(range(1, 24, 2))
    assert GeoAlignConfig(bank_selection="uniform", bank_size=5).bank_layers == (3, 8, 13, 18, 23)
    assert GeoAlignConfig(bank_selection="latter", bank_size=4, geo_depth=6, top_k=2).bank_layers == (2, 3, 4, 5)
    assert GeoAlignConfig(bank_selection="uniform", bank_size=24).bank_layers == tuple(range(24))
    cfg = GeoAlignConfig(bank_layers=[3, 7, 9])
    assert cfg.bank_selection == "explicit" and cfg.num_bank_layers == 3 and cfg.bank_size == 3
    # both given and consistent is fine (this is what a saved config holds)
    assert GeoAlignConfig(bank_layers=range(12), bank_selection="former").bank_layers == tuple(range(12))
    for sel in ("latter", "former", "uniform"):
        for size in (1, 3, 12, 24):
            layers = select_bank_layers(sel, size, 24)
            assert len(set(layers)) == size and all(0 <= i < 24 for i in layers)


@pytest.mark.parametrize("kwargs, match", [
    (dict(top_k=13), "top_k must be <= the number of bank layers M=12, got K=13"),
    (dict(bank_selection="former", bank_size=3, top_k=4), "top_k must be <= the number of bank layers M=3"),
    (dict(bank_selection="sideways"), "bank_selection must be one of"),
    (dict(bank_selection="explicit"), "needs bank_layers"),
    (dict(bank_layers=[1, 2, 3], bank_selection="latter"), "disagrees with bank_selection"),
    (dict(bank_layers=[1, 2, 3], bank_size=4), "bank_size=4 disagrees"),
    (dict(bank_size=25), r"bank_size must be in \[1, geo_depth=24\]"),
    (dict(bank_size=0), "bank_size must be a positive int"),
    (dict(feature_usage="sparse"), "feature_usage must be one of"),
    (dict(feature_usage="single"), "needs single_layer"),
    (dict(feature_usage="single", single_layer=5), r"single_layer=5 is not in the bank"),
    (dict(single_layer=22), "only used by feature_usage='single'"),
    (dict(projector="per-layer"), "projector must be one of"),
    (dict(fusion="concat"), "fusion must be one of"),
    (dict(gate_granularity="token"), "needs a gated fusion"),
    (dict(fusion="film", gate_granularity="token"), "needs a gated fusion"),
    (dict(gate_granularity="pixel", fusion="gated_2d"), "gate_granularity must be one of"),
    (dict(injection_layers=[3, 3]), "repeated"),
    (dict(injection_layers=[-1]), "non-negative"),
])
def test_invalid_combinations(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GeoAlignConfig(**kwargs)


@pytest.mark.parametrize("options", [dict(projector="split"), dict(fusion="gated_2d")])
def test_fold_output_needs_shared_add(options):
    shape = Shape(L=4, M=3, K=2, G=4)
    fusion = make_fusion(shape, torch.float32, **options)
    q, layers, gi = make_inputs(shape, torch.float32)
    with torch.no_grad(), pytest.raises(ValueError, match="fold_output folds W_out.W2"):
        fusion(q, layers, gi, backend="torch", fold_output=True)


# ------------------------------------------------------------------------------------------------- save / load
ROUND_TRIP = [
    dict(),
    dict(feature_usage="single", single_layer=22),
    dict(feature_usage="dense", bank_selection="uniform", bank_size=6),
    dict(feature_usage="mean", bank_selection="former", projector="split", fusion="film"),
    dict(fusion="gated_2d3d", gate_granularity="token", injection_layers=[27, 9, 18], top_k=3),
    dict(bank_layers=[0, 5, 23], top_k=1, fusion="gated_2d"),
]


@pytest.mark.parametrize("options", ROUND_TRIP, ids=str)
def test_config_round_trip(tmp_path, options):
    cfg = GeoAlignConfig(**options)
    cfg.save_pretrained(tmp_path)
    back = GeoAlignConfig.from_pretrained(tmp_path)
    assert back == cfg and back.to_dict() == cfg.to_dict()


def test_fusion_save_load(tmp_path):
    from geoalign.modeling import load_fusion, save_fusion

    shape = Shape(L=5, M=3, K=2, G=4)
    fusion = make_fusion(shape, torch.float32, projector="split", fusion="gated_2d3d", gate_granularity="token",
                         feature_usage="dense")
    save_fusion(fusion, tmp_path)
    back = load_fusion(tmp_path)
    assert back.config == fusion.config
    q, layers, gi = make_inputs(shape, torch.float32)
    with torch.no_grad():
        assert torch.equal(back(q, layers, gi), fusion(q, layers, gi))


# ------------------------------------------------------------------------------------------------- injection position
def _tiny_with(**options):
    """A tiny random GeoAlign model (geoalign.tiny) whose fusion uses the given config options."""
    from geoalign.modeling import GeoAlignForConditionalGeneration
    from geoalign.tiny import make_tokenizer, tiny_fusion_config, tiny_qwen_config, tiny_vggt_config

    torch.manual_seed(0)
    tok = make_tokenizer()
    cfg = GeoAlignConfig(**{**tiny_fusion_config().to_dict(), **options})
    m = GeoAlignForConditionalGeneration.from_config(tiny_qwen_config(tok), tiny_vggt_config(), cfg)
    with torch.no_grad():
        m.fusion.out_proj.weight.mul_(20.0)  # make the fusion's effect far larger than float noise
    return m, tok


def _count_fusion_calls(m):
    calls = []
    return calls, m.fusion.register_forward_hook(lambda mod, a, out: calls.append(a[0].shape[0]))


def test_injection_deep_copy_uses_its_own_fusion():
    """copy.deepcopy of an in-LLM-injection model: the copy's hooks read the copy's fusion and kept geometry, so
    changing the original afterwards leaves the copy's logits unchanged."""
    pytest.importorskip("transformers")
    import copy

    from geoalign.tiny import build_inputs, random_frames

    m, tok = _tiny_with(injection_layers=(1,))
    m.eval()
    inputs = build_inputs(tok, [random_frames(2, 70, 84, seed=0)], 4)
    with torch.no_grad():
        want = m(**inputs).logits
        twin = copy.deepcopy(m)
        for p in m.fusion.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        assert (m(**inputs).logits - want).abs().max() > 1e-3
        torch.testing.assert_close(twin(**inputs).logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layers", [(0,), (1,), (0, 1)], ids=["early", "late", "multi"])
def test_injection_inside_llm_forward_and_gradients(layers):
    pytest.importorskip("transformers")
    from geoalign.tiny import build_inputs, random_frames

    m, tok = _tiny_with(injection_layers=layers)
    inputs = build_inputs(tok, [random_frames(2, 70, 84, seed=0), random_frames(1, 56, 98, seed=1)], 4, answer="ok")
    labels = inputs["input_ids"].clone()
    labels[inputs["attention_mask"] == 0] = -100
    n_visual = int((inputs["input_ids"] == m.config.image_token_id).sum())
    calls, h = _count_fusion_calls(m)
    m.train()
    try:
        out = m(**inputs, labels=labels)
    finally:
        m.eval()
        h.remove()
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    assert sum(calls) == n_visual * len(layers) and m.vggt_calls == 2  # VGGT once per sample, reused per layer
    out.loss.backward()
    for name, p in m.fusion.named_parameters():
        if name.startswith("layer_norms"):
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    with torch.no_grad():
        with m.without_fusion():
            plain = m(**inputs).logits
        fused = m(**inputs).logits
    assert (fused - plain).abs().max() > 1e-3  # the injection changes the LLM's output


def test_injection_matches_fusion_by_hand():
    """Injection at decoder layer 1 == the fusion (reference) applied by hand to layer 1's visual hidden states."""
    pytest.importorskip("transformers")
    from geoalign.tiny import build_inputs, random_frames

    m, tok = _tiny_with(injection_layers=(1,))
    inputs = build_inputs(tok, [random_frames(2, 56, 56, seed=3)], 4)
    seen = {}
    layer1 = m.model.language_model.layers[1]
    def grab(mod, a, k):
        seen["h"] = a[0].detach().clone()

    hook = layer1.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad(), m.without_fusion():
            m(**inputs)
        h_in = seen.pop("h")
        with torch.no_grad():
            got = m(**inputs, fusion_backend="torch")
    finally:
        hook.remove()
    mask = inputs["input_ids"] == m.config.image_token_id
    cfg = m.fusion.config
    from geoalign.geometry.alignment import build_gather_index, qwen_grid_for_vggt

    frames = inputs["vggt_pixel_values"][0]
    grid = (frames.shape[-2] // 14, frames.shape[-1] // 14)
    gi = build_gather_index(frames.shape[0], grid, qwen_grid_for_vggt(grid), 4)
    with torch.no_grad():
        layers = dict(m.vggt.iter_layers(frames[None], cfg.bank_layers, out_dtype=h_in.dtype))
        bank = [layers[i].reshape(-1, layers[i].shape[-1]) for i in cfg.bank_layers]
        q_hat = m.fusion(h_in[mask], bank, gi, backend="reference")
        h_ref = h_in.masked_scatter(mask[..., None].expand_as(h_in), q_hat)
    # layer 1's input after injection: capture it again under fusion
    seen.clear()
    def grab_after(mod, a, k, out):
        seen["h"] = a[0].detach().clone()

    hook = layer1.register_forward_hook(grab_after, with_kwargs=True)
    try:
        with torch.no_grad():
            m(**inputs)
    finally:
        hook.remove()
    torch.testing.assert_close(seen["h"], h_ref, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(got.logits).all()


def test_injection_generate_fuses_only_at_prefill():
    pytest.importorskip("transformers")
    from geoalign.tiny import build_inputs, random_frames

    m, tok = _tiny_with(injection_layers=(0, 1))
    inputs = build_inputs(tok, [random_frames(2, 56, 56, seed=5)], 4)
    n_visual = int((inputs["input_ids"] == m.config.image_token_id).sum())
    calls, h = _count_fusion_calls(m)
    m.vggt_calls = 0
    try:
        gen = m.generate(**inputs, max_new_tokens=3, do_sample=False)
    finally:
        h.remove()
    assert gen.shape[1] > inputs["input_ids"].shape[1]
    assert calls == [n_visual, n_visual] and m.vggt_calls == 1  # two layers at prefill, nothing while decoding
    assert m.model.injection.kept is None  # inference releases the kept layers


def test_injection_config_errors_and_model_round_trip(tmp_path):
    pytest.importorskip("transformers")
    from geoalign.modeling import GeoAlignForConditionalGeneration
    from geoalign.tiny import build_inputs, random_frames

    with pytest.raises(ValueError, match="out of range for the LLM's 2 decoder layers"):
        _tiny_with(injection_layers=(5,))
    with pytest.raises(ValueError, match="derived for geo_depth=24 layers, but this VGGT has 4"):
        _tiny_with(bank_layers=None, bank_selection="former", bank_size=2)
    m, tok = _tiny_with(injection_layers=(1,), feature_usage="dense", projector="split", fusion="gated_2d",
                        gate_granularity="token", bank_layers=None, bank_selection="uniform", bank_size=2,
                        geo_depth=4)
    assert m.fusion.config.bank_layers == (1, 3)
    inputs = build_inputs(tok, [random_frames(2, 56, 56, seed=5)], 4)
    with torch.no_grad():
        ref = m(**inputs).logits
    m.save_pretrained(tmp_path / "full")
    m2 = GeoAlignForConditionalGeneration.from_pretrained(tmp_path / "full")
    assert m2.fusion.config == m.fusion.config
    with torch.no_grad():
        got = m2(**inputs).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
