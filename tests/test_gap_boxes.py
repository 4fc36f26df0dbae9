"""GAP-MLLM object-level metrics (geoalign/eval/boxes3d.py) on hand-computed cases: box text format and parser,
axis-aligned 3D IoU, ScanNet detection AP/mAP (VoteNet protocol) and ScanRefer grounding accuracy."""
import math

import numpy as np
import pytest
import torch

from geoalign.eval import boxes3d
from geoalign.eval.boxes3d import (Box3D, average_precision, detection_map, format_boxes, grounding_accuracy, iou3d,
                                   iou3d_pairwise, parse_boxes)


def cube(x=0.0, y=0.0, z=0.0, side=1.0, label="chair", score=1.0):
    return Box3D(label, (x, y, z), (side, side, side), score)


# ----------------------------------------------------------------------------------------------------------- Box3D
def test_box3d_stores_float_tuples_and_its_array():
    b = Box3D("chair", [1, 2, 3], np.array([0.5, 0.25, 2]), score=np.float32(0.5))
    assert b.center == (1.0, 2.0, 3.0) and b.size == (0.5, 0.25, 2.0) and b.score == 0.5
    assert all(type(v) is float for v in b.center + b.size) and type(b.score) is float
    assert b.as_array().dtype == np.float64 and b.as_array().tolist() == [1.0, 2.0, 3.0, 0.5, 0.25, 2.0]
    assert Box3D("x", (0, 0, 0), (1, 1, 1)).score == 1.0


@pytest.mark.parametrize("center, size, exc, message", [
    ((0, 0, 0), (1, 1, -1), ValueError, "size must be >= 0"),          # a size of 0 is a (zero-size) box
    ((0, float("nan"), 0), (1, 1, 1), ValueError, "non-finite"),
    ((0, 0, 0), (1, 1, float("inf")), ValueError, "non-finite"),
    ((0, 0), (1, 1, 1), ValueError, "center must be 3 numbers (metres), got 2"),
    ((0, 0, 0), (1, 1, 1, 1), ValueError, "size must be 3 numbers (metres), got 4"),
    ("123", (1, 1, 1), TypeError, "center must be 3 numbers (metres), got str"),
    ((1e20, 0, 0), (1, 1, 1), ValueError, "vanishing extent"),          # 1e20 + 0.5 == 1e20 - 0.5 in float64
])
def test_box3d_rejects_bad_boxes(center, size, exc, message):
    with pytest.raises(exc) as e:
        Box3D("chair", center, size)
    assert message in str(e.value)


def test_box3d_rejects_a_box_whose_extent_vanishes_in_float64():
    # at x = 1e16 doubles are 2 apart: 1e16 -+ 0.5 both round to 1e16 (no extent), 1e16 -+ 1.5 to 1e16 -+ 2
    with pytest.raises(ValueError, match="vanishing extent or infinite volume"):
        Box3D("far", (1e16, 0, 0), (1, 1, 1))
    far = Box3D("far", (1e16, 0, 0), (3, 1, 1))
    assert iou3d(far, far) == 1.0
    with pytest.raises(ValueError, match="vanishing extent or infinite volume"):
        Box3D("huge", (0, 0, 0), (1e200, 1e200, 1))
    # the check uses the extents centre -+ size / 2: where the spacing of doubles differs on the two sides
    # (4 below -2**54 and above 2**54, 2 on the other side), -+ 1.2 moves only one side, by 2: a valid box
    for x in (2.0**54, -2.0**54):
        edge = Box3D("edge", (x, 0, 0), (2.4, 1, 1))
        assert iou3d(edge, edge) == 1.0


def test_box3d_rejects_a_non_str_label_and_a_nan_score():
    with pytest.raises(TypeError, match="label must be a str, got int"):
        Box3D(3, (0, 0, 0), (1, 1, 1))
    with pytest.raises(ValueError, match="score must be finite"):
        Box3D("chair", (0, 0, 0), (1, 1, 1), score=float("nan"))


# ------------------------------------------------------------------------------------------------------------- IoU
def test_iou_of_unit_cubes_offset_by_half_is_one_third():
    # x-extents [-0.5, 0.5] and [0, 1] overlap by 0.5; y, z fully: intersection 0.5, union 1 + 1 - 0.5 = 1.5
    for offset in ((0.5, 0, 0), (0, 0.5, 0), (0, 0, -0.5)):
        assert iou3d(cube(), cube(*offset)) == 0.5 / 1.5
        assert iou3d(cube(*offset), cube()) == 0.5 / 1.5


def test_iou_of_boxes_with_different_sizes_by_hand():
    # a: [-1, 1] x [-2, 2] x [-3, 3] (volume 48); b: [0, 2] x [0, 2] x [0, 2] (volume 8)
    # overlap 1 x 2 x 2 = 4; union 48 + 8 - 4 = 52
    a, b = Box3D("a", (0, 0, 0), (2, 4, 6)), Box3D("b", (1, 1, 1), (2, 2, 2))
    assert iou3d(a, b) == pytest.approx(4 / 52, rel=1e-15)
    assert iou3d([0, 0, 0, 2, 4, 6], (1, 1, 1, 2, 2, 2)) == iou3d(a, b)


def test_iou_identical_is_exactly_one_disjoint_and_touching_are_zero():
    b = Box3D("x", (1.23, -0.37, 2.11), (0.53, 0.71, 0.93))
    assert iou3d(b, b) == 1.0
    assert iou3d(cube(), cube(5, 0, 0)) == 0.0
    assert iou3d(cube(), cube(0, 0, 1)) == 0.0            # sharing a face: no volume in common
    assert iou3d(cube(), cube(1.5, 0.5, 0)) == 0.0        # apart in x although they overlap in y


