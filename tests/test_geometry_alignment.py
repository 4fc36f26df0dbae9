"""gather_index: against a slow direct construction, against Qwen2.5-VL's image processor order, batching, errors."""
import numpy as np
import pytest
import torch

from geoalign.geometry import (
    build_gather_index,
    check_grid_thw,
    check_grids,
    check_qwen_size,
    check_token_count,
    concat_gather_indices,
    gather_rows,
    num_visual_tokens,
    qwen_grid_for_vggt,
    qwen_grid_thw,
)


def slow_gather_index(num_frames, vggt_grid, group_size):
    """Direct loops: token order (frame or temporal pair, r, c); slot order (dt,) dy, dx."""
    h_v, w_v = vggt_grid
    h_q, w_q = h_v - h_v % 2, w_v - w_v % 2
    rows = []
    if group_size == 4:
        groups = [[f] for f in range(num_frames)]
    else:
        groups = [[2 * t, min(2 * t + 1, num_frames - 1)] for t in range((num_frames + 1) // 2)]
    for frames in groups:
        for r in range(h_q // 2):
            for c in range(w_q // 2):
                row = []
                for f in frames:
                    for dy in (0, 1):
                        for dx in (0, 1):
                            y, x = 2 * r + dy, 2 * c + dx
                            row.append(f * h_v * w_v + y * w_v + x)
                rows.append(row)
    return torch.tensor(rows, dtype=torch.int64)


@pytest.mark.parametrize("group_size", [4, 8])
@pytest.mark.parametrize("num_frames", [1, 2, 3, 5])
@pytest.mark.parametrize("vggt_grid", [(2, 2), (3, 5), (4, 7), (28, 37), (37, 37)])
def test_gather_index_matches_slow(num_frames, vggt_grid, group_size):
    gi = build_gather_index(num_frames, vggt_grid, group_size=group_size)
    assert gi.dtype == torch.int64 and gi.is_contiguous()
    ref = slow_gather_index(num_frames, vggt_grid, group_size)
    assert gi.shape == ref.shape == (num_visual_tokens(num_frames, qwen_grid_for_vggt(vggt_grid), group_size),
                                     group_size)
    assert torch.equal(gi, ref)
    assert int(gi.max()) < num_frames * vggt_grid[0] * vggt_grid[1]


def test_paper_scale_shapes():
    # 640x480 -> 518x392 -> 28x37 patches -> 28x36 -> 14x18 = 252 tokens per frame
    gi = build_gather_index(32, (28, 37), (28, 36), group_size=4)
    assert gi.shape == (32 * 252, 4)
    gi8 = build_gather_index(32, (28, 37), group_size=8)
    assert gi8.shape == (16 * 252, 8)
    assert torch.equal(gi8[:, :4], gi[0::1].view(32, 252, 4)[0::2].reshape(-1, 4))
    assert torch.equal(gi8[:, 4:], gi.view(32, 252, 4)[1::2].reshape(-1, 4))


def test_odd_frame_count_repeats_last_frame():
    gi = build_gather_index(3, (4, 4), group_size=8)
    per = 4
    assert gi.shape == (2 * per, 8)
    last = gi[per:]
    # second temporal pair = (frame 2, frame 2): Qwen's video processor repeats the last frame
    assert torch.equal(last[:, :4], last[:, 4:])
    assert torch.equal(last[:, :4] // 16, torch.full((per, 4), 2))
    assert torch.equal(qwen_grid_thw(3, (4, 4), 8), torch.tensor([[2, 4, 4]]))
    assert torch.equal(qwen_grid_thw(3, (4, 4), 4), torch.tensor([[1, 4, 4]] * 3))


def test_gather_rows_reads_the_right_patches():
    s, h_v, w_v = 2, 3, 5
    # layer tensor whose row value encodes (frame, y, x)
    f = torch.arange(s).view(s, 1, 1).expand(s, h_v, w_v)
    y = torch.arange(h_v).view(1, h_v, 1).expand(s, h_v, w_v)
    x = torch.arange(w_v).view(1, 1, w_v).expand(s, h_v, w_v)
    layer = torch.stack([f, y, x], dim=-1).reshape(1, s, h_v * w_v, 3).float()
    gi = build_gather_index(s, (h_v, w_v))
    got = gather_rows(layer, gi).view(-1, 4, 3)
    # token 0 of frame 1 (qwen grid 2x4 -> 1x2 cells per frame, so token 2) -> frame 1 patches (0,0),(0,1),(1,0),(1,1)
    assert got[2].tolist() == [[1, 0, 0], [1, 0, 1], [1, 1, 0], [1, 1, 1]]
    assert got[1].tolist() == [[0, 0, 2], [0, 0, 3], [0, 1, 2], [0, 1, 3]]


def test_qwen_merge_order_matches_qwen2vl_image_processor():
    try:
        from transformers import Qwen2VLImageProcessorPil
    except ImportError:  # pragma: no cover - older transformers
        pytest.skip("transformers has no Qwen2VLImageProcessorPil")

    proc = Qwen2VLImageProcessorPil(do_resize=False, do_rescale=False, do_normalize=False,
                                    patch_size=14, merge_size=2, temporal_patch_size=2)
    for h_px, w_px in ((56, 84), (84, 112)):
        hp, wp = h_px // 14, w_px // 14
        ys, xs = np.meshgrid(np.arange(h_px) // 14, np.arange(w_px) // 14, indexing="ij")
        img = np.stack([ys, xs, np.zeros_like(ys)], 0).astype(np.float32)      # CHW, channel 0 = py, 1 = px
        out = proc(images=[img, img], return_tensors="pt", input_data_format="channels_first")
        pv = out["pixel_values"]
        assert out["image_grid_thw"].tolist() == [[1, hp, wp]] * 2
        # each flattened patch row is (C, T, 14, 14): channel c starts at c * 2 * 14 * 14
        py = pv[:, 0].long()
        px = pv[:, 2 * 14 * 14].long()
        assert torch.all(pv[:, : 2 * 14 * 14] == pv[:, :1])  # constant within the patch (sanity)
        # Qwen's patch order, in rows of a VGGT grid that is one column wider (cropped top-left to Qwen's grid)
        w_v = wp + 1
        frame = torch.arange(2).repeat_interleave(hp * wp)
        qwen_rows = frame * (hp * w_v) + py * w_v + px
        gi = build_gather_index(2, (hp, w_v), (hp, wp), group_size=4)
        assert torch.equal(gi.reshape(-1), qwen_rows)
        # the design note's listing for the first merged cells: (0,0),(0,1),(1,0),(1,1),(0,2),(0,3),...
        assert list(zip(py[:6].tolist(), px[:6].tolist())) == [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3)]
        check_grid_thw(out["image_grid_thw"], 2, (hp, wp), 4)


def test_check_qwen_size_agrees_with_smart_resize():
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    except ImportError:  # pragma: no cover - older transformers
        pytest.skip("transformers has no PIL Qwen2-VL image processor")

    for h, w in ((392, 504), (504, 504), (28, 504), (56, 56), (28, 28), (1120, 1120), (2240, 1120)):
        kept = smart_resize(h, w, factor=28, min_pixels=56 * 56, max_pixels=28 * 28 * 1280) == (h, w)
        if kept:
            check_qwen_size(h, w)
        else:
            with pytest.raises(ValueError, match="smart_resize would rescale"):
                check_qwen_size(h, w)


def test_concat_gather_indices():
    a = build_gather_index(2, (4, 5))
    b = build_gather_index(3, (2, 3), group_size=8)
    with pytest.raises(ValueError, match=r"must be \[L, 4\]"):
        concat_gather_indices([a, b], [40, 18])
    c = build_gather_index(1, (2, 3))
    cat = concat_gather_indices([a, c, a], [2 * 20, 1 * 6, 2 * 20])
    assert cat.dtype == torch.int64 and cat.shape == (a.shape[0] * 2 + c.shape[0], 4)
    assert torch.equal(cat[: a.shape[0]], a)
    assert torch.equal(cat[a.shape[0]: a.shape[0] + c.shape[0]], c + 40)
    assert torch.equal(cat[-a.shape[0]:], a + 46)
    # equal samples in one [B, S, h*w, D] layer: indexing the flat batch gives each sample's own rows
    layer = torch.randn(3, 2, 20, 6)
    gi = concat_gather_indices([a] * 3, [40] * 3)
    got = gather_rows(layer, gi).view(3, a.shape[0], -1)
    for bi in range(3):
        assert torch.equal(got[bi], gather_rows(layer[bi], a))
    with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
        concat_gather_indices([a], [10])
    with pytest.raises(ValueError, match="2 gather_index tensors but 1 row counts"):
        concat_gather_indices([a, a], [40])


def test_grid_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"Qwen token grid 26x36 patches does not match VGGT's patch grid 28x37.*28x36"):
        build_gather_index(2, (28, 37), (26, 36))
    with pytest.raises(ValueError, match="does not match"):
        check_grids((28, 37), (28, 38))
    with pytest.raises(ValueError, match="too small"):
        build_gather_index(1, (1, 5))
    with pytest.raises(ValueError, match="group_size must be 4"):
        build_gather_index(1, (4, 4), group_size=6)
    with pytest.raises(ValueError, match="num_frames must be a positive int"):
        build_gather_index(0, (4, 4))
    with pytest.raises(ValueError, match=r"token mismatch: gather_index has 8 rows.*Qwen produced 9"):
        check_token_count(build_gather_index(2, (4, 4)), 9)
    with pytest.raises(ValueError, match=r"grid_thw \[\[1, 4, 4\]\] does not match.*expected \[\[1, 4, 4\], \[1, 4, 4\]\]"):
        check_grid_thw([[1, 4, 4]], 2, (4, 4), 4)
