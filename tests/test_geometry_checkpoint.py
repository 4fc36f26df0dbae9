"""VGGT checkpoint compatibility: official names/shapes, state-dict round trip, safetensors/.pt loading, errors."""
import json
import logging
import os

import pytest
import torch
from safetensors.torch import save_file

from geoalign.geometry import (
    VGGTAggregator,
    VGGTAggregatorConfig,
    load_aggregator_weights,
    official_aggregator_param_shapes,
)

MANIFEST = os.path.join(os.path.dirname(__file__), "..", "geoalign", "geometry", "vggt_1b_aggregator_params.json")


def test_manifest_matches_module_at_vggt_1b_size():
    with open(MANIFEST) as f:
        doc = json.load(f)
    manifest = {k: tuple(v) for k, v in doc["params"].items()}
    with torch.device("meta"):
        model = VGGTAggregator(VGGTAggregatorConfig())
    ours = {"aggregator." + k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(ours) == sorted(manifest)
    assert ours == manifest
    assert official_aggregator_param_shapes() == manifest
    assert doc["num_tensors"] == len(ours)
    assert doc["num_params"] == sum(p.numel() for p in model.parameters())
    # spot checks of facts about the official checkpoint
    assert manifest["aggregator.camera_token"] == (1, 2, 1, 1024)
    assert manifest["aggregator.register_token"] == (1, 2, 4, 1024)
    assert manifest["aggregator.patch_embed.pos_embed"] == (1, 1370, 1024)
    assert manifest["aggregator.patch_embed.blocks.0.attn.qkv.weight"] == (3072, 1024)
    assert manifest["aggregator.frame_blocks.3.attn.q_norm.weight"] == (64,)
    assert "aggregator.patch_embed.blocks.0.attn.q_norm.weight" not in manifest  # no q/k norm in DINOv2
    assert manifest["aggregator.patch_embed.blocks.23.ls2.gamma"] == (1024,)
    assert "aggregator.frame_blocks.24.norm1.weight" not in manifest
    assert manifest["aggregator.global_blocks.23.mlp.fc2.weight"] == (1024, 4096)


def test_enumeration_matches_module_for_other_configs():
    for cfg in (VGGTAggregatorConfig.tiny(), VGGTAggregatorConfig.from_patch_embed("dinov2_vits14_reg", depth=3),
                VGGTAggregatorConfig.tiny(qk_norm=False, num_register_tokens=2)):
        with torch.device("meta"):
            model = VGGTAggregator(cfg)
        ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert ours == official_aggregator_param_shapes(cfg, prefix="")


def _random_tiny(seed):
    torch.manual_seed(seed)
    m = VGGTAggregator(VGGTAggregatorConfig.tiny())
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def _full_checkpoint(model):
    sd = {"aggregator." + k: v.clone() for k, v in model.state_dict().items()}
    sd["camera_head.trunk.0.weight"] = torch.randn(4, 4)
    sd["depth_head.projects.0.weight"] = torch.randn(2, 3)
    sd["point_head.scratch.output_conv2.0.bias"] = torch.randn(3)
    sd["track_head.feature_extractor.norm.weight"] = torch.randn(5)
    return sd


def test_state_dict_round_trip():
    a, b = _random_tiny(0), _random_tiny(1)
    x = torch.rand(1, 2, 3, 28, 28)
    assert not torch.equal(a(x)[-1], b(x)[-1])
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x)[-1], b(x)[-1])
    # non-persistent buffers are not in the state dict (as in VGGT)
    assert not any("resnet" in k for k in a.state_dict())


def test_load_safetensors_with_heads(tmp_path, caplog):
    src = _random_tiny(0)
    path = tmp_path / "model.safetensors"
    save_file(_full_checkpoint(src), str(path))
    x = torch.rand(1, 2, 3, 28, 42)
    with caplog.at_level(logging.INFO, logger="geoalign.geometry"):
        dst = VGGTAggregator.from_pretrained(str(path), VGGTAggregatorConfig.tiny())
    assert "ignored 4 non-aggregator tensors" in caplog.text
    assert "camera_head: 1" in caplog.text and "track_head: 1" in caplog.text
    assert not any(p.is_meta for p in dst.parameters()) and not any(b.is_meta for b in dst.buffers())
    assert all(not p.requires_grad for p in dst.parameters())
    for (i, t), ref in zip(dst.iter_layers(x, [0, 3]), (src(x)[0], src(x)[3])):
        torch.testing.assert_close(t, ref[:, :, 5:], rtol=0, atol=0)
    # directory lookup and in-place loading into an existing module
    other = _random_tiny(5)
    load_aggregator_weights(other, tmp_path)
    assert torch.equal(other(x)[-1], src(x)[-1])


def test_load_pt_weights_only(tmp_path):
    src = _random_tiny(0)
    path = tmp_path / "model.pt"
    torch.save(_full_checkpoint(src), str(path))
    dst = VGGTAggregator.from_pretrained(str(path), VGGTAggregatorConfig.tiny())
    x = torch.rand(1, 1, 3, 28, 28)
    assert torch.equal(dst(x)[-1], src(x)[-1])
    # a bare aggregator state dict (no prefix) and a bf16 load
    bare = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(bare))
    d2 = VGGTAggregator.from_pretrained(str(bare), VGGTAggregatorConfig.tiny(), dtype=torch.bfloat16)
    assert d2.camera_token.dtype == torch.bfloat16


def test_missing_keys_are_a_clear_error(tmp_path):
    sd = _full_checkpoint(_random_tiny(0))
    del sd["aggregator.frame_blocks.1.attn.q_norm.weight"]
    del sd["aggregator.camera_token"]
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ValueError, match=r"2 missing aggregator tensors.*frame_blocks\.1\.attn\.q_norm\.weight"):
        VGGTAggregator.from_pretrained(str(path), VGGTAggregatorConfig.tiny())


def test_wrong_config_is_a_clear_error(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(_full_checkpoint(_random_tiny(0)), str(path))
    with pytest.raises(ValueError, match=r"shape mismatches.*pos_embed: expected \(1, 26, 64\), got \(1, 17, 64\)"):
        VGGTAggregator.from_pretrained(str(path), VGGTAggregatorConfig.tiny(img_size=70))
    with pytest.raises(ValueError, match=r"unknown aggregator tensors.*frame_blocks\.3"):
        VGGTAggregator.from_pretrained(str(path), VGGTAggregatorConfig.tiny(depth=3))


def test_missing_and_corrupt_checkpoint(tmp_path):
    missing = tmp_path / "nope" / "model.safetensors"
    with pytest.raises(FileNotFoundError, match="nope"):
        VGGTAggregator.from_pretrained(str(missing), VGGTAggregatorConfig.tiny())
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors.*model\.pt"):
        VGGTAggregator.from_pretrained(str(tmp_path), VGGTAggregatorConfig.tiny())
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="cannot read safetensors"):
        VGGTAggregator.from_pretrained(str(bad), VGGTAggregatorConfig.tiny())
    badpt = tmp_path / "bad.pt"
    badpt.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="weights_only=True"):
        VGGTAggregator.from_pretrained(str(badpt), VGGTAggregatorConfig.tiny())
    other = tmp_path / "weights.npz"
    other.write_bytes(b"x")
    with pytest.raises(ValueError, match="unsupported checkpoint format"):
        VGGTAggregator.from_pretrained(str(other), VGGTAggregatorConfig.tiny())