def test_iou_of_a_box_inside_another_is_the_volume_ratio():
    big, unit = Box3D("t", (0, 0, 0), (2, 2, 1)), cube()
    assert iou3d(big, unit) == 0.25 and iou3d(unit, big) == 0.25
    assert iou3d(Box3D("t", (0, 0, 0), (2, 1, 1)), unit) == 0.5


def test_pairwise_iou_is_every_pair():
    a = [cube(), cube(0.5, 0, 0), Box3D("t", (0, 0, 0), (2, 1, 1))]
    b = [cube(), cube(5, 0, 0), Box3D("t", (0, 0, 0), (2, 2, 1))]
    # the cube at x = 0.5 spans [0, 1] x [-.5, .5] x [-.5, .5]: inside the 2 x 2 x 1 box -> 1 / 4
    # the 2 x 1 x 1 box holds the unit cube (1 / 2) and lies inside the 2 x 2 x 1 box (2 / 4)
    expected = np.array([[1.0, 0.0, 0.25],
                         [1 / 3, 0.0, 0.25],
                         [0.5, 0.0, 0.5]])
    got = iou3d_pairwise(a, b)
    assert got.shape == (3, 3) and got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=1e-15, atol=0)
    as_array = np.stack([x.as_array() for x in a]), np.stack([x.as_array() for x in b])
    np.testing.assert_array_equal(iou3d_pairwise(*as_array), got)
    np.testing.assert_array_equal(iou3d_pairwise(torch.tensor(as_array[0]), as_array[1].tolist()), got)
    assert iou3d_pairwise(cube(), b).shape == (1, 3)
    assert iou3d(torch.tensor([0.5, 0, 0, 1, 1, 1]), cube()) == 0.5 / 1.5
    # tensors that require grad (a model's output) are read without autograd
    grad = torch.tensor(as_array[0], requires_grad=True)
    np.testing.assert_array_equal(iou3d_pairwise(grad, b), got)
    assert iou3d(cube(), torch.tensor([0.5, 0, 0, 1, 1, 1], requires_grad=True)) == 0.5 / 1.5


