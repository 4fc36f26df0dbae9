"""gather_index: against a slow direct construction, against Qwen2.5-VL's image processor order, batching, errors."""
import re

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


# --- argument checking: which argument is wrong and what was received ---------------------------------------------

BAD_GRIDS = [(4, 4, 4), (4,), (True, 4), (4, False), (4, 2.5), (0, 4), (4, 0), (-2, 4)]


@pytest.mark.parametrize("bad", BAD_GRIDS)
def test_bad_grids_name_the_argument_and_value(bad):
    def raises(name):
        return pytest.raises(ValueError, match=rf"^{name} must be \(height, width\) in patches, two positive ints, "
                                               rf"got {re.escape(str(tuple(bad)))}$")

    with raises("vggt_grid"):
        qwen_grid_for_vggt(bad)
    with raises("vggt_grid"):
        check_grids(bad, (4, 4))
    with raises("qwen_grid"):
        check_grids((4, 4), bad)
    with raises("vggt_grid"):
        build_gather_index(1, bad)
    with raises("qwen_grid"):
        build_gather_index(1, (4, 4), bad)
    with raises("qwen_grid"):
        num_visual_tokens(1, bad)
    with raises("qwen_grid"):
        qwen_grid_thw(1, bad)
    with raises("qwen_grid"):
        check_grid_thw([[1, 4, 4]], 1, bad)


def test_integral_grid_values_are_accepted_as_ints():
    # e.g. a grid computed as pixels / 14 in floating point, or numpy integers from an array's shape
    assert qwen_grid_for_vggt((28.0, np.int64(37))) == (28, 36)
    assert all(type(v) is int for v in qwen_grid_for_vggt((28.0, np.int64(37))))
    assert torch.equal(build_gather_index(2, (3.0, 5.0)), build_gather_index(2, (3, 5)))


@pytest.mark.parametrize("bad", [0, -1, True, False, 2.5])
def test_bad_num_frames_is_rejected_everywhere(bad):
    msg = rf"num_frames must be a positive int, got {re.escape(repr(bad))}$"
    for group_size in (4, 8):
        with pytest.raises(ValueError, match=msg):
            build_gather_index(bad, (4, 4), group_size=group_size)
        with pytest.raises(ValueError, match=msg):
            num_visual_tokens(bad, (4, 4), group_size)
        with pytest.raises(ValueError, match=msg):
            qwen_grid_thw(bad, (4, 4), group_size)
        with pytest.raises(ValueError, match=msg):
            check_grid_thw([[1, 4, 4]], bad, (4, 4), group_size)


def test_integral_float_num_frames_counts_as_that_many_frames():
    for group_size in (4, 8):
        assert torch.equal(build_gather_index(3.0, (3, 5), group_size=group_size),
                           build_gather_index(3, (3, 5), group_size=group_size))
        assert build_gather_index(3.0, (3, 5), group_size=group_size).dtype == torch.int64
        n = num_visual_tokens(3.0, (2, 4), group_size)
        assert n == (6 if group_size == 4 else 4) and type(n) is int
        assert torch.equal(qwen_grid_thw(3.0, (2, 4), group_size), qwen_grid_thw(3, (2, 4), group_size))


def test_group_size_other_than_4_or_8_is_rejected():
    msg = r"group_size must be 4 \(images\) or 8 \(video, temporal patch 2\), got 6"
    with pytest.raises(ValueError, match=msg):
        num_visual_tokens(2, (4, 4), 6)
    with pytest.raises(ValueError, match=msg):
        qwen_grid_thw(2, (4, 4), 6)
    with pytest.raises(ValueError, match=msg):
        check_grid_thw([[1, 4, 4]], 2, (4, 4), 6)
    with pytest.raises(ValueError, match=msg):
        build_gather_index(2, (4, 4), group_size=6)


def test_only_qwen_2x2_merge_is_supported_by_gather_index():
    with pytest.raises(ValueError, match=r"only Qwen2.5-VL's 2x2 merge is supported, got merge_size=3"):
        build_gather_index(1, (6, 6), merge_size=3)
    assert torch.equal(build_gather_index(1, (6, 6), merge_size=2), build_gather_index(1, (6, 6)))
    for bad in (2.0, True, "2"):  # equal to 2 is not enough: a float or bool merge size is a caller's mistake
        with pytest.raises(ValueError, match=rf"got merge_size={re.escape(repr(bad))}"):
            build_gather_index(1, (6, 6), merge_size=bad)


