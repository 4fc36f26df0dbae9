"""GAP-MLLM's multi-level progressive fusion (geoalign.progressive) on the tiny random model (CPU, fp32).

The model under test has J = 3 levels: ViT blocks (0, 1) + the tower's output, VGGT layers (1, 2, 3), the two
intermediate levels added after decoder layers (0, 1). Parity is against a reference computed by hand from the
module weights: our own block hooks, mergers and window reordering, VGGT layers collected into a plain dict, the
per-level projector and gate written out, and a plain transformers Qwen2.5-VL forward with by-hand hooks.
"""
from __future__ import annotations

import pytest
import torch

from generation_helpers import assert_greedy_by_full_forwards

pytest.importorskip("transformers")

from geoalign.config import GeoAlignConfig  # noqa: E402
from geoalign.geometry.alignment import build_gather_index, qwen_grid_for_vggt  # noqa: E402
from geoalign.modeling import GeoAlignForConditionalGeneration  # noqa: E402
from geoalign.tiny import (build_inputs, make_tokenizer, random_frames, tiny_fusion_config,  # noqa: E402
                           tiny_qwen_config, tiny_vggt_config)
from transformers import Qwen2_5_VLForConditionalGeneration  # noqa: E402

VIT_BLOCKS, GEO_LAYERS, INJECT = (0, 1), (1, 2, 3), (0, 1)
PROGRESSIVE = dict(fusion="gated_2d3d", gate_granularity="token", progressive_vit_blocks=VIT_BLOCKS,
                   progressive_geo_layers=GEO_LAYERS, progressive_inject_layers=INJECT, progressive_vit_hidden=32)


def _config(group_size: int = 4, **options) -> GeoAlignConfig:
    return GeoAlignConfig(**{**tiny_fusion_config(group_size).to_dict(), **PROGRESSIVE, **options})


def _model(seed: int = 0, group_size: int = 4, **options):
    torch.manual_seed(seed)
    tok = make_tokenizer()
    m = GeoAlignForConditionalGeneration.from_config(tiny_qwen_config(tok), tiny_vggt_config(),
                                                     _config(group_size, **options))
    with torch.no_grad():
        for level in m.fusion.levels:  # a random W_out is small: make each level's geometry term far above noise
            level.out_proj.weight.mul_(20.0)
    return m.eval(), tok


@pytest.fixture(scope="module")
def model():
    return _model(seed=0)


def _batch(tok, seed: int, group_size: int = 4):
    """Two samples with different frame counts and sizes (fresh random frames per seed)."""
    return build_inputs(tok, [random_frames(2, 70, 84, seed=seed), random_frames(3, 56, 98, seed=seed + 1)],
                        group_size, answer="ok")


def _geometry_by_hand(level, rows, gi):
    """F = fc2(GELU(fc1(concat_g LN(rows[gi[l, g]])))) [L, D], every op written out."""
    ln = level.layer_norm
    x = torch.nn.functional.layer_norm(rows, (rows.shape[-1],), ln.weight, ln.bias, ln.eps)
    x = x[gi].reshape(gi.shape[0], -1)
    fc1, fc2 = level.projector.fc1, level.projector.fc2
    return torch.nn.functional.gelu(x @ fc1.weight.T + fc1.bias) @ fc2.weight.T + fc2.bias


def _gated_by_hand(level, v, f):
    """v + W_out(sigmoid(w . [v; f] + b) * f), the gate one scalar per token."""
    s = torch.sigmoid(torch.cat([v, f], dim=-1) @ level.gate.weight.T + level.gate.bias)
    assert s.shape == (v.shape[0], 1)
    return v + (s * f) @ level.out_proj.weight.T


def _merge_by_hand(merger, h):
    """Qwen2.5-VL's 2x2 patch merger, written out: RMSNorm over C, 4 contiguous patches -> 4C, MLP -> D."""
    ln = merger.ln_q
    x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + ln.variance_epsilon) * ln.weight
    x = x.reshape(-1, 4 * h.shape[-1])
    lin1, lin2 = merger.mlp[0], merger.mlp[2]
    return torch.nn.functional.gelu(x @ lin1.weight.T + lin1.bias) @ lin2.weight.T + lin2.bias