def old_extent_iou(a, b):
    """The IoU this module computed before (volumes from the corner extents, (hi - lo).prod()), for comparison."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    a_lo, a_hi, b_lo, b_hi = a[:3] - a[3:] / 2, a[:3] + a[3:] / 2, b[:3] - b[3:] / 2, b[:3] + b[3:] / 2
    inter = np.clip(np.minimum(a_hi, b_hi) - np.maximum(a_lo, b_lo), 0.0, None).prod()
    return float(inter / ((a_hi - a_lo).prod() + (b_hi - b_lo).prod() - inter))


# Boxes whose IoU is exactly 0.25 or 0.5 on paper, where the old extent-volume IoU landed one ulp (float64 spacing
# 2.8e-17 below 0.25, 5.6e-17 below 0.5, 1.1e-16 above) off the threshold. Found by a search over boxes with
# 1-decimal x-centre and x-size (y, z: unit, centred), keeping those whose exact (Fraction) IoU is 1/4 or 1/2 and
# whose old float IoU was not; the numbers are hard-coded here. Only x differs, so IoU = overlap_x / union_x.
EXACT_IOU_CASES = [
    # x-extents [-.15, .15] and [-.05, .65]: overlap .2, union .3 + .7 - .2 = .8 -> .25 (old: one ulp below)
    ([0, 0, 0, 0.3, 1, 1], [0.3, 0, 0, 0.7, 1, 1], 0.25, 0.24999999999999997),
    # [-.3, .9] and [-.1, 1.7]: overlap 1, union 1.2 + 1.8 - 1 = 2 -> .5 (old: one ulp below)
    ([0.3, 0, 0, 1.2, 1, 1], [0.8, 0, 0, 1.8, 1, 1], 0.5, 0.49999999999999994),
    # [.05, .15] inside [-.2, .2]: .1 / .4 -> .25 (old: one ulp above)
    ([0, 0, 0, 0.4, 1, 1], [0.1, 0, 0, 0.1, 1, 1], 0.25, 0.25000000000000006),
    # [.4, 1.4] inside [.3, 2.3]: 1 / 2 -> .5 (old: one ulp above)
    ([1.3, 0, 0, 2.0, 1, 1], [0.9, 0, 0, 1.0, 1, 1], 0.5, 0.5000000000000001),
]


@pytest.mark.parametrize("a, b, on_paper, old", EXACT_IOU_CASES)
def test_iou_from_sizes_is_exact_where_the_extent_volumes_were_an_ulp_off(a, b, on_paper, old):
    assert old_extent_iou(a, b) == old and abs(old - on_paper) == np.spacing(min(old, on_paper))
    assert iou3d(a, b) == on_paper and iou3d(b, a) == on_paper        # volumes from the sizes: exact
    # the decisions follow: ScanRefer's inclusive >= is a hit (the two "below" cases used to miss), VoteNet's
    # strict > a miss at that threshold (the two "above" cases used to be true positives)
    target, pred = Box3D("t", a[:3], a[3:]), Box3D("t", b[:3], b[3:])
    assert grounding_accuracy([pred], [target], thresholds=(on_paper,))[f"acc@{on_paper:g}"] == 1.0
    assert detection_map({"s": [pred]}, {"s": [target]}, thresholds=(on_paper,))[f"mAP@{on_paper:g}"] == 0.0


def test_zero_size_box_has_iou_zero_with_everything():
    flat = Box3D("chair", (0, 0, 0), (1, 0, 1))                     # size 0 in y: volume 0
    assert iou3d(flat, cube()) == 0.0 and iou3d(cube(), flat) == 0.0   # inside the unit cube, still 0
    assert iou3d(flat, flat) == 0.0                                    # 0 / 0 would be NaN: 0 as well
    assert iou3d([0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]) == 0.0
    got = iou3d_pairwise([flat, cube()], [cube(), flat])
    np.testing.assert_array_equal(got, [[0.0, 0.0], [1.0, 0.0]])
    assert not np.isnan(got).any()


def test_zero_size_predicted_box_is_a_false_positive_detection():
    # VoteNet counts every output box: the zero-size line is a detection of IoU 0, ranked first (output order)
    gt = {"s": [cube()]}
    text = "chair: [0, 0, 0, 0, 1, 1]\nchair: [0, 0, 0, 1, 1, 1]\nchair: [0, 0, 0, -1, 1, 1]"
    parsed = parse_boxes(text)
    assert [b.size for b in parsed.boxes] == [(0.0, 1.0, 1.0), (1.0, 1.0, 1.0)]
    assert parsed.rejected == [("chair: [0, 0, 0, -1, 1, 1]", "size must be >= 0 in every axis")]
    # ranked FP, TP: recall [0, 1], precision [0, 1/2] -> AP = (1 - 0) * 1/2 = 0.5 at both thresholds
    # (dropping the zero-size line as malformed gave TP alone: AP 1)
    got = detection_map({"s": text}, gt)
    assert got["mAP@0.25"] == got["mAP@0.5"] == 0.5
    assert got["num_pred"] == {"chair": 2} and got["malformed"] == 1    # the negative size only
    # even at threshold 0 it never matches (VoteNet: IoU 0 is not > 0)
    assert detection_map({"s": "chair: [0, 0, 0, 1, 1, 0]"}, gt, thresholds=(0.0,))["mAP@0"] == 0.0


def test_iou_rejects_bad_programmatic_boxes():
    with pytest.raises(ValueError, match=r"a must have shape \[N, 6\] .*got \(2, 5\)"):
        iou3d_pairwise(np.zeros((2, 5)), [cube()])
    with pytest.raises(ValueError, match=r"b\[1\] = \[0.0, 0.0, 0.0, 1.0, -1.0, 1.0\]: size must be >= 0"):
        iou3d_pairwise([cube()], [[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, -1, 1]])
    with pytest.raises(ValueError, match=r"^b must be a Box3D or 6 numbers .*got shape \(5,\)"):
        iou3d(cube(), [0, 0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"^a must be a Box3D or 6 numbers .*got shape \(2, 3\)"):
        iou3d([[0, 0, 0], [1, 1, 1]], cube())
    with pytest.raises(ValueError, match="non-finite"):
        iou3d(cube(), [0, 0, math.nan, 1, 1, 1])


# -------------------------------------------------------------------------------------------------- text <-> boxes
def test_format_boxes_exact_text_and_order():
    objs = [
        Box3D("table", (0.0, 1.0, 2.0), (1.2, 0.8, 0.75)),
        Box3D("chair", (2.0, 0.0, 1.0), (0.5, 0.5, 0.9)),
        Box3D("chair", (1.234, -0.001, 2.1), (0.5, 0.5, 0.9)),     # 1.234 -> 1.23, -0.001 -> "0.00" (not "-0.00")
        Box3D("chair", (2.0, -1.0, 1.0), (0.456, 0.5, 0.9)),       # same x as the one above: y decides
        Box3D("bed", (-3.0, 0.5, 4.0), (2.0, 1.6, 0.5)),
    ]
    assert format_boxes(objs) == "\n".join([
        "bed: [-3.00, 0.50, 4.00, 2.00, 1.60, 0.50]",
        "chair: [1.23, 0.00, 2.10, 0.50, 0.50, 0.90]",
        "chair: [2.00, -1.00, 1.00, 0.46, 0.50, 0.90]",
        "chair: [2.00, 0.00, 1.00, 0.50, 0.50, 0.90]",
        "table: [0.00, 1.00, 2.00, 1.20, 0.80, 0.75]",
    ])
    assert format_boxes(reversed(objs)) == format_boxes(objs)
    assert format_boxes([]) == ""


def test_format_boxes_orders_by_centre_then_size_and_ignores_score():
    small, big = Box3D("cup", (0, 0, 0), (0.1, 0.1, 0.1), 0.1), Box3D("cup", (0, 0, 0), (0.2, 0.1, 0.1), 0.9)
    assert format_boxes([big, small]).split("\n") == ["cup: [0.00, 0.00, 0.00, 0.10, 0.10, 0.10]",
                                                     "cup: [0.00, 0.00, 0.00, 0.20, 0.10, 0.10]"]
    z = [Box3D("cup", (0, 0, 1), (0.1, 0.1, 0.1)), Box3D("cup", (0, 0, -1), (0.1, 0.1, 0.1))]
    assert format_boxes(z).split("\n")[0] == "cup: [0.00, 0.00, -1.00, 0.10, 0.10, 0.10]"


def test_format_parse_round_trip_is_exact_to_two_decimals():
    rng = np.random.default_rng(0)
    labels = ["chair", "table", "office chair", "Lamp"]
    objs = [Box3D(labels[rng.integers(4)], rng.uniform(-5, 5, 3), rng.uniform(0.05, 3, 3)) for _ in range(40)]
    text = format_boxes(objs)
    parsed = parse_boxes(text)
    assert parsed.malformed == 0 and len(parsed.boxes) == 40
    rounded = sorted((Box3D(b.label, [round(v, 2) + 0.0 for v in b.center], [round(v, 2) for v in b.size])
                      for b in objs), key=lambda b: (b.label, b.center, b.size))
    assert parsed.boxes == rounded                      # every number equal to round(v, 2), in the sorted order
    assert format_boxes(parsed.boxes) == text           # and formatting again gives the same text


@pytest.mark.parametrize("box, message", [
    (Box3D("chair: big", (0, 0, 0), (1, 1, 1)), "would not read back"),
    (Box3D("chair [x]", (0, 0, 0), (1, 1, 1)), "would not read back"),
    (Box3D(" chair", (0, 0, 0), (1, 1, 1)), "would not read back"),
    (Box3D("two\nlines", (0, 0, 0), (1, 1, 1)), "would not read back"),
    (Box3D("", (0, 0, 0), (1, 1, 1)), "empty label"),
    (Box3D("cup", (0, 0, 0), (0.004, 1, 1)), "rounds to ['0.00', '1.00', '1.00']"),
])
def test_format_boxes_refuses_what_would_not_read_back(box, message):
    with pytest.raises(ValueError) as e:
        format_boxes([cube(), box])
    assert message in str(e.value) and "objects[1]" in str(e.value)
    with pytest.raises(TypeError, match=r"objects\[0\] must be a Box3D, got tuple"):
        format_boxes([("chair", (0, 0, 0), (1, 1, 1))])


CHAIR = Box3D("chair", (1.23, -0.4, 2.1), (0.5, 0.5, 0.9))


@pytest.mark.parametrize("line, label", [
    ("chair: [1.23, -0.40, 2.10, 0.50, 0.50, 0.90]", "chair"),
    ("  chair :  [ 1.23 ,-0.40,  2.10 , 0.50,0.50 , 0.90 ]  ", "chair"),
    ("chair: 1.23, -0.40, 2.10, 0.50, 0.50, 0.90", "chair"),             # no brackets
    ("chair: 1.23, -0.40, 2.10, 0.50, 0.50, 0.90.", "chair"),            # trailing period
    ("chair: [1.23, -0.40, 2.10, 0.50, 0.50, 0.90].", "chair"),
    ("chair: [1.23, -0.40, 2.10, 0.50, 0.50, 0.90],", "chair"),
    ("chair: [1.23 -0.40 2.10 0.50 0.50 0.90]", "chair"),                # spaces between the numbers
    ("chair: (1.23, -0.40, 2.10, 0.50, 0.50, 0.90)", "chair"),
    ("chair: [1.23, -0.40, 2.10], [0.50, 0.50, 0.90]", "chair"),         # centre and size apart
    ("chair: [1.23, -0.40, 2.10, 0.50, 0.50, 0.90", "chair"),            # cut off before ']'
    ("chair: [+1.23e0, -.4, 2.1, 5e-1, 0.5, .9]", "chair"),
    ("- chair: [1.23, -0.40, 2.10, 0.50, 0.50, 0.90]", "chair"),
    ("2. chair: [1.23, -0.40, 2.10, 0.50, 0.50, 0.90]", "chair"),
    ("**Office   chair**: [1.23, -0.40, 2.10, 0.50, 0.50, 0.90]", "Office chair"),
    ("Detected objects: chair [1.23, -0.40, 2.10, 0.50, 0.50, 0.90]", "chair"),
    ("Scene 1: found: office chair [1.23, -0.40, 2.10, 0.50, 0.50, 0.90]", "office chair"),   # after the last ':'
    ("`X-ray machine`: [1.23, -0.40, 2.10, 0.50, 0.50, 0.90]", "X-ray machine"),
    ("[1.23, -0.40, 2.10, 0.50, 0.50, 0.90]", ""),
    ("1.23, -0.40, 2.10, 0.50, 0.50, 0.90", ""),
])
def test_parser_tolerates_formatting_variants(line, label):
    got = parse_boxes(line)
    assert got.boxes == [Box3D(label, CHAIR.center, CHAIR.size)] and got.malformed == 0 and got.rejected == []


@pytest.mark.parametrize("line, reason", [
    ("chair: [1.0, 2.0, 3.0]", "expected 6 numbers (x, y, z, dx, dy, dz), got 3"),
    ("chair: [1, 2, 3, 1, 1, 1, 1]", "expected 6 numbers (x, y, z, dx, dy, dz), got 7"),
    ("chair: []", "expected 6 numbers (x, y, z, dx, dy, dz), got 0"),
    ("chair: [1, 2, nan, 1, 1, 1]", "non-finite number"),
    ("chair: [1, 2, 3, inf, 1, 1]", "non-finite number"),
    ("chair: [1, 2, 3, 1, 1, 1e400]", "non-finite number"),
    ("chair: [1, 2, 3, -0.5, 1, 1]", "size must be >= 0 in every axis"),    # a size of 0 is a box (IoU 0)
    ("chair: [1, 2, 3, 1, -0.00, -1]", "size must be >= 0 in every axis"),
    ("chair: [1, 2, 3, 1, 1, abc]", "unparsable number 'abc'"),
    ("chair: [1, 2.3.4, 3, 1, 1, 1]", "unparsable number '2.3.4'"),
    ("chair: [1, 2, 3, 1m, 1, 1]", "unparsable number '1m'"),
    ("chair: 1, 2, 3, 1, 1, abc", "unparsable number 'abc'"),          # no brackets: a comma and a number
    ("chair: 1, 2, 3, 1, 1, X", "unparsable number 'X'"),
    ("chair: 0.5, big", "unparsable number 'big'"),
    ("chair: 1, 2, 3, 1, 1", "expected 6 numbers (x, y, z, dx, dy, dz), got 5"),
    ("chair: 1 2 3", "expected 6 numbers (x, y, z, dx, dy, dz), got 3"),
    ("chair: [1e20, 0, 0, 1, 1, 1]",                # 1e20 + 0.5 == 1e20 - 0.5 in float64
     "size too small or too large for its centre in float64 (vanishing extent or infinite volume)"),
    ("chair: [1, 2, 3, 1, 1, 1], table: [0, 0, 0, 1, 1, 1]", "unparsable number 'table:'"),
])
def test_parser_counts_malformed_boxes(line, reason):
    got = parse_boxes(f"Here are the objects:\n{line}\ntable: [0, 0, 0, 1, 1, 1]")
    assert got.rejected == [(line, reason)] and got.malformed == 1
    assert got.boxes == [Box3D("table", (0, 0, 0), (1, 1, 1))]


@pytest.mark.parametrize("prose", [
    "", "   ", "Here are the objects:", "Note: the room is 3 m wide.", "Objects: chair, table, lamp.",
    "I see 2 chairs", "Answer: (none)", "The scene has 3 chairs, 2 tables.", "Time: 10:30, done",
])
def test_parser_skips_prose_without_counting_it(prose):
    got = parse_boxes(f"{prose}\nchair: [1.23, -0.40, 2.10, 0.50, 0.50, 0.90]\n{prose}")
    assert got.boxes == [CHAIR] and got.malformed == 0


def test_parser_keeps_output_order_and_mixed_lines():
    text = ("Sure! The objects in the first frame's coordinates:\n\n"
            "table: [0.00, 1.00, 2.00, 1.20, 0.80, 0.75]\n"
            "lamp: [1, 2, NaN, 0.2, 0.2, 0.5]\n"
            "chair: [1.23, -0.40, 2.10, 0.50, 0.50, 0.90]\r\n"
            "chair: [1.23, -0.40]\n"
            "That is all.")
    got = parse_boxes(text)
    assert [b.label for b in got.boxes] == ["table", "chair"]
    assert got.boxes[1] == CHAIR and all(b.score == 1.0 for b in got.boxes)
    assert got.rejected == [("lamp: [1, 2, NaN, 0.2, 0.2, 0.5]", "non-finite number"),
                            ("chair: [1.23, -0.40]", "expected 6 numbers (x, y, z, dx, dy, dz), got 2")]
    assert got.malformed == 2


def test_parser_none_is_no_output_and_a_non_str_is_a_type_error():
    got = parse_boxes(None)
    assert got.boxes == [] and got.malformed == 0
    with pytest.raises(TypeError, match="model output as a str, got list"):
        parse_boxes(["chair: [0, 0, 0, 1, 1, 1]"])


def test_parser_never_raises_on_any_text():
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    alphabet = st.sampled_from(list("chair:[](),.-+eE 0123456789\n\tnaif*#1.5") + ["nan", "inf", "1e400", "\u2212"])

    @hypothesis.settings(max_examples=150, derandomize=True, deadline=None, database=None)
    @hypothesis.given(st.lists(alphabet, max_size=60).map("".join) | st.text(max_size=80))
    def check(text):
        got = parse_boxes(text)
        assert got.malformed == len(got.rejected)
        assert len(got.boxes) + got.malformed <= len(text.splitlines())
        for b in got.boxes:
            assert all(math.isfinite(v) for v in b.center + b.size) and min(b.size) >= 0
            assert iou3d(b, b) == (1.0 if min(b.size) > 0 else 0.0)   # a zero-size box: IoU 0 with everything

    check()


# ------------------------------------------------------------------------------------------------------------- AP
def test_average_precision_all_point_by_hand():
    # recall [1/3, 1/3, 1/3, 2/3], precision [1, 1/2, 1/3, 1/2]; sentinels: r = [0, .., 1], p = [0, .., 0]
    # envelope from the right: p = [1, 1, .5, .5, .5, 0]; recall changes after indices 0, 3, 4:
    # AP = (1/3 - 0) * 1 + (2/3 - 1/3) * 0.5 + (1 - 2/3) * 0 = 0.5
    assert average_precision([1 / 3, 1 / 3, 1 / 3, 2 / 3], [1, 1 / 2, 1 / 3, 1 / 2]) == pytest.approx(0.5, abs=1e-15)
    assert average_precision([], []) == 0.0
    assert average_precision([1.0], [1.0]) == 1.0
    # a dip then a rise: the envelope lifts the dip to the later precision (not a plain sum of precision * step)
    # r = [.5, .5, 1], p = [1, .5, 2/3]: envelope [1, 2/3, 2/3]: AP = .5 * 1 + .5 * 2/3
    assert average_precision([0.5, 0.5, 1.0], [1.0, 0.5, 2 / 3]) == pytest.approx(0.5 + 1 / 3, abs=1e-15)
    with pytest.raises(ValueError, match=r"one length, got shapes \(2,\) and \(3,\)"):
        average_precision([0.5, 1.0], [1.0, 1.0, 1.0])


def chairs_case():
    """3 ground-truth chairs, 4 predictions: a hit, a duplicate of it, a false positive, a hit (AP 0.5)."""
    gt = {"scene0": [cube(0), cube(5), cube(10)]}
    preds = [
        cube(50, score=0.7),        # rank 3: no ground truth near -> false positive
        cube(5, score=0.6),         # rank 4: exactly chair 2 -> true positive
        cube(0, score=0.9),         # rank 1: exactly chair 1 -> true positive
        cube(0.1, score=0.8),       # rank 2: IoU 0.9/1.1 = 0.82 with chair 1, already matched -> duplicate, FP
    ]
    return {"scene0": preds}, gt


def test_detection_ap_by_hand():
    # ranked by score: TP, FP (duplicate), FP, TP; chair 3 is never found (npos = 3)
    # cumulative TP [1, 1, 1, 2], FP [0, 1, 2, 2]
    # recall    = TP / 3         = [1/3, 1/3, 1/3, 2/3]
    # precision = TP / (TP + FP) = [1, 1/2, 1/3, 1/2]
    # AP = 1/3 * 1 + 1/3 * 1/2 + 1/3 * 0 = 0.5 (the steps of test_average_precision_all_point_by_hand)
    # the same at 0.5: every true positive has IoU 1 and the duplicate is a false positive at both thresholds
    # (scored in input order instead of by score, FP TP TP FP would give AP 1/3 * 2/3 + 1/3 * 2/3 = 4/9)
    preds, gt = chairs_case()
    got = detection_map(preds, gt)
    assert got["AP@0.25"] == {"chair": pytest.approx(0.5, abs=1e-15)}
    assert got["AP@0.5"] == {"chair": pytest.approx(0.5, abs=1e-15)}
    assert got["mAP@0.25"] == pytest.approx(0.5, abs=1e-15) and got["mAP@0.5"] == pytest.approx(0.5, abs=1e-15)
    assert got["num_gt"] == {"chair": 3} and got["num_pred"] == {"chair": 4}
    assert got["num_scenes"] == 1 and got["malformed"] == 0 and got["ignored_predictions"] == 0


def test_detection_map_over_two_classes():
    # chair: AP 0.5 at both thresholds (test_detection_ap_by_hand)
    # table: one ground truth, one prediction with IoU 1/3: a hit at 0.25 (AP 1), a miss at 0.5 (AP 0)
    preds, gt = chairs_case()
    gt["scene0"].append(cube(0, 20, 0, label="table"))
    preds["scene0"].append(cube(0.5, 20, 0, label="table", score=0.1))
    got = detection_map(preds, gt)
    assert got["AP@0.25"] == {"chair": pytest.approx(0.5), "table": 1.0}
    assert got["AP@0.5"] == {"chair": pytest.approx(0.5), "table": 0.0}
    assert got["mAP@0.25"] == pytest.approx(0.75, abs=1e-15) and got["mAP@0.5"] == pytest.approx(0.25, abs=1e-15)
    assert list(got)[:4] == ["mAP@0.25", "mAP@0.5", "AP@0.25", "AP@0.5"]
    only = detection_map(preds, gt, thresholds=(0.5,))
    assert "mAP@0.25" not in only and only["mAP@0.5"] == pytest.approx(0.25)


def test_detection_matching_is_voc_best_iou_without_fall_back():
    # ground truth A (x = 0) and B (x = 0.6); P1 = A exactly (score .9) matches A
    # P2 at x = 0.2 (score .8): IoU 0.8/1.2 = 0.67 with A, 0.6/1.4 = 0.43 with B. Its best box, A, is taken, so
    # VoteNet's eval_det counts it a false positive (it does not fall back to B, although 0.43 > 0.25):
    # TP, FP -> recall [.5, .5], precision [1, .5] -> AP = .5 * 1 = 0.5 (a fall-back would give 1.0)
    gt = {"s": [cube(0), cube(0.6)]}
    got = detection_map({"s": [cube(0, score=0.9), cube(0.2, score=0.8)]}, gt, thresholds=(0.25,))
    assert got["AP@0.25"]["chair"] == pytest.approx(0.5, abs=1e-15)


def test_detection_threshold_is_strict_as_votenet():
    # IoU exactly 0.25 (unit cube inside a 2 x 2 x 1 box) and exactly 0.5 (inside a 2 x 1 x 1 box):
    # eval_det counts a hit only when IoU > threshold
    gt = {"s": [Box3D("table", (0, 0, 0), (2, 2, 1)), Box3D("table", (10, 0, 0), (2, 1, 1))]}
    got = detection_map({"s": [cube(0, label="table"), cube(10, label="table")]}, gt)
    # @0.25: only the second (IoU 0.5 > 0.25): FP, TP -> recall [0, .5], precision [0, .5] -> AP = .5 * .5
    assert got["AP@0.25"]["table"] == pytest.approx(0.25, abs=1e-15)
    assert got["AP@0.5"]["table"] == 0.0


def test_detection_ties_keep_scene_then_output_order():
    # text has no scores: every box 1.0, ranked in output order. One chair; output "miss, hit" vs "hit, miss":
    # hit first: recall [1, 1], precision [1, .5] -> AP 1; miss first: recall [0, 1], precision [0, .5] -> AP .5
    gt = {"a": [cube(0)], "b": []}
    hit, miss = "chair: [0, 0, 0, 1, 1, 1]", "chair: [9, 9, 9, 1, 1, 1]"
    assert detection_map({"a": hit + "\n" + miss}, gt)["mAP@0.5"] == 1.0
    assert detection_map({"a": miss + "\n" + hit}, gt)["mAP@0.5"] == 0.5
    # across scenes: the order of the predictions mapping ("b" holds only false positives)
    assert detection_map({"a": hit, "b": miss}, gt)["mAP@0.5"] == 1.0
    assert detection_map({"b": miss, "a": hit}, gt)["mAP@0.5"] == 0.5
    # 20 equal scores (past the size where an unstable sort reorders): the hit last -> AP = 1 * 1/20
    many = "\n".join([f"chair: [{9 + i}, 9, 9, 1, 1, 1]" for i in range(19)] + [hit])
    assert detection_map({"a": many}, gt)["mAP@0.5"] == pytest.approx(0.05, abs=1e-15)


def test_detection_matches_within_the_scene_and_counts_unpredicted_scenes():
    # scene s1 has a chair at 0, s2 a chair at 5; the prediction for s2 at 0 is a false positive (s1's box does not
    # count), and s1 has no prediction: both chairs missed -> AP 0; the hit in s1 finds 1 of 2 -> AP .5
    gt = {"s1": [cube(0)], "s2": [cube(5)]}
    assert detection_map({"s2": [cube(0)]}, gt)["mAP@0.5"] == 0.0
    got = detection_map({"s1": [cube(0)]}, gt)
    assert got["mAP@0.5"] == 0.5 and got["num_scenes"] == 2 and got["num_pred"] == {"chair": 1}


def test_detection_classes_from_ground_truth_and_labels_case_insensitive():
    # classes: chair (matched via "Chair"), "office chair" (matched via "office  CHAIR"), lamp (never predicted,
    # AP 0, still in the mean); "sofa" and the label-less box have no ground truth: ignored, not in the mean
    gt = {"s": [cube(0), cube(5, label="office chair"), cube(10, label="lamp")]}
    text = ("Chair: [0, 0, 0, 1, 1, 1]\noffice  CHAIR: [5, 0, 0, 1, 1, 1]\nsofa: [20, 0, 0, 1, 1, 1]\n"
            "[30, 0, 0, 1, 1, 1]\nlamp: [1, 2]\nPlease let me know if you need anything else.")
    got = detection_map({"s": text}, gt)
    assert got["AP@0.5"] == {"chair": 1.0, "lamp": 0.0, "office chair": 1.0}
    assert got["mAP@0.5"] == pytest.approx(2 / 3, abs=1e-15)
    assert got["ignored_predictions"] == 2 and got["malformed"] == 1
    assert got["num_pred"] == {"chair": 1, "lamp": 0, "office chair": 1}
    assert detection_map({"s": None}, gt)["mAP@0.25"] == 0.0
    # malformed lines add up over the scenes
    gt["t"] = []
    assert detection_map({"s": text, "t": "lamp: [1, 2, 3]\nlamp: [inf, 0, 0, 1, 1, 1]"}, gt)["malformed"] == 3


def votenet_ap(pred, gt, thresh):
    """VoteNet's eval_det_cls, written out for one class: pred {scene: [(box6, score)]}, gt {scene: [box6]}."""
    npos = sum(len(v) for v in gt.values())
    used = {s: [False] * len(v) for s, v in gt.items()}
    dets = sorted(((score, s, box) for s, v in pred.items() for box, score in v), key=lambda d: -d[0])
    tp, fp = [], []
    for _, s, box in dets:
        ovmax, jmax = -np.inf, -1
        for j, g in enumerate(gt.get(s, [])):
            lo = np.maximum(box[:3] - box[3:] / 2, g[:3] - g[3:] / 2)
            hi = np.minimum(box[:3] + box[3:] / 2, g[:3] + g[3:] / 2)
            inter = np.prod(np.clip(hi - lo, 0, None))
            iou = inter / (np.prod(box[3:]) + np.prod(g[3:]) - inter)
            if iou > ovmax:
                ovmax, jmax = iou, j
        hit = ovmax > thresh and not used[s][jmax]
        if hit:
            used[s][jmax] = True
        tp.append(float(hit))
        fp.append(float(not hit))
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    rec, prec = tp / npos, tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    mrec, mpre = np.concatenate(([0.0], rec, [1.0])), np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])