# --- crops -------------------------------------------------------------------------------------------------------

def test_qwen_crop_of_odd_grids():
    assert qwen_grid_for_vggt((3, 5)) == (2, 4)
    assert qwen_grid_for_vggt((2, 2)) == (2, 2)
    assert qwen_grid_for_vggt((28, 37)) == (28, 36)
    check_grids((3, 5), (2, 4))
    check_grids((28, 37), [28, 36])


@pytest.mark.parametrize("grid", [(1, 5), (5, 1), (1, 1)])
def test_grid_below_one_merged_cell_is_too_small(grid):
    h, w = grid
    msg = rf"VGGT patch grid {h}x{w} is too small for Qwen: each side needs at least 2 patches"
    with pytest.raises(ValueError, match=msg):
        qwen_grid_for_vggt(grid)
    with pytest.raises(ValueError, match=msg):
        build_gather_index(1, grid)
    with pytest.raises(ValueError, match=msg):
        check_grids(grid, (2, 2))


def test_crop_follows_merge_size():
    assert qwen_grid_for_vggt((9, 10), 4) == (8, 8)
    assert qwen_grid_for_vggt((9, 10), merge_size=3) == (9, 9)
    check_grids((9, 10), (8, 8), merge_size=4)
    with pytest.raises(ValueError, match="expected the top-left crop 8x8"):
        check_grids((9, 10), (8, 10), merge_size=4)
    with pytest.raises(ValueError, match="each side needs at least 4 patches"):
        qwen_grid_for_vggt((3, 8), 4)
    assert num_visual_tokens(2, (8, 12), 4, merge_size=4) == 2 * 2 * 3


def test_grid_mismatch_error_says_how_to_fix_it():
    # the remedy names the real helper and Qwen processor keyword, spelled as the user would type them
    with pytest.raises(ValueError, match=r"feed it the crop from crop_for_qwen with do_resize=False, or check "
                                         r"smart_resize's min/max pixels\)"):
        check_grids((28, 37), (28, 38))


# --- token counts and grid_thw -----------------------------------------------------------------------------------

def test_num_visual_tokens_defaults_to_images_and_counts_odd_frame_videos():
    # qwen grid 4x6 patches -> 2x3 merged cells per frame
    n = num_visual_tokens(3, (4, 6))                   # default: frames as images (G=4)
    assert n == 3 * 6 and type(n) is int             # an int: it is used as a size (torch.empty(n, ...), range(n))
    assert num_visual_tokens(3, (4, 6), 4) == 18
    for s, t in ((1, 1), (2, 1), (3, 2), (4, 2), (5, 3)):
        n8 = num_visual_tokens(s, (4, 6), 8)
        assert n8 == t * 6 and type(n8) is int
        assert n8 == build_gather_index(s, (5, 7), group_size=8).shape[0]
    assert num_visual_tokens(32, (28, 36)) == 32 * 252
    assert num_visual_tokens(31, (28, 36), 8) == 16 * 252


def test_qwen_grid_thw_defaults_to_images():
    thw = qwen_grid_thw(3, (4, 6))
    assert thw.dtype == torch.int64 and thw.tolist() == [[1, 4, 6]] * 3
    vid = qwen_grid_thw(5, (4, 6), 8)
    assert vid.dtype == torch.int64 and vid.tolist() == [[3, 4, 6]]


def test_check_grid_thw_accepts_what_qwen_produces():
    check_grid_thw([[1, 4, 6]] * 3, 3, (4, 6))                                 # default: images
    check_grid_thw(torch.tensor([[1, 4, 6]] * 3, dtype=torch.int32), 3, (4, 6), 4)
    check_grid_thw(np.array([1, 4, 6]), 1, (4, 6))                             # one image, flat row
    check_grid_thw([[2, 4, 6]], 3, (4, 6), 8)                                  # video: ceil(3/2) temporal pairs
    check_grid_thw(torch.tensor([[2, 4, 6]]), 4, (4, 6), 8)


