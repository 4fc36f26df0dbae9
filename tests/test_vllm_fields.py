"""geoalign.vllm.fields: the fields GeoAlign's vLLM processor hands vLLM, checked against the transformers model's
processor with no vLLM installed (the engine itself: tests/test_vllm.py, in vLLM's own environment)."""
from __future__ import annotations

import re
import subprocess
import sys
import uuid

import numpy as np
import pytest
import torch

from geoalign.geometry.frames import SampledFrames
from geoalign.processing import GeoAlignProcessor
from geoalign.tiny import make_tokenizer
from geoalign.vllm.fields import IMAGE_FIELDS, image_fields, video_fields
from media_helpers import random_uint8_frames as _frames

QUESTION = "how far?"


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def test_fields_module_imports_no_vllm():
    code = ("import sys, geoalign.vllm.fields, geoalign.vllm.torchvision_cpu; "
            "print(any(m == 'vllm' or m.startswith('vllm.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("num_frames", [1, 3, 5])
def test_image_fields_put_the_whole_sample_on_the_first_item(tokenizer, num_frames):
    proc = GeoAlignProcessor(tokenizer, None, group_size=4, num_frames=None)
    frames = _frames(num_frames, seed=num_frames)
    key = uuid.uuid4()
    fields = image_fields(proc, frames, key)
    ref = proc(frames, QUESTION)
    assert set(fields) == set(IMAGE_FIELDS)
    for name in IMAGE_FIELDS:
        assert len(fields[name]) == num_frames, name
    # item 0: every frame's patches, all S grids, VGGT's frames and the gather_index, exactly the processor's
    torch.testing.assert_close(fields["geoalign_pixel_values"][0], ref["pixel_values"], rtol=0, atol=0)
    torch.testing.assert_close(fields["geoalign_grid_thw"][0], ref["image_grid_thw"], rtol=0, atol=0)
    torch.testing.assert_close(fields["vggt_pixel_values"][0], ref["vggt_pixel_values"][0], rtol=0, atol=0)
    torch.testing.assert_close(fields["gather_index"][0], ref["gather_index"][0], rtol=0, atol=0)
    # items 1..S-1: nothing of the sample, with the trailing shapes vLLM batches by
    for k in range(1, num_frames):
        assert fields["geoalign_pixel_values"][k].shape == (0, ref["pixel_values"].shape[1])
        assert fields["geoalign_grid_thw"][k].shape == (0, 3)
        assert fields["vggt_pixel_values"][k].shape == (0, *ref["vggt_pixel_values"][0].shape[1:])
        assert fields["gather_index"][k].shape == (0, 4)
    # every item: its own grid (vLLM's placeholders and positions) and (key, position, S)
    torch.testing.assert_close(fields["image_grid_thw"], ref["image_grid_thw"], rtol=0, atol=0)
    items = fields["geoalign_item"]
    assert items.dtype == torch.int64 and items.shape == (num_frames, 4)
    back = b"".join(int(v).to_bytes(8, "little", signed=True) for v in items[0, :2].tolist())
    assert uuid.UUID(bytes=back) == key
    assert items[:, 2].tolist() == list(range(num_frames)) and set(items[:, 3].tolist()) == {num_frames}
    assert len(set(map(tuple, items[:, :2].tolist()))) == 1


@pytest.mark.parametrize("num_frames", [2, 5])
def test_video_fields_match_the_processor(tokenizer, num_frames):
    proc = GeoAlignProcessor(tokenizer, None, group_size=8, num_frames=None)
    videos = [_frames(num_frames, seed=1), _frames(num_frames, 56, 84, seed=2)]
    # vLLM's metadata: 8 of 100 frames kept from a 30 fps file -> 2.4 fps; the second video has no rate
    meta = [{"fps": 30.0, "total_num_frames": 100, "frames_indices": list(range(0, 96, 12))}, None]
    fields = video_fields(proc, [np.stack(v) for v in videos], meta)
    refs = [proc(SampledFrames(videos[0], 2.4), QUESTION), proc(videos[1], QUESTION)]
    torch.testing.assert_close(fields["pixel_values_videos"],
                               torch.cat([r["pixel_values_videos"] for r in refs]), rtol=0, atol=0)
    torch.testing.assert_close(fields["video_grid_thw"], torch.cat([r["video_grid_thw"] for r in refs]),
                               rtol=0, atol=0)
    torch.testing.assert_close(fields["second_per_grid_ts"], torch.cat([r["second_per_grid_ts"] for r in refs]),
                               rtol=0, atol=0)
    assert fields["second_per_grid_ts"].tolist() == pytest.approx([2 / 2.4, 1.0])
    for b, r in enumerate(refs):
        torch.testing.assert_close(fields["vggt_pixel_values"][b], r["vggt_pixel_values"][0], rtol=0, atol=0)
        torch.testing.assert_close(fields["gather_index"][b], r["gather_index"][0], rtol=0, atol=0)


def test_a_float_frame_is_refused_by_name(tokenizer):
    proc = GeoAlignProcessor(tokenizer, None, group_size=4, num_frames=None)
    bad = [np.random.default_rng(0).random((56, 84, 3), dtype=np.float32)]
    with pytest.raises(ValueError, match=r"a frame must be a PIL image or a uint8 array \[H, W, 3\], got a float32 "
                                         r"array of shape \(56, 84, 3\)"):
        image_fields(proc, bad, uuid.uuid4())


PROGRESSIVE = dict(fusion="gated_2d3d", gate_granularity="token", progressive_vit_blocks=(0, 1),
                   progressive_geo_layers=(1, 2, 3), progressive_inject_layers=(0, 1), progressive_vit_hidden=32)


@pytest.mark.parametrize("options, why", [
    (dict(injection_layers=(1,)), "injects the geometry inside the LLM (injection_layers (1,))"),
    (PROGRESSIVE, "this is a GAP-MLLM model (progressive fusion"),
], ids=["in-LLM-injection", "GAP-MLLM"])
def test_fusions_vllm_cannot_run_are_refused_before_vllm_starts(tmp_path, options, why, monkeypatch):
    """geoalign eval --engine vllm on such a directory: a ValueError naming the reason, before vLLM is imported
    (vLLM's worker would fail on the same check, deep in its start-up); the paper's fusion passes the check."""
    import geoalign.vllm.engine as engine
    from geoalign.config import GeoAlignConfig
    from geoalign.model_config import GeoAlignModelConfig
    from geoalign.tiny import tiny_fusion_config, tiny_qwen_config, tiny_vggt_config
    from geoalign.vllm import unsupported_on_vllm

    assert unsupported_on_vllm(tiny_fusion_config()) is None
    fusion = GeoAlignConfig(**{**tiny_fusion_config().to_dict(), **options})
    assert why in unsupported_on_vllm(fusion)
    GeoAlignModelConfig.from_parts(tiny_qwen_config(), tiny_vggt_config(), fusion).save_pretrained(tmp_path)
    monkeypatch.setitem(sys.modules, "vllm", None)               # importing vLLM would raise ImportError
    with pytest.raises(ValueError, match=re.escape(why)):
        engine.load_vllm_predictor(str(tmp_path))