def test_detection_equals_votenet_eval_det_on_random_scenes():
    rng = np.random.default_rng(1)
    classes = ["chair", "table", "lamp"]
    for trial in range(5):
        gt, preds = {}, {}
        for s in range(4):
            gt[f"s{s}"] = [Box3D(classes[rng.integers(3)], rng.uniform(0, 3, 3), rng.uniform(0.3, 1.5, 3))
                           for _ in range(rng.integers(0, 6))]
            preds[f"s{s}"] = [Box3D(b.label, np.add(b.center, rng.normal(0, 0.25, 3)),
                                    np.multiply(b.size, rng.uniform(0.6, 1.4, 3)), rng.uniform())
                              for b in gt[f"s{s}"] if rng.uniform() < 0.8]
            preds[f"s{s}"] += [Box3D(classes[rng.integers(3)], rng.uniform(0, 3, 3), rng.uniform(0.3, 1.5, 3),
                                     rng.uniform()) for _ in range(rng.integers(0, 4))]
        got = detection_map(preds, gt)
        for t in (0.25, 0.5):
            for c in classes:
                if not any(b.label == c for v in gt.values() for b in v):
                    assert c not in got[f"AP@{t:g}"]
                    continue
                per = lambda d, keep_score: {s: [((b.as_array(), b.score) if keep_score else b.as_array())
                                                  for b in v if b.label == c] for s, v in d.items()}
                want = votenet_ap(per(preds, True), per(gt, False), t)
                assert got[f"AP@{t:g}"][c] == pytest.approx(want, abs=1e-12), (trial, t, c)
            assert got[f"mAP@{t:g}"] == pytest.approx(np.mean(list(got[f"AP@{t:g}"].values())), abs=1e-15)


