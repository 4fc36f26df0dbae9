"""GeoAlign used the way transformers' own Qwen2.5-VL is used (issue 34): the base model on its own inputs,
get_image_features given the geometry, return_dict as Qwen honours it, every meta-device loading path, offloading
with a device_map, from_pretrained(None, config=, state_dict=), beam search and several returned sequences, AutoModel.
Each test here failed before that issue's fixes."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from geoalign.geometry.aggregator import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from geoalign.modeling import GeoAlignForConditionalGeneration, GeoAlignModel  # noqa: E402
from geoalign.tiny import build_inputs, random_frames, tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def model4():
    m, tok = tiny_model(4, seed=0)
    with torch.no_grad():
        m.fusion.out_proj.weight.mul_(20.0)  # the fusion's effect on the LLM input far above float noise
    return m.eval(), tok


@pytest.fixture(scope="module")
def saved(model4, tmp_path_factory):
    m, _ = model4
    path = tmp_path_factory.mktemp("saved") / "m"
    m.save_pretrained(path)
    return path


def _two(tok, group_size=4):
    return build_inputs(tok, [random_frames(2, 56, 70, seed=3), random_frames(3, 70, 56, seed=4)], group_size)


def _logits(m, inputs):
    with torch.no_grad():
        return m(**inputs).logits


# ---------------------------------------------------------------------------------------- the base model's own inputs
def test_base_model_runs_on_its_own_inputs(model4):
    m, tok = model4
    inputs = _two(tok)
    with torch.no_grad():
        base = m.model(**inputs)
        full = m(**inputs, output_hidden_states=True)
    torch.testing.assert_close(base.last_hidden_state, full.hidden_states[-1], rtol=0, atol=0)
    torch.testing.assert_close(m.lm_head(base.last_hidden_state), full.logits, rtol=0, atol=0)
    with torch.no_grad(), m.without_fusion():
        plain = m.model(**{k: v for k, v in inputs.items() if k != "vggt_pixel_values"})
    assert (plain.last_hidden_state - base.last_hidden_state).abs().max() > 1e-3  # the geometry was fused
    no_frames = {k: v for k, v in inputs.items() if k != "vggt_pixel_values"}
    with pytest.raises(ValueError, match="needs the frames for VGGT: pass vggt_pixel_values"):
        m.model(**no_frames)


def test_get_image_features_takes_the_geometry_and_honours_return_dict(model4):
    m, tok = model4
    inputs = _two(tok)
    pv, grid, frames = inputs["pixel_values"], inputs["image_grid_thw"], inputs["vggt_pixel_values"]
    with torch.no_grad():
        given = m.model.get_image_features(pv, grid, vggt_pixel_values=frames)
        with m.geometry(frames, pixel_values=pv):
            in_context = m.model.get_image_features(pv, grid)
        with m.without_fusion():
            tower = m.model.get_image_features(pv, grid)
    assert len(given.pooler_output) == 5  # one entry per image, as Qwen splits them
    for a, b, t in zip(given.pooler_output, in_context.pooler_output, tower.pooler_output):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert (a - t).abs().max() > 1e-3
    with torch.no_grad():
        as_tuple = m.model.get_image_features(pv, grid, vggt_pixel_values=frames, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(torch.cat(as_tuple[1]), torch.cat(given.pooler_output), rtol=0, atol=0)
    m.model.config.return_dict = False
    try:
        with torch.no_grad():
            by_config = m.model.get_image_features(pv, grid, vggt_pixel_values=frames)
    finally:
        m.model.config.return_dict = True
    assert isinstance(by_config, tuple)
    with torch.no_grad(), m.geometry(frames, pixel_values=pv):
        with pytest.raises(ValueError, match="given twice"):
            m.model.get_image_features(pv, grid, vggt_pixel_values=frames)


def test_video_into_an_image_model_is_a_clear_error(model4):
    m, tok = model4
    video = build_inputs(tok, [random_frames(2, 56, 56, seed=5)], 8)
    with pytest.raises(ValueError, match="G=4 and fuses images"):
        m.model.get_video_features(video["pixel_values_videos"], video["video_grid_thw"],
                                   vggt_pixel_values=video["vggt_pixel_values"])
    with pytest.raises(ValueError, match="G=4 and fuses images"):
        m.generate(**video, max_new_tokens=1)


# ------------------------------------------------------------------------------------------ meta-device loading paths
def _assert_vggt_buffers(model):
    vggt = model.vggt if hasattr(model, "vggt") else model.model.vggt
    torch.testing.assert_close(vggt._resnet_mean.flatten(), torch.tensor(IMAGENET_MEAN), rtol=0, atol=0)
    torch.testing.assert_close(vggt._resnet_std.flatten(), torch.tensor(IMAGENET_STD), rtol=0, atol=0)


@pytest.mark.parametrize("path", ["base class", "wrapper", "device_map auto", "init_empty_weights + assign"])
def test_every_meta_device_path_yields_correct_buffers_and_logits(model4, saved, path):
    m, tok = model4
    inputs = _two(tok)
    if path == "base class":
        base = GeoAlignModel.from_pretrained(saved)
        _assert_vggt_buffers(base)
        with torch.no_grad():
            hidden = base(**inputs).last_hidden_state
        torch.testing.assert_close(m.lm_head(hidden), _logits(m, inputs), rtol=0, atol=0)
        return
    if path == "wrapper":
        back = GeoAlignForConditionalGeneration.from_pretrained(saved)
    elif path == "device_map auto":
        back = GeoAlignForConditionalGeneration.from_pretrained(saved, device_map="auto")
    else:
        from accelerate import init_empty_weights

        with init_empty_weights():  # parameters on meta, buffers real (as for every transformers model)
            back = GeoAlignForConditionalGeneration.from_config(m.config)
        back.load_state_dict(m.state_dict(), assign=True)
        back.tie_weights()
        back.eval()
    _assert_vggt_buffers(back)
    torch.testing.assert_close(_logits(back, inputs), _logits(m, inputs), rtol=0, atol=0)


def test_from_pretrained_with_a_config_and_a_state_dict(model4):
    m, tok = model4
    back = GeoAlignForConditionalGeneration.from_pretrained(None, config=m.config, state_dict=m.state_dict())
    inputs = _two(tok)
    torch.testing.assert_close(_logits(back.eval(), inputs), _logits(m, inputs), rtol=0, atol=0)
    partial = {k: v for k, v in m.state_dict().items() if not k.startswith("model.fusion.")}
    with pytest.raises(ValueError, match="lacks GeoAlign weights"):
        GeoAlignForConditionalGeneration.from_pretrained(None, config=m.config, state_dict=partial)


@pytest.mark.parametrize("cls", [GeoAlignModel, GeoAlignForConditionalGeneration])
def test_a_checkpoint_without_geoalign_weights_is_refused(model4, saved, tmp_path, cls):
    """Both classes refuse a checkpoint lacking the fusion / VGGT weights, naming them (before, the base class
    loaded it with those weights left uninitialised)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(saved, tmp_path / "m")
    weights = load_file(tmp_path / "m" / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("model.fusion.")},
              tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks GeoAlign weights \['(model\.)?fusion\."):
        cls.from_pretrained(tmp_path / "m")


# ------------------------------------------------------------------------------------------------------- offloading
@pytest.mark.parametrize("where", [{"model.vggt": "disk"}, {"model.fusion": "disk"},
                                   {"model.vggt": "disk", "model.fusion": "disk"}])
def test_offloaded_vggt_and_fusion_give_the_same_logits(model4, saved, tmp_path, where):
    m, tok = model4
    device_map = {"model.visual": "cpu", "model.language_model": "cpu", "lm_head": "cpu",
                  "model.vggt": "cpu", "model.fusion": "cpu", **where}
    back = GeoAlignForConditionalGeneration.from_pretrained(saved, device_map=device_map,
                                                            offload_folder=str(tmp_path / "offload"))
    part = back.model.vggt if "model.vggt" in where else back.model.fusion
    assert any(p.is_meta for p in part.parameters())  # really offloaded: no weights held between calls
    inputs = _two(tok)
    torch.testing.assert_close(_logits(back, inputs), _logits(m, inputs), rtol=0, atol=0)
    assert any(p.is_meta for p in part.parameters())  # and given back after the call
    gen = back.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert torch.equal(gen, m.generate(**inputs, max_new_tokens=2, do_sample=False))


def test_device_map_auto_with_a_tight_memory_budget(model4, saved, tmp_path):
    m, tok = model4
    size = sum(p.numel() * p.element_size() for p in m.parameters())
    back = GeoAlignForConditionalGeneration.from_pretrained(saved, device_map="auto",
                                                            max_memory={"cpu": int(size * 0.4)},
                                                            offload_folder=str(tmp_path / "offload"))
    assert "disk" in set(back.hf_device_map.values())
    inputs = _two(tok)
    torch.testing.assert_close(_logits(back, inputs), _logits(m, inputs), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------- beam search
def _sequence_log_probs(m, inputs, sequences):
    """Sum of log p(token) of each row's generated tokens, by one full forward per row (no cache, no expansion)."""
    prompt = inputs["input_ids"].shape[1]
    out = []
    for row in range(sequences.shape[0]):
        b = row // (sequences.shape[0] // inputs["input_ids"].shape[0])
        ids = sequences[row:row + 1]
        one = build_inputs_like(inputs, b, ids)
        with torch.no_grad():
            logp = m(**one).logits.log_softmax(-1)[0, prompt - 1:-1]
        out.append(logp.gather(-1, ids[0, prompt:, None]).sum())
    return torch.stack(out)


def build_inputs_like(inputs, b, ids):
    """Sample b of a batch built by geoalign.tiny.build_inputs, with ``ids`` [1, T'] (prompt + generated tokens)."""
    grids = inputs["image_grid_thw"]
    frames = [f.shape[0] for f in inputs["vggt_pixel_values"]]
    first = sum(frames[:b])
    rows = [int(g.prod()) for g in grids]
    start = sum(rows[:first])
    stop = start + sum(rows[first:first + frames[b]])
    att = torch.cat([inputs["attention_mask"][b:b + 1],
                     torch.ones(1, ids.shape[1] - inputs["attention_mask"].shape[1], dtype=torch.int64)], dim=1)
    one = dict(input_ids=ids, attention_mask=att, pixel_values=inputs["pixel_values"][start:stop],
               image_grid_thw=grids[first:first + frames[b]], vggt_pixel_values=[inputs["vggt_pixel_values"][b]])
    if "mm_token_type_ids" in inputs:
        mm = inputs["mm_token_type_ids"][b:b + 1]
        one["mm_token_type_ids"] = torch.cat([mm, torch.zeros(1, ids.shape[1] - mm.shape[1], dtype=torch.int64)], 1)
    return one


def test_beam_search_scores_match_full_forwards_and_vggt_runs_once_per_sample(model4):
    m, tok = model4
    inputs = _two(tok)
    m.vggt_calls = 0
    out = m.generate(**inputs, max_new_tokens=3, min_new_tokens=3, num_beams=3, num_return_sequences=3,
                     do_sample=False, length_penalty=0.0, return_dict_in_generate=True, output_scores=True)
    assert m.vggt_calls == 2  # once per sample, not per beam
    assert out.sequences.shape[0] == 2 * 3
    # each returned beam's score is its sum of log-probabilities under the model's full (unexpanded) forward:
    # the geometry each beam copy was fused with is its own sample's
    torch.testing.assert_close(out.sequences_scores, _sequence_log_probs(m, inputs, out.sequences),
                               rtol=1e-4, atol=1e-4)


def test_sampling_several_sequences(model4):
    m, tok = model4
    inputs = _two(tok)
    m.vggt_calls = 0
    torch.manual_seed(0)
    gen = m.generate(**inputs, max_new_tokens=2, do_sample=True, num_return_sequences=2)
    assert gen.shape[0] == 4 and m.vggt_calls == 2


def test_beam_search_without_fusion_is_plain_qwen(model4):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    m, tok = model4
    inputs = _two(tok)
    qwen_inputs = {k: v for k, v in inputs.items() if k != "vggt_pixel_values"}
    qwen = Qwen2_5_VLForConditionalGeneration._from_config(Qwen2_5_VLConfig(**m.config.to_dict()))
    state = {k: v for k, v in m.state_dict().items() if not k.startswith(("model.vggt.", "model.fusion."))}
    qwen.load_state_dict(state, strict=True)
    qwen.generation_config = m.generation_config
    kw = dict(max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    with m.without_fusion():
        ours = m.generate(**qwen_inputs, **kw)
    assert torch.equal(ours, qwen.eval().generate(**qwen_inputs, **kw))


# ------------------------------------------------------------------------------------------------------ Auto classes
def test_auto_model_builds_the_base_model(model4, saved):
    from transformers import AutoModel

    m, _ = model4
    assert type(AutoModel.from_config(m.config)) is GeoAlignModel
    base = AutoModel.from_pretrained(saved)
    assert type(base) is GeoAlignModel
    _assert_vggt_buffers(base)


# ------------------------------------------------------------------------------ what the review of issue 34 found
def test_routing_is_recorded_in_sample_order_and_once_per_sample(model4):
    """A batch reusing one frames tensor ([f, g, f]) records three samples in batch order; beam copies (the same
    sample) are recorded once, whichever side of the expansion transformers encodes the pixels on."""
    m, tok = model4
    f, g = random_frames(2, 56, 56, seed=8), random_frames(3, 56, 56, seed=9)
    with torch.no_grad():
        out = m(**build_inputs(tok, [f, g, f], 4), return_routing=True)
    assert [r.num_frames for r in out.routing] == [2, 3, 2]
    with m.record_routing() as recorder:
        m.generate(**_two(tok), max_new_tokens=2, num_beams=3, do_sample=False)
    assert [r.num_frames for r in recorder.samples] == [2, 3]


def test_explicit_geometry_inside_an_active_context_is_an_error(model4):
    m, tok = model4
    inputs = _two(tok)
    with torch.no_grad(), m.geometry(inputs["vggt_pixel_values"], pixel_values=inputs["pixel_values"]):
        with pytest.raises(ValueError, match="given twice"):
            m(**inputs)


def test_an_offloaded_fusion_cannot_be_replaced_or_trained(model4, saved, tmp_path):
    m, tok = model4
    device_map = {"model.visual": "cpu", "model.language_model": "cpu", "lm_head": "cpu", "model.vggt": "cpu",
                  "model.fusion": "disk"}
    back = GeoAlignForConditionalGeneration.from_pretrained(saved, device_map=device_map,
                                                            offload_folder=str(tmp_path / "offload"))
    m.save_fusion(tmp_path / "fusion")
    with pytest.raises(ValueError, match="fusion is offloaded by a device_map"):
        back.load_fusion(tmp_path / "fusion")
    inputs = _two(tok)
    back.fusion.requires_grad_(True)
    with pytest.raises(RuntimeError, match="is offloaded .* trainable parameters"):
        back(**inputs)  # autograd on: the fusion's gradients would be dropped with its weights
    torch.testing.assert_close(_logits(back, inputs), _logits(m, inputs), rtol=0, atol=0)  # no_grad: fine
