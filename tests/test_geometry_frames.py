"""Frame loading and preparation: PyAV videos (generated here), image folders, tensors, resize/crop rules, errors."""
import os

import numpy as np
import pytest
import torch

from geoalign.geometry import (
    VGGTAggregator,
    VGGTAggregatorConfig,
    build_gather_index,
    crop_for_qwen,
    gather_rows,
    load_image_folder,
    load_video_frames,
    prepare_frames,
    resize_for_vggt,
    sample_frame_indices,
    vggt_frame_shape,
)

av = pytest.importorskip("av")

from media_helpers import write_video  # noqa: E402


#: media_helpers.write_video's arguments here: 48x64 frames, frame i a flat grey of value 10*i; MP4 (mpeg4 / yuv420p) as
#: written, LOSSLESS (ffv1 / bgr0, in .mkv) so values read back exactly
MP4 = dict(size=48, width=64, step=10)
LOSSLESS = dict(MP4, codec="ffv1", pix_fmt="bgr0")


def test_vggt_sizes():
    assert vggt_frame_shape(480, 640) == (392, 518)
    assert vggt_frame_shape(1080, 1920) == (294, 518)
    assert vggt_frame_shape(640, 480) == (518, 518)   # 690 px tall after resize, centre-cropped to 518
    assert vggt_frame_shape(518, 518) == (518, 518)
    with pytest.raises(ValueError, match="too wide"):
        vggt_frame_shape(10, 2000)


def test_sample_indices():
    assert sample_frame_indices(100, 5) == [0, 25, 50, 74, 99]
    assert sample_frame_indices(3, 8) == [0, 1, 2]
    assert sample_frame_indices(7, None) == list(range(7))
    with pytest.raises(ValueError, match="empty"):
        sample_frame_indices(0, 4)


def test_too_few_frames_warns_once_per_pair(caplog, monkeypatch):
    """An eval asks every question for N frames of short clips: the warning comes once per (asked, present) pair,
    not once per question."""
    import logging

    from geoalign.geometry import sampling

    monkeypatch.setattr(sampling, "_WARNED", set())          # pairs warned about by earlier tests do not count

    with caplog.at_level(logging.WARNING, logger="geoalign.geometry"):
        for _ in range(3):
            assert sample_frame_indices(5, 9) == list(range(5))
        assert sample_frame_indices(4, 9) == list(range(4))
    said = [r.getMessage() for r in caplog.records if "exist" in r.getMessage()]
    assert said == ["asked for 9 frames but only 5 exist; using all 5 (said once per such pair)",
                    "asked for 9 frames but only 4 exist; using all 4 (said once per such pair)"]


def test_sample_indices_floor_is_vg_llms_truncation():
    # linspace(0, 99, 5) = [0, 24.75, 49.5, 74.25, 99]: rounded (half to even) vs VG-LLM's .astype(int)
    assert sample_frame_indices(100, 5, "linspace-round") == [0, 25, 50, 74, 99]
    assert sample_frame_indices(100, 5, "linspace-floor") == [0, 24, 49, 74, 99]
    assert sample_frame_indices(12, 4, "linspace-floor") == [0, 3, 7, 11]   # [0, 3.67, 7.33, 11]; round: 4
    assert sample_frame_indices(3, 8, "linspace-floor") == [0, 1, 2]          # shorter clip: every frame
    with pytest.raises(ValueError, match=r"unknown frame sampling 'nearest'; expected one of "
                                         r"\('linspace-round', 'linspace-floor'\)"):
        sample_frame_indices(100, 5, "nearest")


def test_load_video_uniform(tmp_path):
    path = write_video(tmp_path / "v.mkv", 13, **LOSSLESS)
    frames, idx, fps = load_video_frames(path, 5)
    assert idx == [0, 3, 6, 9, 12] and fps == pytest.approx(5 / 13 * 10)     # 5 of 13 frames at 10 fps
    assert [int(f[0, 0, 0]) for f in frames] == [0, 30, 60, 90, 120]
    assert frames[0].shape == (48, 64, 3) and frames[0].dtype == np.uint8
    mp4 = write_video(tmp_path / "v.mp4", 9, **MP4)
    frames, idx, fps = load_video_frames(mp4, 3)
    assert idx == [0, 4, 8] and fps == pytest.approx(3 / 9 * 10) and abs(float(frames[2].mean()) - 80) < 4
    frames, idx, _ = load_video_frames(path, 6, "linspace-floor")            # [0, 2.4, 4.8, 7.2, 9.6, 12]
    assert idx == [0, 2, 4, 7, 9, 12] and [int(f[0, 0, 0]) for f in frames] == [0, 20, 40, 70, 90, 120]
    assert load_video_frames(path, 6)[1] == [0, 2, 5, 7, 10, 12]


def test_prepare_video_end_to_end(tmp_path):
    path = write_video(tmp_path / "v.mkv", 7, **LOSSLESS)
    a = prepare_frames(path, num_frames=4, group_size=8)
    # 48x64 -> width 518, height round(48*518/64/14)*14 = 392
    assert a.vggt_images.shape == (4, 3, 392, 518) and a.vggt_images.dtype == torch.float32
    assert a.qwen_images.shape == (4, 3, 392, 504)
    assert a.vggt_grid == (28, 37) and a.qwen_grid == (28, 36)
    assert a.frame_indices == [0, 2, 4, 6]
    assert a.gather_index.shape == (2 * 252, 8) and a.num_tokens == 504
    assert a.grid_thw.tolist() == [[2, 28, 36]]
    assert torch.equal(a.qwen_images, a.vggt_images[:, :, :392, :504])
    torch.testing.assert_close(a.vggt_images[1].mean(), torch.tensor(20 / 255), atol=1e-3, rtol=0)
    a4 = prepare_frames(path, num_frames=3)
    assert a4.gather_index.shape == (3 * 252, 4) and a4.num_rows == 3 * 28 * 37


