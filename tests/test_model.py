"""GeoAlignForConditionalGeneration on a tiny random Qwen2.5-VL + tiny VGGT + tiny fusion (CPU)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from generation_helpers import assert_greedy_by_full_forwards

pytest.importorskip("transformers")

from geoalign.tiny import build_inputs, random_frames, tiny_model  # noqa: E402

from geoalign.geometry.alignment import build_gather_index  # noqa: E402
from geoalign.modeling import GeoAlignForConditionalGeneration, load_fusion  # noqa: E402
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration  # noqa: E402


@pytest.fixture(scope="module")
def model4():
    m, tok = tiny_model(4, seed=0)
    _boost(m)
    return m, tok


@pytest.fixture(scope="module")
def model8():
    m, tok = tiny_model(8, seed=1)
    _boost(m)
    return m, tok


def _boost(m):
    # A random W_out is small; scale it so the fusion's effect on the LLM input is far above float noise.
    with torch.no_grad():
        m.fusion.out_proj.weight.mul_(20.0)


def _batch(tok, group_size):
    # two samples with different frame counts and frame sizes
    samples = [random_frames(2, 70, 84, seed=0), random_frames(3, 56, 98, seed=1)]
    return build_inputs(tok, samples, group_size, answer="ok")


def _small(tok, group_size=4):
    return build_inputs(tok, [random_frames(2, 56, 56, seed=5)], group_size)


def _capture_llm_input(m):
    seen = {}

    def pre_hook(module, args, kwargs):
        seen["inputs_embeds"] = kwargs["inputs_embeds"].detach().clone()

    lm = m.model.language_model
    return seen, lm.register_forward_pre_hook(pre_hook, with_kwargs=True)


def _by_hand(m, inputs, group_size):
    """GeoAlignFusion (reference backend) applied by hand to the vision tower output with the VGGT layers."""
    key = "pixel_values" if group_size == 4 else "pixel_values_videos"
    gkey = "image_grid_thw" if group_size == 4 else "video_grid_thw"
    with torch.no_grad(), m.without_fusion():
        out = m.model.visual(inputs[key], grid_thw=inputs[gkey])
    q = out.pooler_output if hasattr(out, "pooler_output") else out
    cfg = m.fusion.config
    ps = m.vggt.patch_start_idx
    fused, off = [], 0
    for frames in inputs["vggt_pixel_values"]:
        S, _, H, W = frames.shape
        gi = build_gather_index(S, (H // 14, W // 14), group_size=group_size)
        L = gi.shape[0]
        all_layers = m.vggt(frames[None])                                  # every layer, special tokens included
        bank = [all_layers[i][:, :, ps:].reshape(-1, cfg.geo_dim) for i in cfg.bank_layers]
        with torch.no_grad():
            fused.append(m.fusion(q[off:off + L], bank, gi, backend="reference"))
        off += L
    assert off == q.shape[0]
    return q, torch.cat(fused)


@pytest.mark.parametrize("group_size", [4, 8])
def test_fused_tokens_match_fusion_by_hand(model4, model8, group_size):
    m, tok = model4 if group_size == 4 else model8
    inputs = _batch(tok, group_size)
    q, expected = _by_hand(m, inputs, group_size)
    seen, h = _capture_llm_input(m)
    try:
        with torch.no_grad():
            out = m(**inputs)
    finally:
        h.remove()
    pad = m.config.image_token_id if group_size == 4 else m.config.video_token_id
    mask = inputs["input_ids"] == pad
    got = seen["inputs_embeds"][mask]
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (expected - q).abs().max() > 1e-2, "the fusion should change the visual tokens"
    assert torch.isfinite(out.logits).all()
    # the whole model with backend='reference' gives the same logits as the streaming sparse backend
    with torch.no_grad():
        ref = m(**inputs, fusion_backend="reference")
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)


def test_forward_loss_and_gradients(model4):
    m, tok = model4
    inputs = _batch(tok, 4)
    labels = inputs["input_ids"].clone()
    labels[inputs["attention_mask"] == 0] = -100
    m.zero_grad(set_to_none=True)
    m.train()
    try:
        out = m(**inputs, labels=labels)
    finally:
        m.eval()
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    out.loss.backward()
    for name in ("projector.fc1.weight", "projector.fc2.weight", "router.fc1.weight", "router.fc2.weight",
                 "out_proj.weight"):
        g = dict(m.fusion.named_parameters())[name].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.fusion.layer_norms.parameters())
    assert all(p.grad is None and not p.requires_grad for p in m.vggt.parameters())
    assert all(p.grad is None and not p.requires_grad for p in m.model.visual.parameters())
    assert m.vggt.training is False
    m.zero_grad(set_to_none=True)


def test_video_path_odd_frames_and_batch(model8):
    m, tok = model8
    inputs = build_inputs(tok, [random_frames(3, 70, 84, seed=2), random_frames(4, 70, 70, seed=3)], 8)
    assert inputs["video_grid_thw"].tolist() == [[2, 4, 6], [2, 4, 4]]
    m.vggt_calls = 0
    with torch.no_grad():
        out = m(**inputs)
    assert torch.isfinite(out.logits).all()
    assert m.vggt_calls == 2


def test_generate_runs_vggt_once_per_sample_and_matches_greedy(model4):
    m, tok = model4
    samples = [random_frames(2, 70, 84, seed=4)]
    inputs = build_inputs(tok, samples, 4)
    calls = []
    orig = m.vggt.iter_layers

    def counting(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    m.vggt.iter_layers = counting
    try:
        gen = m.generate(**inputs, max_new_tokens=2, do_sample=False)
    finally:
        del m.vggt.iter_layers
    assert len(calls) == 1
    new = gen[:, inputs["input_ids"].shape[1]:]
    assert new.shape[1] >= 1
    # greedy decoding by full forwards (no cache) gives the same tokens
    assert_greedy_by_full_forwards(m, inputs, new)


@pytest.mark.slow
def test_generate_batch_counts_vggt_per_sample(model4):
    m, tok = model4
    inputs = _batch(tok, 4)
    m.vggt_calls = 0
    gen = m.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert gen.shape[0] == 2
    assert m.vggt_calls == 2


def test_save_pretrained_round_trip(model4, tmp_path):
    m, tok = model4
    inputs = _small(tok)
    with torch.no_grad():
        ref = m(**inputs).logits
    m.save_pretrained(tmp_path / "full")
    files = set(os.listdir(tmp_path / "full"))
    assert {"config.json", "model.safetensors", "generation_config.json"} <= files  # a transformers checkpoint
    assert json.loads((tmp_path / "full" / "config.json").read_text())["geoalign_config"] == m.fusion.config.to_dict()
    assert not any(f.endswith((".bin", ".pt", ".pth")) for _, _, fs in os.walk(tmp_path / "full") for f in fs)
    m2 = GeoAlignForConditionalGeneration.from_pretrained(tmp_path / "full")
    with torch.no_grad():
        got = m2(**inputs).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_fusion_only_save_and_load(model4, tmp_path):
    m, tok = model4
    m.save_fusion(tmp_path / "fusion")
    assert sorted(os.listdir(tmp_path / "fusion")) == ["fusion.safetensors", "geoalign_config.json"]
    f = load_fusion(tmp_path / "fusion")
    assert f.config == m.fusion.config
    for (k, a), (k2, b) in zip(m.fusion.state_dict().items(), f.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    # a fresh model with another random fusion, then the trained fusion loaded: same logits
    m2, _ = tiny_model(4, seed=0)
    inputs = _small(tok)
    with torch.no_grad():
        before = m2(**inputs).logits
        m2.load_fusion(tmp_path / "fusion")
        after = m2(**inputs).logits
        ref = m(**inputs).logits
    torch.testing.assert_close(after, ref, rtol=0, atol=0)
    assert not torch.equal(before, ref)


def test_missing_files_raise_clear_errors(model4, tmp_path):
    m, _ = model4
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        GeoAlignForConditionalGeneration.from_pretrained(missing)
    with pytest.raises(FileNotFoundError, match="nope"):
        load_fusion(missing)
    m.save_fusion(tmp_path / "fusion")
    os.remove(tmp_path / "fusion" / "fusion.safetensors")
    with pytest.raises(FileNotFoundError, match="fusion.safetensors"):
        load_fusion(tmp_path / "fusion")
    (tmp_path / "qwen").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        GeoAlignForConditionalGeneration.from_pretrained(qwen=tmp_path / "qwen", vggt=tmp_path / "vggt")


def test_a_directory_without_geoalign_weights_is_refused(model4, tmp_path):
    """A plain Qwen2.5-VL checkpoint, or a GeoAlign directory whose fusion weights are gone, would otherwise load
    with a random VGGT / fusion and answer garbage."""
    from safetensors.torch import load_file, save_file

    from geoalign.tiny import make_tokenizer, tiny_qwen_config

    Qwen2_5_VLForConditionalGeneration(tiny_qwen_config(make_tokenizer())).save_pretrained(tmp_path / "qwen")
    with pytest.raises(ValueError, match="'qwen2_5_vl' checkpoint, not a GeoAlign model"):
        GeoAlignForConditionalGeneration.from_pretrained(tmp_path / "qwen")
    m, _ = model4
    m.save_pretrained(tmp_path / "geo")
    weights = tmp_path / "geo" / "model.safetensors"
    save_file({k: v for k, v in load_file(str(weights)).items() if not k.startswith("model.fusion.")}, str(weights),
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks GeoAlign weights .*model.fusion"):
        GeoAlignForConditionalGeneration.from_pretrained(tmp_path / "geo")
    m.save_fusion(tmp_path / "fusion")                    # ... unless the fusion comes from elsewhere
    loaded = GeoAlignForConditionalGeneration.from_pretrained(tmp_path / "geo", geoalign=tmp_path / "fusion")
    assert torch.equal(loaded.fusion.out_proj.weight, m.fusion.out_proj.weight)


def test_grid_mismatch_and_bad_inputs_raise(model4, model8):
    m, tok = model4
    inputs = build_inputs(tok, [random_frames(2, 70, 84)], 4)
    # VGGT frames of another size than the frames Qwen encoded
    bad = dict(inputs, vggt_pixel_values=[random_frames(2, 84, 84)])
    with pytest.raises(ValueError, match="does not match|do not match"):
        m(**bad)
    # another frame count
    bad = dict(inputs, vggt_pixel_values=[random_frames(3, 70, 84)])
    with pytest.raises(ValueError, match="3"):
        m(**bad)
    # gather_index of the wrong length
    gi = build_gather_index(1, (5, 6))
    with pytest.raises(ValueError, match="gather_index"):
        m(**dict(inputs, gather_index=[gi]))
    # geometry missing
    with pytest.raises(ValueError, match="vggt_pixel_values"):
        m(**dict(inputs, vggt_pixel_values=None))
    # images given to a video (G=8) model
    m8, _ = model8
    with pytest.raises(ValueError, match="G=8"):
        m8(**inputs)
    # m is still usable after the errors (no stale geometry state)
    with torch.no_grad():
        assert torch.isfinite(m(**inputs).logits).all()


def test_without_fusion_is_plain_qwen(model4):
    m, tok = model4
    inputs = _small(tok)
    qwen_inputs = {k: v for k, v in inputs.items() if k != "vggt_pixel_values"}
    # transformers' own Qwen2.5-VL with this model's Qwen weights
    qwen = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**{k: v for k, v in m.config.to_dict().items()
                                                                 if k not in ("geoalign_config", "vggt_config",
                                                                              "freeze_vision_tower", "model_type")}))
    missing, unexpected = qwen.load_state_dict(m.state_dict(), strict=False)
    assert not missing and all(k.startswith(("model.vggt.", "model.fusion.")) for k in unexpected)
    with torch.no_grad():
        fused = m(**inputs).logits
        with m.without_fusion():
            bypassed = m(**inputs).logits
        plain = qwen.eval()(**qwen_inputs).logits
    torch.testing.assert_close(bypassed, plain, rtol=0, atol=0)
    assert not torch.allclose(fused, plain)


@pytest.mark.gpu
@pytest.mark.parametrize("attn", ["sdpa", "flash_attention_2"])
def test_cuda_bf16_generate(attn):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if attn == "flash_attention_2":
        pytest.importorskip("flash_attn")
    m, tok = tiny_model(4, seed=0, backend="auto", attn_implementation=attn)
    m.to("cuda", torch.bfloat16)
    inputs = build_inputs(tok, [random_frames(2, 70, 84), random_frames(3, 56, 98, seed=1)], 4)
    inputs = {k: (v.cuda() if isinstance(v, torch.Tensor) else [x.cuda() for x in v]) for k, v in inputs.items()}
    m.vggt_calls = 0
    gen = m.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert gen.shape[0] == 2 and m.vggt_calls == 2
    with torch.no_grad():
        a = m(**inputs).logits.float()
        b = m(**inputs, fusion_backend="reference").logits.float()
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)


# --------------------------------------------------------------------------------- a transformers model
def test_is_a_transformers_model():
    from transformers import GenerationMixin, PreTrainedModel

    assert issubclass(GeoAlignForConditionalGeneration, PreTrainedModel)
    assert issubclass(GeoAlignForConditionalGeneration, Qwen2_5_VLForConditionalGeneration)
    assert issubclass(GeoAlignForConditionalGeneration, GenerationMixin)


def test_auto_classes_round_trip_with_device_map(model4, tmp_path):
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from geoalign import GeoAlignModelConfig
    from geoalign.processing import GeoAlignProcessor

    m, tok = model4
    inputs = _small(tok)
    with torch.no_grad():
        ref = m(**inputs).logits
    m.save_pretrained(tmp_path / "m", processor=GeoAlignProcessor(tok, None, group_size=4))
    assert isinstance(AutoConfig.from_pretrained(tmp_path / "m"), GeoAlignModelConfig)
    proc = AutoProcessor.from_pretrained(tmp_path / "m")
    assert isinstance(proc, GeoAlignProcessor) and proc.group_size == 4
    for kw in ({}, {"device_map": "cpu"}, {"device_map": "cpu", "dtype": torch.float32}):
        back = AutoModelForImageTextToText.from_pretrained(tmp_path / "m", **kw)
        assert type(back) is GeoAlignForConditionalGeneration and back.fusion.config == m.fusion.config
        with torch.no_grad():
            torch.testing.assert_close(back(**inputs).logits, ref, rtol=0, atol=0)
    bf16 = GeoAlignForConditionalGeneration.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16.fusion.out_proj.weight.dtype == torch.bfloat16


def test_peft_lora_wraps_the_model(model4):
    peft = pytest.importorskip("peft")
    m, tok = model4
    lora = peft.get_peft_model(tiny_model(4, seed=3)[0], peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    inputs = _small(tok)
    out = lora(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    trained = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    assert all(p.grad is not None for n, p in lora.named_parameters() if p.requires_grad)
    assert m is not None