def test_detection_rejects_bad_programmatic_input():
    preds, gt = chairs_case()
    with pytest.raises(ValueError, match=r"1 predicted scene\(s\) not in ground_truth: \['scene9'\]"):
        detection_map({**preds, "scene9": []}, gt)
    with pytest.raises(ValueError) as e:                  # the count, and the first 5 names
        detection_map({**preds, **{f"x{i}": [] for i in range(6)}}, gt)
    assert str(e.value) == "6 predicted scene(s) not in ground_truth: ['x0', 'x1', 'x2', 'x3', 'x4']"
    with pytest.raises(ValueError, match="^ground_truth has no boxes: mAP is undefined$"):
        detection_map({"s": []}, {"s": []})
    with pytest.raises(ValueError, match=r"thresholds must be IoUs in \[0, 1\], got \(0.25, 1.5\)"):
        detection_map(preds, gt, thresholds=(0.25, 1.5))
    with pytest.raises(ValueError, match="thresholds must be IoUs"):
        detection_map(preds, gt, thresholds=())
    with pytest.raises(TypeError, match=r"ground_truth\['scene0'\] must be a list of Box3D, got str"):
        detection_map({}, {"scene0": "chair: [0, 0, 0, 1, 1, 1]"})
    with pytest.raises(TypeError, match=r"predictions\['scene0'\] must be a list of Box3D or model text, got dict"):
        detection_map({"scene0": {}}, gt)
    with pytest.raises(TypeError, match="must be mappings scene id -> boxes, got list and dict"):
        detection_map([], gt)


