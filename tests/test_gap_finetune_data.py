"""GAP-MLLM fine-tuning data: detection / grounding records whose boxes are those of the visible object points
(checked against the procedural scene's exact boxes), in the text form geoalign.eval.boxes3d parses back."""
from __future__ import annotations

import numpy as np
import pytest

from geoalign.eval.boxes3d import parse_boxes
from geoalign.gap.finetune_data import SHELL, clip_objects, make_finetune_records
from geoalign.gap.procedural import LABELS, make_box_room, write_scannet_layout
from geoalign.gap.scenes import load_scannet_scene


@pytest.fixture(scope="module")
def scene_and_room(tmp_path_factory):
    room = make_box_room(seed=21, num_frames=6, height=72, width=96, num_boxes=4)
    root = write_scannet_layout(room, tmp_path_factory.mktemp("scan") / "scene0021_00")
    return load_scannet_scene(root), room


def _corners(lo, hi):
    return np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])


def test_clip_boxes_lie_inside_the_exact_boxes(scene_and_room):
    scene, room = scene_and_room
    frames = [0, 2, 4]
    objects = clip_objects(scene, frames, box_source="clip_visible")   # write_scannet_layout's default: annotated
    assert objects and all(o["label"] not in SHELL for o in objects) and all("object_id" not in o for o in objects)
    to_cam0 = np.linalg.inv(room.pose[0])
    for o in objects:
        k = o["instance"] - 10                                           # procedural instance ids of the boxes
        lab, lo, hi = room.boxes[k]
        assert o["label"] == LABELS[lab]
        c = _corners(lo, hi) @ to_cam0[:3, :3].T + to_cam0[:3, 3]        # the exact box, seen from frame 0
        b_lo = np.array(o["box"].center) - np.array(o["box"].size) / 2
        b_hi = np.array(o["box"].center) + np.array(o["box"].size) / 2
        assert (b_lo >= c.min(0) - 2e-3).all() and (b_hi <= c.max(0) + 2e-3).all(), (o, c.min(0), c.max(0))
        assert min(o["box"].size) > 0.05                                 # a real extent, not a point
    seen = {int(i) for f in frames for i in np.unique(room.instances[f][room.depth[f] > 0]) if i >= 10}
    assert {o["instance"] for o in objects} <= seen


def test_records_parse_back_to_their_boxes(scene_and_room, tmp_path):
    scene, _ = scene_and_room
    recs = make_finetune_records(scene, str(tmp_path / "m"), str(tmp_path), samples=3, frames=3,
                                 grounding_per_sample=2, seed=5)
    det = [r for r in recs if r["metadata"]["task"] == "gap_detection"]
    ground = [r for r in recs if r["metadata"]["task"] == "gap_grounding"]
    assert len(det) == 3 and len(ground) == 6
    for r in det:
        parsed = parse_boxes(r["conversations"][1]["value"])
        assert parsed.malformed == 0 and len(parsed.boxes) == len(r["metadata"]["objects"])
        for box, obj in zip(parsed.boxes, sorted(r["metadata"]["objects"],
                                                 key=lambda o: (o["label"], *[round(c, 2) for c in o["center"]]))):
            assert box.label == obj["label"]
            np.testing.assert_allclose(box.center, obj["center"], atol=0.005 + 1e-9)      # 2-decimal text
    for r in ground:
        (box,) = parse_boxes(r["conversations"][1]["value"]).boxes
        assert box.label == r["metadata"]["target"]["label"] and r["metadata"]["target"]["label"] in \
            r["conversations"][0]["value"]
        assert (tmp_path / r["images"] / f"{r['metadata']['marker']['frame']}.jpg").is_file()
    again = make_finetune_records(scene, str(tmp_path / "m2"), str(tmp_path), samples=3, frames=3,
                                  grounding_per_sample=2, seed=5)
    assert [r["metadata"] for r in again] == [r["metadata"] for r in recs]


def test_eval_and_score_gap_tasks(scene_and_room, tmp_path, capsys):
    """`geoalign eval gap` on gap-data's fine-tuning records: the oracle scores 100, and `geoalign score gap` on
    hand-edited answers counts a malformed box as a miss (never a crash)."""
    import json

    from geoalign.atomic_files import write_json
    from geoalign.eval import cli

    scene, _ = scene_and_room
    recs = make_finetune_records(scene, str(tmp_path / "media"), str(tmp_path), samples=2, frames=2,
                                 grounding_per_sample=2, seed=3)
    write_json(tmp_path / "gap_test.json", recs)
    out = str(tmp_path / "pred.jsonl")
    assert cli.main(["eval", "gap", "--data", str(tmp_path), "--predictor", "geoalign.eval.fake:FakePredictor",
                     "--model", "oracle", "--out", out, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "mAP@0.25 100.00" in printed and "Acc@0.5 100.00" in printed
    preds = [json.loads(x) for x in open(out)]
    assert [p["id"] for p in preds] == [r["id"] for r in recs]
    for p in preds:                                    # break every grounding answer; halve the detections
        if p["gap_task"] == "grounding":
            p["prediction"] = "the chair is near the door"
        else:
            p["prediction"] = "\n".join(p["prediction"].splitlines()[::2]) + "\nsofa: [1, 2]"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(p) + "\n" for p in preds))
    assert cli.main(["score", "gap", str(bad), "--json", str(tmp_path / "s.json")]) == 0
    scores = json.loads((tmp_path / "s.json").read_text())
    assert scores["grounding"]["acc@0.25"] == 0.0 and scores["grounding"]["malformed"] == 4
    assert scores["detection"]["malformed"] == 2 and 0 < scores["detection"]["mAP@0.25"] < 1
