"""GeoAlignProcessor and Qwen patchify (CPU, offline tokenizer)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from geoalign.processing import GeoAlignProcessor, qwen_patchify  # noqa: E402


def test_patchify_images_matches_qwen_image_processor():
    from transformers import Qwen2VLImageProcessorPil

    ip = Qwen2VLImageProcessorPil()
    x = torch.rand(3, 3, 56, 84)
    ref = ip(images=list(x), do_resize=False, do_rescale=False, return_tensors="pt")
    pv, grid = qwen_patchify(x, 4, ip.image_mean, ip.image_std)
    assert torch.equal(grid, ref["image_grid_thw"].to(torch.int64))
    torch.testing.assert_close(pv, ref["pixel_values"].float(), rtol=0, atol=1e-6)


def test_patchify_video_layout_and_odd_frames():
    x = torch.rand(3, 3, 56, 84)
    pv, grid = qwen_patchify(x, 8, (0, 0, 0), (1, 1, 1))
    assert grid.tolist() == [[2, 4, 6]]
    # Qwen2VLVideoProcessor's layout: view(T, tp, C, gh/2, 2, 14, gw/2, 2, 14).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    padded = torch.cat([x, x[-1:]])                                  # odd count: last frame repeated
    v = padded.view(2, 2, 3, 2, 2, 14, 3, 2, 14)
    ref = v.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(2 * 4 * 6, -1)
    assert torch.equal(pv, ref)
    # token (t=0, r=0, c=1), sub-patch (dy=1, dx=0) holds frame 0 and frame 1 pixels at rows 14..28, cols 28..42
    row = pv[1 * 4 + 2].view(3, 2, 14, 14)
    assert torch.equal(row[:, 0], x[0, :, 14:28, 28:42]) and torch.equal(row[:, 1], x[1, :, 14:28, 28:42])


def test_processor_images_batch_with_labels(tok):
    from transformers import Qwen2VLImageProcessorPil

    p = GeoAlignProcessor(tok, Qwen2VLImageProcessorPil(), group_size=4)
    a = torch.rand(3, 3, 120, 160)
    b = [np.random.randint(0, 255, (100, 100, 3), dtype=np.uint8)] * 2
    out = p([a, b], ["what?", "how far?"], answer=["red", "2 m"])
    assert out["image_grid_thw"].tolist() == [[1, 28, 36]] * 3 + [[1, 36, 36]] * 2
    assert [tuple(v.shape) for v in out["vggt_pixel_values"]] == [(3, 3, 392, 518), (2, 3, 518, 518)]
    assert [tuple(g.shape) for g in out["gather_index"]] == [(3 * 14 * 18, 4), (2 * 18 * 18, 4)]
    pad_id = tok.convert_tokens_to_ids("<|image_pad|>")
    n_pad = (out["input_ids"] == pad_id).sum(1).tolist()
    assert n_pad == [3 * 14 * 18, 2 * 18 * 18]
    assert out["pixel_values"].shape == (3 * 28 * 36 + 2 * 36 * 36, 1176)
    assert out["attention_mask"][:, -1].all()                        # left padding
    for b, ans in enumerate(["red", "2 m"]):
        lab = out["labels"][b]
        assert tok.decode(lab[lab >= 0]) == ans + "<|im_end|>"
    # the Qwen crop is the top-left of the VGGT frame, and patchify of it equals pixel_values
    from geoalign.geometry.frames import crop_for_qwen
    pv, _ = qwen_patchify(crop_for_qwen(out["vggt_pixel_values"][0]), 4)
    torch.testing.assert_close(out["pixel_values"][:pv.shape[0]].float(), pv, rtol=0, atol=1e-5)


def test_processor_video_path_and_folder(tok, tmp_path):
    from PIL import Image

    for i in range(5):
        Image.fromarray(np.random.randint(0, 255, (60, 80, 3), dtype=np.uint8)).save(tmp_path / f"f{i}.png")
    p = GeoAlignProcessor(tok, None, group_size=8, num_frames=3)
    out = p(str(tmp_path), "where is the chair?")
    assert out["video_grid_thw"].tolist() == [[2, 28, 36]]
    vid = tok.convert_tokens_to_ids("<|video_pad|>")
    assert int((out["input_ids"] == vid).sum()) == 2 * 14 * 18
    assert out["gather_index"][0].shape == (2 * 14 * 18, 8)
    assert out["vggt_pixel_values"][0].shape == (3, 3, 392, 518)
    assert "labels" not in out
    text = tok.decode(out["input_ids"][0])
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")


def test_processor_save_and_load(tok, tmp_path):
    from transformers import Qwen2VLImageProcessorPil

    GeoAlignProcessor(tok, Qwen2VLImageProcessorPil()).save_pretrained(tmp_path / "qwen")
    p = GeoAlignProcessor.from_pretrained(tmp_path)           # finds qwen/ inside a GeoAlign directory
    assert p.image_processor is not None and p.chat_template
    assert p.tokenizer.convert_tokens_to_ids("<|image_pad|>") == tok.convert_tokens_to_ids("<|image_pad|>")
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        GeoAlignProcessor.from_pretrained(tmp_path / "missing_dir")


def test_processor_errors(tok):
    p = GeoAlignProcessor(tok, None)
    with pytest.raises(ValueError):
        p([torch.rand(1, 3, 60, 80)], ["a", "b"])
    with pytest.raises(ValueError):
        GeoAlignProcessor(tok, None, group_size=5)


@pytest.mark.slow
def test_processor_to_model_generate(tok):
    from geoalign.tiny import tiny_fusion_config, tiny_qwen_config, tiny_vggt_config

    from geoalign.modeling import GeoAlignForConditionalGeneration

    torch.manual_seed(0)
    m = GeoAlignForConditionalGeneration.from_config(tiny_qwen_config(tok), tiny_vggt_config(), tiny_fusion_config())
    p = GeoAlignProcessor(tok, None, group_size=4, num_frames=2)
    out = p(torch.rand(2, 3, 60, 80), "what is it?")
    gen = m.generate(**out, max_new_tokens=2, do_sample=False)
    assert gen.shape[1] == out["input_ids"].shape[1] + 2
    assert m.vggt_calls == 1


def test_video_timing_matches_qwen_processor(tok, tmp_path):
    """G = 8: ``second_per_grid_ts`` is what Qwen2.5-VL's own processor computes from the clip's metadata
    (temporal_patch_size / VideoMetadata.sampled_fps) -- from a video path, from evaluation's decoded frames and in
    the training collator; frames without a rate get Qwen's default 1.0; and it reaches the model's rope index."""
    from transformers.video_utils import VideoMetadata

    from geoalign.eval.media import MediaRef, load_frames
    from geoalign.geometry.sampling import sample_frame_indices
    from geoalign.tiny import tiny_model
    from geoalign.training.data import GeoAlignCollator, GeoAlignSFTDataset
    from media_helpers import write_video

    video = str(tmp_path / "clip.mp4")
    write_video(video, n=12, size=56)                                                  # 12 frames at 10 fps
    qwen = VideoMetadata(total_num_frames=12, fps=10.0, frames_indices=sample_frame_indices(12, 4))
    want = 2 / qwen.sampled_fps                                                        # Qwen's formula: 0.6 s
    assert want == pytest.approx(0.6)
    p = GeoAlignProcessor(tok, None, group_size=8, num_frames=4)
    out = p(video, "how many chairs?")
    assert out["second_per_grid_ts"].tolist() == pytest.approx([want])
    decoded = p(load_frames(MediaRef(video, "video"), 4), "how many chairs?")            # evaluation's path
    assert decoded["second_per_grid_ts"].tolist() == pytest.approx([want])
    assert p(torch.rand(4, 3, 56, 56), "q")["second_per_grid_ts"].tolist() == [1.0]  # no rate: Qwen's default

    (tmp_path / "train.jsonl").write_text(
        '{"id": "v", "video": "clip.mp4", "conversations": [{"from": "human", "value": "<video>\\nhow many?"}, '
        '{"from": "gpt", "value": "two"}]}\n')
    ds = GeoAlignSFTDataset.from_files(str(tmp_path / "train.jsonl"), p, str(tmp_path), num_frames=4)
    batch = GeoAlignCollator.for_processor(p)([ds[0], ds[0]])
    assert batch["second_per_grid_ts"].tolist() == pytest.approx([want, want])

    model, _ = tiny_model(group_size=8)
    model.eval()
    with torch.no_grad():
        timed = model(**out).logits
        out["second_per_grid_ts"] = torch.tensor([1.0])
        untimed = model(**out).logits
    assert not torch.allclose(timed, untimed)          # the temporal rope positions of the second frame pair moved