# ------------------------------------------------------------------------------------------------------- grounding
def test_grounding_accuracy_by_hand():
    target = cube()
    preds = [
        "chair: [0, 0, 0, 1, 1, 1]",                  # IoU 1: hit at both
        "the chair: [0.5, 0, 0, 1, 1, 1].",           # IoU 1/3: hit at 0.25 only
        "chair: [0, 0, 0, 1, 1]",                     # malformed (5 numbers): a miss
        None,                                         # no output: a miss
        "I cannot find it.",                          # no box: a miss
        Box3D("table", (0, 0, 0), (2, 2, 1)),         # IoU exactly 0.25: a hit at 0.25 (ScanRefer: >=)
        Box3D("sofa", (0, 0, 0), (2, 1, 1)),          # IoU exactly 0.5: a hit at both (the label is ignored)
        "chair: [9, 9, 9, 1, 1, 1]",                  # IoU 0
    ]
    got = grounding_accuracy(preds, [target] * len(preds))
    # @0.25: queries 1, 2, 6, 7 -> 4/8; @0.5: queries 1, 7 -> 2/8
    assert got == {"acc@0.25": 0.5, "acc@0.5": 0.25, "n": 8, "malformed": 3}


def test_grounding_takes_the_first_box_line_of_the_output():
    # prose before the first box line is skipped; the first box line is the prediction, later ones never count
    text = "Let me look.\nchair: [0.5, 0, 0, 1, 1, 1]\nchair: [0, 0, 0, 1, 1, 1]"
    got = grounding_accuracy([text], [cube()])       # the first box (IoU 1/3), not the second (IoU 1)
    assert got == {"acc@0.25": 1.0, "acc@0.5": 0.0, "n": 1, "malformed": 0}
    assert grounding_accuracy([text], [cube()], thresholds=(0.3, 0.4)) == {
        "acc@0.3": 1.0, "acc@0.4": 0.0, "n": 1, "malformed": 0}