@pytest.mark.parametrize("grid_thw, num_frames, group_size, expected", [
    ([[1, 4, 8]], 1, 4, [[1, 4, 6]]),                  # same shape, wrong width
    ([[2, 4, 6]], 1, 4, [[1, 4, 6]]),                  # same shape, wrong t
    ([[3, 4, 6]], 3, 8, [[2, 4, 6]]),                  # video: t must be ceil(S/2), not S
    ([[1, 4, 6]] * 3, 3, 8, [[2, 4, 6]]),              # images given where a video is expected
    ([[2, 4, 6]], 3, 4, [[1, 4, 6], [1, 4, 6], [1, 4, 6]]),
])
def test_check_grid_thw_rejects_mismatches(grid_thw, num_frames, group_size, expected):
    got = re.escape(str(grid_thw))
    with pytest.raises(ValueError, match=rf"grid_thw {got} does not match the VGGT-aligned frames: expected "
                                         rf"{re.escape(str(expected))} for {num_frames} frames, grid \(4, 6\), "
                                         rf"G={group_size}"):
        check_grid_thw(grid_thw, num_frames, (4, 6), group_size)


@pytest.mark.parametrize("grid_thw", [[[1.5, 4, 6]], torch.tensor([[1.0, 4.0, 6.0]]), np.array([[True, True, True]])])
def test_check_grid_thw_rejects_non_integer_grids(grid_thw):
    # rounding 1.5 frames down to 1 would accept a grid Qwen can never produce: non-integers are an error
    with pytest.raises(ValueError, match=r"grid_thw must hold integers \(t, h, w\), got dtype torch\.(float|bool)"):
        check_grid_thw(grid_thw, 1, (4, 6))


def test_check_token_count_compares_rows_not_slots():
    gi = build_gather_index(2, (4, 7))                 # 2 frames x (2x3 cells) = 12 tokens, 4 slots each
    assert gi.shape == (12, 4)
    check_token_count(gi, 12)
    with pytest.raises(ValueError, match=r"gather_index has 12 rows .* but Qwen produced 4 visual tokens"):
        check_token_count(gi, 4)
    gi8 = build_gather_index(3, (4, 7), group_size=8)
    assert gi8.shape == (12, 8)
    check_token_count(gi8, 12)
    with pytest.raises(ValueError, match=r"gather_index has 12 rows .* but Qwen produced 8 visual tokens"):
        check_token_count(gi8, 8)


# --- batching ----------------------------------------------------------------------------------------------------

def test_concat_gather_indices_rejects_bad_inputs():
    with pytest.raises(ValueError, match="need at least one gather_index"):
        concat_gather_indices([], [])
    with pytest.raises(ValueError, match=r"gather_index 0 must be \[L, 4\], got \(4,\)"):
        concat_gather_indices([torch.arange(4)], [10])
    with pytest.raises(ValueError, match=r"gather_index 1 must be \[L, 4\], got \(2, 2, 4\)"):
        concat_gather_indices([torch.zeros(2, 4, dtype=torch.int64), torch.zeros(2, 2, 4, dtype=torch.int64)],
                              [10, 10])
    a = build_gather_index(1, (2, 3))                  # rows 0, 1, 3, 4 of a 6-row sample
    assert int(a.max()) == 4
    assert torch.equal(concat_gather_indices([a], [5]), a)          # the last row is inside [0, rows)
    with pytest.raises(ValueError, match=r"gather_index 0 holds rows outside \[0, 4\) \(max 4\)"):
        concat_gather_indices([a], [4])
    with pytest.raises(ValueError, match=r"gather_index 1 holds rows outside \[0, 6\)"):
        concat_gather_indices([a, a - 1], [6, 6])


def test_concat_gather_indices_returns_int64_from_narrower_indices():
    # indices stored or produced as int32 (e.g. loaded from disk) are widened before the batch offset is added
    a = build_gather_index(2, (3, 5))
    out = concat_gather_indices([a.to(torch.int32), a.to(torch.int32)], [30, 30])
    assert out.dtype == torch.int64
    assert torch.equal(out, torch.cat([a, a + 30]))


def test_grid_thw_of_any_integer_dtype_is_accepted():
    """Qwen's processor gives int64, but a grid read back from int32 storage is the same grid."""
    for dtype in (torch.int32, torch.int16, torch.uint8):
        check_grid_thw(torch.tensor([[1, 4, 4], [1, 4, 4]], dtype=dtype), 2, (4, 4), 4)
        check_grid_thw(torch.tensor([[1, 3, 5]], dtype=dtype), 2, (3, 5), 8)


def test_concat_of_no_indices_is_a_clear_error():
    with pytest.raises(ValueError, match="^need at least one gather_index$"):
        concat_gather_indices([], [])
