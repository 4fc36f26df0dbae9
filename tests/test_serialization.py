"""geoalign.serialization: the legacy model directory (what geoalign wrote before the model was a transformers
PreTrainedModel) still loads, with the same outputs, and `geoalign convert` rewrites it as a transformers
checkpoint. The legacy layout is written here by hand, as the old save_pretrained wrote it."""
from __future__ import annotations

import json

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from geoalign.atomic_files import save_safetensors, write_json
from geoalign.cli import main as geoalign_main
from geoalign.modeling import GeoAlignForConditionalGeneration
from geoalign.processing import GeoAlignProcessor
from geoalign.serialization import is_legacy_directory, save_fusion
from geoalign.tiny import build_inputs, random_frames, tiny_model

OURS = ("geoalign_config", "vggt_config", "freeze_vision_tower", "model_type")


def write_legacy_directory(model, tok, path) -> None:
    """geoalign_model.json + qwen/ (Qwen's save_pretrained and the tokenizer) + vggt/ (aggregator.* names) + the
    fusion files at the top."""
    qwen = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        **{k: v for k, v in model.config.to_dict().items() if k not in OURS}))
    qwen.load_state_dict(model.state_dict(), strict=False)
    qwen.save_pretrained(path / "qwen")
    GeoAlignProcessor(tok, None, group_size=4).save_pretrained(path / "qwen")
    save_safetensors(path / "vggt" / "model.safetensors",
                     {"aggregator." + k: v.contiguous() for k, v in model.vggt.state_dict().items()})
    write_json(path / "vggt" / "vggt_config.json", model.vggt.config.to_dict())
    save_fusion(model.fusion, path / "fusion_tmp")
    for name in ("geoalign_config.json", "fusion.safetensors"):
        (path / name).write_bytes((path / "fusion_tmp" / name).read_bytes())
    write_json(path / "geoalign_model.json", {"format": "geoalign", "format_version": 1, "qwen": "qwen",
                                              "vggt": "vggt", "fusion": "."})


def test_legacy_directory_loads_and_converts(tmp_path):
    model, tok = tiny_model(seed=4)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    write_legacy_directory(model, tok, legacy)
    (legacy / "fusion_tmp" / "fusion.safetensors").unlink()
    inputs = build_inputs(tok, [random_frames(2)], 4)
    with torch.no_grad():
        ref = model(**inputs).logits
    assert is_legacy_directory(legacy)
    back = GeoAlignForConditionalGeneration.from_pretrained(legacy)
    with torch.no_grad():
        torch.testing.assert_close(back(**inputs).logits, ref, rtol=0, atol=0)

    assert geoalign_main(["convert", str(legacy), str(tmp_path / "new")]) == 0
    assert not is_legacy_directory(tmp_path / "new")
    assert "geoalign_config" in json.loads((tmp_path / "new" / "config.json").read_text())
    converted = GeoAlignForConditionalGeneration.from_pretrained(tmp_path / "new")
    with torch.no_grad():
        torch.testing.assert_close(converted(**inputs).logits, ref, rtol=0, atol=0)
    assert GeoAlignProcessor.from_pretrained(tmp_path / "new").group_size == 4


def test_convert_refuses_what_is_not_legacy(tmp_path, capsys):
    assert geoalign_main(["convert", str(tmp_path), str(tmp_path / "new")]) == 2
    assert "not a legacy geoalign directory" in capsys.readouterr().err