def _reference_levels(m, inputs, group_size: int = 4):
    """The J levels' fused tokens [L_total, D] computed by hand (last = the pre-LLM visual tokens), and Q."""
    from transformers.vision_utils import get_vision_window_index

    vis = m.model.visual
    G = group_size
    vit_blocks, geo_layers = m.fusion.config.progressive_vit_blocks, m.fusion.config.progressive_geo_layers
    grid = inputs["image_grid_thw" if G == 4 else "video_grid_thw"]
    outs = {}
    hooks = [vis.blocks[b].register_forward_hook(lambda mod, a, o, b=b: outs.__setitem__(b, o)) for b in vit_blocks]
    try:
        with torch.no_grad():
            q = vis(inputs["pixel_values" if G == 4 else "pixel_values_videos"], grid_thw=grid).pooler_output
    finally:
        for h in hooks:
            h.remove()
    window_index, _ = get_vision_window_index(grid, 2, vis.window_size, vis.patch_size)
    back = torch.argsort(window_index)
    views = [_merge_by_hand(m.fusion.mergers[j], outs[b])[back] for j, b in enumerate(vit_blocks)] + [q]
    fused = [[] for _ in geo_layers]
    off = 0
    with torch.no_grad():
        for frames in inputs["vggt_pixel_values"]:
            vg = (frames.shape[-2] // 14, frames.shape[-1] // 14)
            gi = build_gather_index(frames.shape[0], vg, qwen_grid_for_vggt(vg), G)
            every = dict(m.vggt.iter_layers(frames[None]))  # all VGGT layers, held as a plain dict
            L = gi.shape[0]
            for j, layer in enumerate(geo_layers):
                rows = every[layer].reshape(-1, every[layer].shape[-1])
                f = _geometry_by_hand(m.fusion.levels[j], rows, gi)
                fused[j].append(_gated_by_hand(m.fusion.levels[j], views[j][off:off + L], f))
            off += L
    assert off == q.shape[0]
    return [torch.cat(parts) for parts in fused], q


def _plain_qwen(m, tok):
    """transformers' own Qwen2.5-VL with the GeoAlign model's Qwen weights (no VGGT, no fusion, no hooks)."""
    plain = Qwen2_5_VLForConditionalGeneration._from_config(tiny_qwen_config(tok))
    state = {k: v for k, v in m.state_dict().items() if not k.startswith(("model.vggt.", "model.fusion."))}
    plain.load_state_dict(state, strict=True)
    return plain.eval()


def _plain_forward_by_hand(plain, inputs, fused, mask, add_intermediate=True, inject=INJECT):
    """Plain Qwen forward: visual tokens replaced by fused[-1]; fused[j] added after decoder layer inject[j]."""
    hooks = []

    def replace(mod, args, kwargs):
        e = kwargs["inputs_embeds"]
        kwargs["inputs_embeds"] = e.masked_scatter(mask[..., None].expand_as(e), fused[-1])
        return args, kwargs

    hooks.append(plain.model.language_model.register_forward_pre_hook(replace, with_kwargs=True))
    if add_intermediate:
        for j, k in enumerate(inject):
            def add(mod, args, out, j=j):
                extra = torch.zeros_like(out).masked_scatter(mask[..., None].expand_as(out), fused[j])
                return out + extra
            hooks.append(plain.model.language_model.layers[k].register_forward_hook(add))
    qwen_inputs = {k: v for k, v in inputs.items() if k != "vggt_pixel_values"}
    try:
        with torch.no_grad():
            return plain(**qwen_inputs).logits
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("group_size,inject", [(4, INJECT), (8, INJECT), (4, (1, 0))],
                         ids=["images", "video", "images-level0-after-layer1"])
def test_logits_and_fused_tokens_match_a_by_hand_reference(model, group_size, inject):
    """inject (1, 0): level 0 enters after decoder layer 1 and level 1 after layer 0, so a level's own index and
    its decoder layer differ (every other config here has level j at layer j)."""
    if inject != INJECT:
        m, tok = _model(seed=4, progressive_inject_layers=inject)
    else:
        m, tok = model if group_size == 4 else _model(seed=2, group_size=8)
    inputs = _batch(tok, seed=11, group_size=group_size)
    mask = inputs["input_ids"] == (m.config.image_token_id if group_size == 4 else m.config.video_token_id)
    expected, q = _reference_levels(m, inputs, group_size)

    seen = {}
    def grab_llm_input(mod, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"].detach().clone()
    kept_by_model = []
    keep = m.model.progressive_injection.keep
    m.model.progressive_injection.keep = lambda kept: (kept_by_model.append(kept), keep(kept))
    h = m.model.language_model.register_forward_pre_hook(grab_llm_input, with_kwargs=True)
    m.vggt_calls = 0
    try:
        with torch.no_grad():
            got = m(**inputs).logits
    finally:
        h.remove()
        del m.model.progressive_injection.keep
    assert m.vggt_calls == 2  # one VGGT pass per sample for all three levels
    # fused tokens (fp32; tolerance 1e-5 abs / rel): the last level enters the LLM, the others are kept for the hooks
    torch.testing.assert_close(seen["embeds"][mask], expected[-1], rtol=1e-5, atol=1e-5)
    assert len(kept_by_model) == 1 and len(kept_by_model[0].tokens) == 2
    for j in range(2):
        torch.testing.assert_close(kept_by_model[0].tokens[j], expected[j], rtol=1e-5, atol=1e-5)
    assert (expected[-1] - q).abs().max() > 1e-2, "the last level should change the visual tokens"

    plain = _plain_qwen(m, tok)
    ref = _plain_forward_by_hand(plain, inputs, expected, mask, inject=inject)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # the intermediate additions matter (so the comparison above would catch them missing or misplaced)
    without = _plain_forward_by_hand(plain, inputs, expected, mask, add_intermediate=False, inject=inject)
    assert (without - ref).abs().max() > 1e-3
    swapped = _plain_forward_by_hand(plain, inputs, [expected[1], expected[0], expected[2]], mask, inject=inject)
    assert (swapped - ref).abs().max() > 1e-3
    identity = _plain_forward_by_hand(plain, inputs, expected, mask, inject=tuple(range(len(inject))))
    assert inject == tuple(range(len(inject))) or (identity - ref).abs().max() > 1e-3   # level j at layer j differs


def test_gradients_reach_levels_and_mergers_not_vggt():
    m, tok = _model(seed=1)
    inputs = _batch(tok, seed=21)
    labels = inputs["input_ids"].clone()
    labels[inputs["attention_mask"] == 0] = -100
    m.train()
    try:
        out = m(**inputs, labels=labels)
    finally:
        m.eval()
    out.loss.backward()
    names = [n for n, _ in m.fusion.named_parameters()]
    assert any(n.startswith("mergers.1.") for n in names) and any(n.startswith("levels.2.gate") for n in names)
    for name, p in m.fusion.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert all(p.grad is None and not p.requires_grad for p in m.vggt.parameters())
    assert all(p.grad is None and not p.requires_grad for p in m.model.visual.parameters())
    # with gradient checkpointing the decoder hooks run again in the recompute: same loss and gradients (tol 1e-6)
    ref = {n: p.grad.clone() for n, p in m.fusion.named_parameters()}
    m.zero_grad(set_to_none=True)
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    m.train()
    try:
        again = m(**inputs, labels=labels)
    finally:
        m.eval()
    again.loss.backward()
    torch.testing.assert_close(again.loss, out.loss, rtol=0, atol=1e-6)
    for name, p in m.fusion.named_parameters():
        torch.testing.assert_close(p.grad, ref[name], rtol=1e-6, atol=1e-6)


def test_generate_runs_vggt_once_and_adds_only_at_prefill(model):
    m, tok = model
    inputs = build_inputs(tok, [random_frames(2, 56, 84, seed=31)], 4)
    mask = inputs["input_ids"] == m.config.image_token_id
    calls = []
    orig = m.vggt.iter_layers

    def counting(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    records = {k: [] for k in INJECT}  # per decoder-layer call: (output before our hook, output after it)
    hooks = []
    for k in INJECT:
        layer = m.model.language_model.layers[k]
        hooks.append(layer.register_forward_hook(lambda mod, a, o, k=k: records[k].append([o.detach().clone()]),
                                                 prepend=True))
        hooks.append(layer.register_forward_hook(lambda mod, a, o, k=k: records[k][-1].append(o.detach().clone())))
    m.vggt.iter_layers = counting
    try:
        gen = m.generate(**inputs, max_new_tokens=3, do_sample=False)
    finally:
        del m.vggt.iter_layers
        for h in hooks:
            h.remove()
    new = gen[:, inputs["input_ids"].shape[1]:]
    assert new.shape[1] == 3 and len(calls) == 1
    expected, _ = _reference_levels(m, inputs)
    for j, k in enumerate(INJECT):
        (before, after), *steps = records[k]
        assert len(steps) == 2  # two cached decoding steps after the prefill
        torch.testing.assert_close(after - before, torch.zeros_like(before).masked_scatter(
            mask[..., None].expand_as(before), expected[j]), rtol=1e-5, atol=1e-5)
        for b, a in steps:
            assert b.shape[1] == 1 and torch.equal(a, b)  # decoding steps: no additions
    # decoding is unchanged: greedy by full forwards (no cache) gives the same tokens
    assert_greedy_by_full_forwards(m, inputs, new)


def test_save_pretrained_round_trip(model, tmp_path):
    from geoalign.serialization import load_fusion

    m, tok = model
    inputs = _batch(tok, seed=41)
    with torch.no_grad():
        ref = m(**inputs).logits
    m.save_pretrained(tmp_path / "full")
    m2 = GeoAlignForConditionalGeneration.from_pretrained(tmp_path / "full")
    assert m2.fusion.config == m.fusion.config and m2.fusion.config.progressive_inject_layers == INJECT
    sd, sd2 = m.fusion.state_dict(), m2.fusion.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    with torch.no_grad():
        got = m2(**inputs).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    m.save_fusion(tmp_path / "fusion")                      # the fusion-only files carry the levels and mergers too
    back = load_fusion(tmp_path / "fusion")
    assert back.config == m.fusion.config
    assert all(torch.equal(back.state_dict()[k], sd[k]) for k in sd)


@pytest.mark.parametrize("options, field", [
    (dict(progressive_vit_blocks=(0,)), "progressive_vit_blocks"),                 # J-1 = 2 needed
    (dict(progressive_inject_layers=(0, 1, 1)), "progressive_inject_layers"),     # J-1 = 2 needed
    (dict(progressive_geo_layers=()), "progressive_geo_layers"),                   # levels without VGGT layers
    (dict(progressive_geo_layers=(1, 3, 2)), "progressive_geo_layers"),            # not increasing
    (dict(progressive_vit_blocks=(1, 0)), "progressive_vit_blocks"),               # not increasing
    (dict(progressive_inject_layers=(1, 1)), "progressive_inject_layers"),        # repeated
    (dict(progressive_geo_layers=(-1, 2, 3)), "progressive_geo_layers"),           # negative
    (dict(progressive_vit_hidden=0), "progressive_vit_hidden"),
    (dict(injection_layers=(1,)), "injection_layers"),                             # two in-LLM mechanisms
    (dict(fusion="add", gate_granularity="channel"), "gated_2d3d"),               # the levels are token-gated
])
def test_bad_configs_raise_naming_the_field(options, field):
    with pytest.raises(ValueError, match=field):
        _config(**options)


@pytest.mark.parametrize("options, field", [
    (dict(progressive_vit_blocks=(0, 2)), "progressive_vit_blocks"),   # the tiny tower has 2 blocks
    (dict(progressive_geo_layers=(1, 2, 4)), "progressive_geo_layers"),  # tiny VGGT has 4 layers
    (dict(progressive_inject_layers=(0, 2)), "progressive_inject_layers"),  # the tiny LLM has 2 decoder layers
    (dict(progressive_vit_hidden=64), "progressive_vit_hidden"),       # the tiny ViT width is 32
])
def test_ids_out_of_range_for_the_model_raise(options, field):
    with pytest.raises(ValueError, match=field):
        _model(**options)


def test_config_round_trip_and_off_by_default():
    cfg = _config()
    d = cfg.to_dict()
    assert d["progressive_geo_layers"] == [1, 2, 3] and GeoAlignConfig.from_dict(d) == cfg
    assert not tiny_fusion_config().is_progressive and tiny_fusion_config().to_dict()["progressive_geo_layers"] == []


def test_routed_bank_entry_points_refuse(model):
    m, tok = model
    q = torch.zeros(3, m.fusion.config.hidden_size)
    with pytest.raises(ValueError, match="progressive"):
        m.fusion(q, [], torch.zeros(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="progressive"):
        m.fusion.route(q)
    with pytest.raises(ValueError, match="progressive"):
        with m.record_routing():
            pass
    with pytest.raises(ValueError, match="progressive"):
        m.fuse_visual_tokens(q, torch.tensor([[1, 2, 6]]), [random_frames(1, 28, 84)])


def test_vggt_layers_are_streamed_into_their_levels(model):
    """Only the J layers are asked of VGGT, and each level is computed as its layer arrives, before the next one."""
    m, tok = model
    inputs = build_inputs(tok, [random_frames(2, 56, 56, seed=51)], 4)
    events, asked = [], []
    orig = m.vggt.iter_layers

    def logging_layers(images, layers=None, **kw):
        asked.append(tuple(layers))
        for layer_id, tokens in orig(images, layers, **kw):
            events.append(("vggt", layer_id))
            yield layer_id, tokens
            events.append(("next", layer_id))

    hooks = [level.register_forward_hook(lambda mod, a, o, j=j: events.append(("level", j)))
             for j, level in enumerate(m.fusion.levels)]
    m.vggt.iter_layers = logging_layers
    try:
        with torch.no_grad():
            m(**inputs)
    finally:
        del m.vggt.iter_layers
        for h in hooks:
            h.remove()
    assert asked == [GEO_LAYERS]
    expected = []
    for j, layer in enumerate(GEO_LAYERS):
        expected += [("vggt", layer), ("level", j), ("next", layer)]
    assert events == expected


def test_one_level_is_a_gated_fusion_of_the_tower_output():
    """J = 1: no mergers, no decoder hooks, the tower's output fused with one VGGT layer."""
    m, tok = _model(seed=3, progressive_vit_blocks=(), progressive_geo_layers=(2,), progressive_inject_layers=())
    assert len(m.fusion.levels) == 1 and len(m.fusion.mergers) == 0
    inputs = _batch(tok, seed=61)
    mask = inputs["input_ids"] == m.config.image_token_id
    expected, q = _reference_levels(m, inputs)
    seen = {}
    h = m.model.language_model.register_forward_pre_hook(
        lambda mod, a, k: seen.__setitem__("embeds", k["inputs_embeds"].detach().clone()), with_kwargs=True)
    try:
        with torch.no_grad():
            m(**inputs)
    finally:
        h.remove()
    torch.testing.assert_close(seen["embeds"][mask], expected[0], rtol=1e-5, atol=1e-5)
    assert (expected[0] - q).abs().max() > 1e-2
    assert m.model.progressive_injection.kept is None


def test_a_deep_copy_runs_on_its_own_weights_and_kept_tokens():
    """copy.deepcopy (EMA / teacher copies) re-binds the decoder hooks to the copy: its logits equal the original's,
    and stay so when the original's weights change afterwards (hooks that closed over the original read its
    kept tokens and fusion)."""
    import copy

    m, tok = _model()
    inputs = build_inputs(tok, [random_frames(2)], 4)
    with torch.no_grad():
        want = m(**inputs).logits
        twin = copy.deepcopy(m)
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        changed = m(**inputs).logits
        got = twin(**inputs).logits
    assert (changed - want).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_eval_save_routing_refuses_a_model_without_routing():
    from geoalign.eval.predictor import GeoAlignPredictor

    m, tok = _model()
    with pytest.raises(ValueError, match="progressive fusion, which has no such routing"):
        GeoAlignPredictor(m, None, device="cpu", save_routing=True)
    GeoAlignPredictor(m, None, device="cpu")                     # without the flag it is a normal predictor


def test_the_progressive_fusion_is_its_own_module_chosen_by_config():
    """GeoAlignFusion(config) builds a ProgressiveFusion for a progressive config (its own class: levels and mergers,
    no routed bank) and a GeoAlignFusion otherwise; the parameter names are the checkpoint contract either way."""
    from geoalign.fusion import GeoAlignFusion
    from geoalign.progressive import ProgressiveFusion

    fusion = GeoAlignFusion(_config())
    assert type(fusion) is ProgressiveFusion and not isinstance(fusion, GeoAlignFusion)
    names = {n.split(".")[0] for n, _ in fusion.named_parameters()}
    assert names == {"levels", "mergers"}
    routed = GeoAlignFusion(tiny_fusion_config(4))
    assert type(routed) is GeoAlignFusion and not hasattr(routed, "levels")
    with pytest.raises(ValueError, match="needs a config with progressive_geo_layers"):
        ProgressiveFusion(tiny_fusion_config(4))