def test_grounding_malformed_or_zero_size_first_box_is_a_miss():
    # ScanRefer / VG-LLM's first-box rule: a bad first box is the answer, and it is wrong; the valid exact box on
    # the next line does not stand in for it (the scorer used to skip to it: acc 1, malformed 0)
    exact = "chair: [0, 0, 0, 1, 1, 1]"
    preds = [
        f"Let me look.\nchair: [0, 0, 0, 1, nan, 1]\n{exact}",   # malformed first box line: a miss
        f"chair: [0, 0, 0, 1, 1]\n{exact}",                       # 5 numbers: a miss
        f"chair: [0, 0, 0, 1, 0, 1]\n{exact}",                    # zero-size first box: a miss
        Box3D("chair", (0, 0, 0), (1, 0, 1)),                      # the same as a Box3D
        f"Here it is:\n\n{exact}\nchair: [0, 0, 0, 1, 0, 1]",    # prose first, then the exact box: a hit
    ]
    # 1 hit of 5 at both thresholds; the 4 misses have no usable box
    assert grounding_accuracy(preds, [cube()] * 5) == {"acc@0.25": 0.2, "acc@0.5": 0.2, "n": 5, "malformed": 4}


def test_thresholds_may_be_zero_or_one():
    # detection is strict: at 0 any overlap is a hit, at 1 nothing is; grounding is inclusive: at 1 only identity
    gt = {"s": [cube(0), cube(5)]}
    got = detection_map({"s": [cube(0.9), cube(5)]}, gt, thresholds=(0.0, 1.0))
    assert got["AP@0"] == {"chair": 1.0} and got["AP@1"] == {"chair": 0.0}
    assert grounding_accuracy([cube(), cube(0.9)], [cube(), cube()], thresholds=(0.0, 1.0)) == {
        "acc@0": 1.0, "acc@1": 0.5, "n": 2, "malformed": 0}


def test_grounding_rejects_bad_programmatic_input():
    with pytest.raises(ValueError, match="same length, got 2 predictions and 3 targets"):
        grounding_accuracy(["a", "b"], [cube()] * 3)
    with pytest.raises(ValueError, match="^no grounding queries to score$"):
        grounding_accuracy([], [])
    with pytest.raises(TypeError, match=r"targets\[1\] must be a Box3D, got list"):
        grounding_accuracy([None, None], [cube(), [0, 0, 0, 1, 1, 1]])
    with pytest.raises(TypeError, match=r"predictions\[0\] must be model text, a Box3D or None, got int"):
        grounding_accuracy([3], [cube()])
    with pytest.raises(TypeError, match=r"^predictions must be a list \(one entry per query\), got a single str$"):
        grounding_accuracy("chair: [0, 0, 0, 1, 1, 1]", [cube()])
    with pytest.raises(ValueError, match="thresholds must be IoUs"):
        grounding_accuracy([None], [cube()], thresholds=(-0.1,))


def test_module_documents_its_protocols():
    doc = boxes3d.__doc__
    for needle in ("VoteNet", "eval_det", "use_07_metric=False", "ScanRefer", "ious >= 0.25", "first frame"):
        assert needle in doc