def test_tiny_aggregator_on_prepared_frames():
    # Full path on a small frame: VGGT layer rows gathered for every Qwen token.
    frames = torch.rand(3, 3, 30, 60)
    vggt = resize_for_vggt(frames, target=56)          # the tiny config's "518"
    assert vggt.shape == (3, 3, 28, 56)
    model = VGGTAggregator(VGGTAggregatorConfig.tiny())
    (i, layer), = list(model.iter_layers(vggt[None], [2]))
    assert layer.shape == (1, 3, 2 * 4, 128)
    gi = build_gather_index(3, (2, 4))
    x = gather_rows(layer, gi)
    assert x.shape == (3 * 2, 4 * 128)
    torch.testing.assert_close(x[0, :128], layer[0, 0, 0])
    torch.testing.assert_close(x[0, 128 * 2: 128 * 3], layer[0, 0, 4])   # patch (1, 0) of a 2x4 grid


def test_image_folder(tmp_path):
    from PIL import Image

    for i in (1, 2, 10):
        Image.fromarray(np.full((40, 60, 3), i * 20, np.uint8)).save(tmp_path / f"frame_{i}.png")
    rgba = np.zeros((40, 60, 4), np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "frame_11.png")   # fully transparent -> white
    (tmp_path / "notes.txt").write_text("not an image")
    imgs, idx = load_image_folder(tmp_path)
    assert idx == [0, 1, 2, 3]
    assert [int(np.asarray(im)[0, 0, 0]) for im in imgs] == [20, 40, 200, 255]   # natural order, white alpha
    a = prepare_frames(str(tmp_path), num_frames=2)
    assert a.frame_indices == [0, 3] and a.vggt_images.shape == (2, 3, 350, 518)
    assert a.qwen_images.shape == (2, 3, 336, 504) and a.vggt_grid == (25, 37) and a.qwen_grid == (24, 36)


def test_tensor_and_pil_paths_agree():
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    u8 = (torch.rand(2, 3, 60, 80, generator=g) * 255).round().to(torch.uint8)
    a = resize_for_vggt(u8)
    b = resize_for_vggt([Image.fromarray(f.permute(1, 2, 0).numpy()) for f in u8])
    assert torch.equal(a, b)
    c = resize_for_vggt(u8.float() / 255)   # torch anti-aliased bicubic vs PIL bicubic: close, not identical
    assert c.shape == a.shape and (c - a).abs().mean() < 0.01
    assert float(c.min()) >= 0 and float(c.max()) <= 1


def test_bad_frames(tmp_path):
    with pytest.raises(ValueError, match=r"same size: frame 0 is 48x64 \(HxW\), frame 1 is 40x64"):
        resize_for_vggt([np.zeros((48, 64, 3), np.uint8), np.zeros((40, 64, 3), np.uint8)])
    with pytest.raises(ValueError, match=r"\[0, 1\], got min=0, max=255"):
        resize_for_vggt(torch.zeros(2, 3, 8, 8).index_fill_(0, torch.tensor([1]), 255.0))
    with pytest.raises(ValueError, match=r"\[S, 3, H, W\].*\(2, 4, 8, 8\)"):
        resize_for_vggt(torch.rand(2, 4, 8, 8))
    with pytest.raises(ValueError, match="empty list"):
        resize_for_vggt([])
    with pytest.raises(ValueError, match=r"uint8 array \[H, W, 3\]"):
        resize_for_vggt([np.zeros((8, 8), np.float32)])
    with pytest.raises(ValueError, match=r"expected VGGT frames \[S, 3, H, W\]"):
        crop_for_qwen(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="group_size must be 4"):
        prepare_frames(torch.rand(2, 3, 40, 60), group_size=2)


def test_bad_videos(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        load_video_frames(tmp_path / "missing.mp4")
    with pytest.raises(FileNotFoundError, match="not found"):
        prepare_frames(str(tmp_path / "missing.mp4"))
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"this is not a video" * 50)
    with pytest.raises(ValueError, match="unreadable or corrupt"):
        load_video_frames(corrupt)
    good = write_video(tmp_path / "good.mp4", 9, **MP4)
    data = open(good, "rb").read()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[: len(data) // 3])          # mp4 index (moov) is at the end: unreadable
    with pytest.raises(ValueError, match="unreadable or corrupt"):
        load_video_frames(truncated)
    empty = write_video(tmp_path / "empty.mkv", 0, **LOSSLESS)
    with pytest.raises(ValueError, match="empty"):
        load_video_frames(empty)
    empty_mp4 = write_video(tmp_path / "empty.mp4", 0, **MP4)
    with pytest.raises(ValueError, match="no video stream|empty"):
        prepare_frames(empty_mp4)
    zero = tmp_path / "zero.mp4"
    zero.write_bytes(b"")
    with pytest.raises(ValueError, match="empty|unreadable"):
        load_video_frames(zero)


def test_bad_image_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        load_image_folder(tmp_path / "nope")
    os.mkdir(tmp_path / "empty")
    with pytest.raises(ValueError, match="holds no images"):
        load_image_folder(tmp_path / "empty")
    os.mkdir(tmp_path / "bad")
    (tmp_path / "bad" / "a.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot read image .*a\.png"):
        load_image_folder(tmp_path / "bad")
