"""GAP-MLLM pre-training data: every prompt's xyz is the exactly known 3D point (<= 1 mm) in the first frame's camera,
its label is the instance mask's, prompts avoid missing depth, and the records train (the CLI end to end)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from geoalign.gap.pretrain_data import answer_text, make_pretrain_records, promptable
from geoalign.gap.procedural import LABELS, make_box_room, write_scannet_layout
from geoalign.gap.scenes import load_scannet_scene


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scans")
    rooms = {}
    for k in range(2):
        rooms[f"scene000{k}_00"] = make_box_room(seed=10 + k, num_frames=6, height=72, width=96, num_boxes=4)
        write_scannet_layout(rooms[f"scene000{k}_00"], root / f"scene000{k}_00")
    return root, rooms


def test_prompts_are_exact_points_with_their_mask_labels(scenes, tmp_path):
    root, rooms = scenes
    n = 0
    for name, room in rooms.items():
        scene = load_scannet_scene(root / name)
        records = make_pretrain_records(scene, str(tmp_path / "media"), str(tmp_path), samples=3, frames=3,
                                        prompts=5, seed=7)
        for rec in records:
            meta = rec["metadata"]
            anchor = meta["frame_ids"][0]
            assert len(rec["images"]) == 3 and all((tmp_path / p).is_file() for p in rec["images"])
            assert len(meta["prompts"]) == 5
            for p in meta["prompts"]:
                frame = meta["frame_ids"][p["frame"]]
                world, label, inst = room.exact_point(frame, p["u"], p["v"])
                cam0 = np.linalg.inv(room.pose[anchor]) @ np.append(world, 1.0)
                assert np.abs(cam0[:3] - p["xyz"]).max() <= 1e-3, (p, cam0)             # <= 1 mm
                u, v = int(p["u"]), int(p["v"])
                assert p["label"] == LABELS[int(room.labels[frame, v, u])] == LABELS[label]
                assert p["instance"] == room.instances[frame, v, u] == inst
                assert room.depth[frame, v, u] > 0                                      # never on a hole
                n += 1
            assert rec["conversations"][1]["value"] == answer_text(meta["prompts"])
            assert rec["conversations"][1]["value"].startswith(f"1: {meta['prompts'][0]['label']} (")
    assert n == 30


def test_promptable_avoids_holes_edges_and_borders():
    depth = np.full((12, 12), 2.0)
    depth[5, 5] = 0.0                      # a hole
    depth[:, 9:] = 3.0                     # a depth edge between columns 8 and 9
    labels = np.ones((12, 12), np.int64)
    labels[2, 6] = 0                       # unlabelled
    ok = promptable(depth, labels, border=1)
    assert not ok[5, 5] and not ok[4:7, 4:7].any()            # the hole and its neighbours
    assert not ok[:, 8].any() and not ok[:, 9].any() and ok[3, 10]
    assert not ok[2, 6] and not ok[0].any() and not ok[:, 0].any()
    assert ok[8, 2]


def test_records_are_deterministic_and_varied(scenes, tmp_path):
    root, _ = scenes
    scene = load_scannet_scene(root / "scene0000_00")
    a = make_pretrain_records(scene, str(tmp_path / "a"), str(tmp_path), samples=4, frames=2, prompts=4, seed=1)
    b = make_pretrain_records(scene, str(tmp_path / "b"), str(tmp_path), samples=4, frames=2, prompts=4, seed=1)
    assert [r["metadata"] for r in a] == [r["metadata"] for r in b]
    labels = {p["label"] for r in a for p in r["metadata"]["prompts"]}
    assert labels - {"wall", "floor", "ceiling"}                   # objects get prompts, not only the room shell
    with pytest.raises(ValueError, match="fewer than frames=9"):
        make_pretrain_records(scene, str(tmp_path), str(tmp_path), frames=9)


def test_gap_data_cli_writes_records_the_trainer_reads(scenes, tmp_path, capsys):
    from geoalign.cli import main
    from geoalign.processing import GeoAlignProcessor
    from geoalign.tiny import make_tokenizer
    from geoalign.training.data import GeoAlignCollator, GeoAlignSFTDataset

    root, _ = scenes
    out = tmp_path / "data" / "gap.json"
    assert main(["gap-data", "--scenes", str(root), "--out", str(out), "--samples-per-scene", "2", "--frames", "2",
                 "--prompts-per-sample", "3", "--no-progress"]) == 0
    records = json.loads(out.read_text())
    assert len(records) == 4 and "wrote 4 records from 2 scenes" in capsys.readouterr().out
    ds = GeoAlignSFTDataset.from_files(str(out), GeoAlignProcessor(make_tokenizer(), None, group_size=4, num_frames=2),
                                       str(out.parent), num_frames=2)
    batch = GeoAlignCollator.for_processor(ds.processor)([ds[0], ds[1]])
    assert batch["vggt_pixel_values"][0].shape[0] == 2 and (batch["labels"] != -100).any()
    assert main(["gap-data", "--scenes", str(tmp_path / "none"), "--out", str(out), "--no-progress"]) == 2
    assert "none' (geoalign reads local files only" in capsys.readouterr().err


@pytest.mark.parametrize("n", [7, 12])
def test_markers_stay_whole_inside_the_frame_at_the_edges(n):
    from PIL import Image, ImageDraw

    from geoalign.gap.pretrain_data import MARKER_RADIUS, draw_markers, marker_layout

    H, W, pad = 72, 96, 40
    frame = np.full((H, W, 3), (30, 60, 160), np.uint8)

    def ink_outside(lay) -> int:
        """Pixels of the number (fill and outline) that fall outside the frame: drawn on a padded canvas."""
        canvas = Image.new("L", (W + 2 * pad, H + 2 * pad))
        draw = ImageDraw.Draw(canvas)
        x, y = lay["text_xy"]
        draw.text((x + pad, y + pad), str(n), font=draw.getfont(), fill=255, stroke_width=1, stroke_fill=255)
        ink = np.asarray(canvas) > 0
        assert ink.sum() > 10
        return int(ink.sum() - ink[pad:pad + H, pad:pad + W].sum())

    r = MARKER_RADIUS
    for u, v in [(W - 1 - r, H // 2), (W - 1 - r, r), (r, r), (W // 2, r), (r, H - 1 - r), (W - 1 - r, H - 1 - r),
                 (W - 3, 2), (2, H - 3), (W // 2, H - 1)]:
        lay = marker_layout(u, v, n, W, H)
        x0, y0, x1, y1 = lay["text_box"]
        assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H, (u, v, lay)             # the number's pixel box is inside
        assert ink_outside(lay) == 0, (u, v, lay)                                 # and so is every pixel of it
        d0, e0, d1, e1 = lay["disc"]
        assert ((d0 + d1) / 2, (e0 + e1) / 2) == (u, v)                            # centred on the marked point
        if min(u, v, W - 1 - u, H - 1 - v) >= 2:
            assert 0 <= d0 and d1 <= W - 1 and 0 <= e0 and e1 <= H - 1, (u, v, lay)  # the disc is inside too
        assert x1 <= d0 + 1 or x0 >= d1, (u, v, lay)          # beside the disc: at most its outline touches the ring
        if u >= W - 1 - r:
            assert x1 <= u                                                          # moved inward, left of the point
        img = draw_markers(frame, [(u, v, n)])
        ys, xs = np.nonzero((img > 200).all(-1))                                   # the white disc did not move
        assert abs(xs.mean() - u) <= 1 and abs(ys.mean() - v) <= 1, (u, v)
    inner = marker_layout(W // 2, H // 2, n, W, H)
    assert inner["radius"] == r and inner["text_xy"] == (W // 2 + r + 1, H // 2 - r - 2)   # away from edges: as before
