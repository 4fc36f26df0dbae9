"""GAP-MLLM language data: procedural referring expressions checked against the exact geometry, ScanRefer's
unique / multiple split, the ScanRefer reader's errors, and the language grounding / dense-captioning records."""
from __future__ import annotations

import json

import numpy as np
import pytest

from geoalign.eval.boxes3d import parse_boxes
from geoalign.gap.annotations import boxes_to_camera, load_scannet_annotations
from geoalign.gap.finetune_data import make_finetune_records
from geoalign.gap.language import describe_scene, matching_objects, read_scanrefer, scanrefer_unique
from geoalign.gap.procedural import LABELS, SyntheticScene, make_box_room, write_scannet_layout
from geoalign.gap.scenes import load_scannet_scene


def _box(lab, lo, hi):
    return lab, np.array(lo, float), np.array(hi, float)


def _angle(box, pose):
    c = (box[1] + box[2]) / 2
    T = np.linalg.inv(pose)
    x, _, z = T[:3, :3] @ c + T[:3, 3]
    return np.arctan2(x, z)


def test_procedural_expressions_are_unique_against_the_geometry():
    kinds = set()
    for seed in range(12):
        room = make_box_room(seed=seed, num_frames=2, height=16, width=20, num_boxes=5, stacked=1, holes=0)
        entries = describe_scene(room.boxes, room.pose[0], "s", LABELS)
        assert entries
        for e in entries:
            k = e["object_id"] - 9
            assert e["object_name"] == LABELS[room.boxes[k][0]]
            assert matching_objects(e["description"], room.boxes, room.pose[0], LABELS) == [k], e
            text = e["description"]
            same = [j for j, b in enumerate(room.boxes) if b[0] == room.boxes[k][0]]
            if "leftmost" in text or "rightmost" in text:              # an independent check of the clause
                angles = {j: _angle(room.boxes[j], room.pose[0]) for j in same}
                best = (min if "leftmost" in text else max)(angles, key=angles.get)
                assert best == k and len(same) >= 2
            if "it is the largest" in text:
                vol = {j: np.prod(room.boxes[j][2] - room.boxes[j][1]) for j in same}
                assert max(vol, key=vol.get) == k
            if " it is on the " in text and "floor" not in text:
                anchor = [b for b in room.boxes if LABELS[b[0]] == text.split("on the ")[1].rstrip(".")]
                assert len(anchor) == 1 and abs(room.boxes[k][1][2] - anchor[0][2][2]) < 1e-9
            kinds |= {w for w in ("left of", "right of", "on the box", "on the", "closest", "most", "largest",
                                  "tallest") if w in text}
        ids = [(e["object_id"], e["ann_id"]) for e in entries]
        assert len(set(ids)) == len(ids)
    assert {"left of", "right of", "closest", "most", "largest", "on the"} <= kinds, kinds


def _hand_scene():
    """Two equal red chairs, mirrored left / right of a table seen from the camera; a small box on the table."""
    boxes = [_box(4, [-1.5, 0.8, 0], [-1.0, 1.3, 0.9]),     # chair, camera's left (x < 0 in the camera)
             _box(4, [1.0, 0.8, 0], [1.5, 1.3, 0.9]),       # chair, camera's right
             _box(5, [-0.5, 0.5, 0], [0.5, 1.5, 0.7]),      # table
             _box(9, [-0.1, 0.9, 0.7], [0.1, 1.1, 0.9])]    # box on the table
    from geoalign.gap.procedural import look_at

    pose = look_at(np.array([0.0, -2.0, 1.2]), np.array([0.0, 1.0, 0.6]))   # looks along +y: camera x = world x
    return boxes, pose


def test_hand_made_scene_expressions_and_flags():
    boxes, pose = _hand_scene()
    entries = describe_scene(boxes, pose, "hand", LABELS)
    by = {}
    for e in entries:
        by.setdefault(e["object_id"], []).append(e["description"])
    # the chairs are the same size and class: neither the bare sentence nor largest / tallest can tell them apart
    assert all("this is a medium red chair." != d for d in by[9] + by[10])
    assert not any("largest" in d or "tallest" in d for d in by[9] + by[10])
    assert "this is a medium red chair. it is the leftmost chair as seen from the first view." in by[9]
    assert "this is a medium red chair. it is to the left of the table as seen from the first view." in by[9]
    assert "this is a medium red chair. it is to the right of the box as seen from the first view." in by[10]
    assert "this is a small teal box." in by[12] and "this is a small teal box. it is on the table." in by[12]
    assert "this is a large green table." in by[11]
    unique = scanrefer_unique(entries)  # the two chairs share a class; the table and the box are alone in theirs
    assert [unique[("hand", oid)] for oid in (9, 10, 11, 12)] == [False, False, True, True]


def test_unique_multiple_follows_scanrefer_with_its_label_map(tmp_path):
    """ScanRefer's lookup: the classes of the objects a scene's entries mention (not every annotated object), the
    first entry's name per object with "_" as " ", mapped through scannetv2-labels.combined.tsv's nyu40class to its
    18 classes (others: "others", so "refridgerator" and an unknown name both are)."""
    from geoalign.gap.language import read_scannet_label_map

    tsv = tmp_path / "scannetv2-labels.combined.tsv"
    tsv.write_text("id\traw_category\tcategory\tcount\tnyu40id\teigen13id\tnyuClass\tnyu40class\n"
                   "1\toffice chair\tchair\t5\t5\t1\tchair\tchair\n"
                   "2\tchair\tchair\t9\t5\t1\tchair\tchair\n"
                   "3\tkitchen cabinet\tcabinet\t3\t3\t1\tcabinet\tcabinet\n"
                   "4\tmini fridge\tmini fridge\t2\t24\t1\trefridgerator\trefridgerator\n"
                   "5\tlamp\tlamp\t2\t35\t1\tlamp\tlamp\n")
    label_map = read_scannet_label_map(str(tsv))
    assert label_map == {"office chair": "chair", "chair": "chair", "kitchen cabinet": "cabinet",
                         "mini fridge": "others", "lamp": "others"}
    entries = [dict(scene_id="s0", object_id=o, object_name=n, ann_id=a, description="d")
               for o, n, a in ((1, "office_chair", 0), (1, "office_chair", 1), (2, "chair", 0),
                               (3, "kitchen_cabinet", 0), (4, "mini_fridge", 0), (5, "lamp", 0))]
    entries.append(dict(scene_id="s1", object_id=1, object_name="chair", ann_id=0, description="d"))
    got = scanrefer_unique(entries, label_map)
    assert got == {("s0", 1): False, ("s0", 2): False, ("s0", 3): True, ("s0", 4): False, ("s0", 5): False,
                   ("s1", 1): True}
    # without the map, names are classes: "office chair" and "chair" differ
    assert scanrefer_unique(entries)[("s0", 1)] is True
    bad = tmp_path / "bad.tsv"
    bad.write_text("a\tb\n1\t2\n")
    with pytest.raises(ValueError, match=r"bad.tsv'.*raw_category and nyu40class"):
        read_scannet_label_map(str(bad))


@pytest.fixture(scope="module")
def hand_scene_dir(tmp_path_factory):
    boxes, pose0 = _hand_scene()
    from geoalign.gap.procedural import _cast, look_at

    poses = np.stack([pose0, look_at(np.array([0.3, -2.0, 1.3]), np.array([0.0, 1.0, 0.6]))])
    K = np.array([[40.0, 0, 31.5], [0, 40.0, 23.5], [0, 0, 1]])
    v, u = np.mgrid[0:48, 0:64].astype(float)
    shots = [_cast(p, K, u, v, boxes) for p in poses]
    room = SyntheticScene(np.full((2, 48, 64, 3), 128, np.uint8), np.stack([s[0] for s in shots]),
                          np.stack([s[1] for s in shots]), np.stack([s[2] for s in shots]), poses, K, boxes)
    root = write_scannet_layout(room, tmp_path_factory.mktemp("hand") / "scene0900_00")
    return load_scannet_scene(root), room


def test_records_flags_and_boxes_equal_the_annotated_boxes(hand_scene_dir, tmp_path):
    scene, room = hand_scene_dir
    entries = read_scanrefer(f"{scene.root}/scanrefer.json")
    recs = make_finetune_records(scene, str(tmp_path / "m"), str(tmp_path), samples=3, frames=2,
                                 grounding_per_sample=20, seed=1, descriptions=entries)
    lang = [r for r in recs if r["metadata"].get("query") == "language"]
    marker = [r for r in recs if r["metadata"].get("query") == "marker"]
    caps = [r for r in recs if r["metadata"]["task"] == "gap_dense_caption"]
    assert lang and marker and caps
    ann = load_scannet_annotations(scene.root)
    expected_unique = {9: False, 10: False, 11: True, 12: True}
    descs = {(e["object_id"], e["ann_id"]): e["description"] for e in entries}
    for r in lang + caps:
        m = r["metadata"]
        first = scene.frame_ids.index(m["frame_ids"][0])
        row = ann.index(m["object_id"])
        cam = boxes_to_camera(ann.center[row:row + 1], ann.size[row:row + 1], ann.axis_alignment, scene.pose[first])
        lo, hi = room.boxes[m["object_id"] - 9][1:]                   # the exact box, independently
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        T = np.linalg.inv(scene.pose[first])
        c = corners @ T[:3, :3].T + T[:3, 3]
        exact = [*((c.min(0) + c.max(0)) / 2), *(c.max(0) - c.min(0))]
        box = (m["target"]["center"] + m["target"]["size"]) if m["task"] == "gap_grounding" else m["box"]
        np.testing.assert_allclose(box, [*cam.center[0], *cam.aabb_size[0]], atol=1e-4)
        np.testing.assert_allclose(box, exact, atol=1e-4)
        assert m["scene"] == "scene0900_00"
        if m["task"] == "gap_grounding":
            assert m["unique"] is expected_unique[m["object_id"]]
            assert descs[(m["object_id"], m["ann_id"])] in r["conversations"][0]["value"]
            (parsed,) = parse_boxes(r["conversations"][1]["value"]).boxes
            np.testing.assert_allclose(parsed.center, m["target"]["center"], atol=0.005 + 1e-9)
        else:
            assert m["prompt_box"] == m["box"]
            assert m["references"] == [d for (o, _), d in sorted(descs.items()) if o == m["object_id"]]
            assert r["conversations"][1]["value"] in m["references"]
            assert "[" + ", ".join(f"{x:.2f}" for x in m["box"]).replace("-0.00", "0.00") + "]" in \
                r["conversations"][0]["value"]
    assert {r["metadata"]["unique"] for r in lang} == {True, False}


@pytest.mark.parametrize("content, match", [
    ({"a": 1}, r"expected a JSON list"),
    ([5], r"entry 0 must be an object"),
    ([{"scene_id": "s", "object_id": 1, "ann_id": 0, "description": "x"}], r"entry 0 lacks \['object_name'\]"),
    ([{"scene_id": "s", "object_id": "1", "object_name": "chair", "ann_id": "0", "description": "x"},
      {"scene_id": "s", "object_id": "a", "object_name": "chair", "ann_id": "0", "description": "x"}],
     r"entry 1: 'object_id' must be a non-negative integer"),
    ([{"scene_id": "s", "object_id": 1, "object_name": "chair", "ann_id": -1, "description": "x"}],
     r"entry 0: 'ann_id' must be"),
    ([{"scene_id": "s", "object_id": 1, "object_name": "chair", "ann_id": 0, "description": " "}],
     r"entry 0: 'description' must be a non-empty string"),
    ([{"scene_id": "s", "object_id": 1, "object_name": "chair", "ann_id": 0, "description": "x"},
      {"scene_id": "s", "object_id": "1", "object_name": "chair", "ann_id": "0", "description": "y"}],
     r"entry 1 repeats entry 0"),
])
def test_scanrefer_reader_errors(tmp_path, content, match):
    path = tmp_path / "ScanRefer_bad.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=match) as info:
        read_scanrefer(path)
    assert "ScanRefer_bad.json" in str(info.value)


def test_scanrefer_reader_reads_string_ids_and_bad_json(tmp_path):
    path = tmp_path / "ok.json"
    path.write_text(json.dumps([{"scene_id": "s", "object_id": "12", "object_name": "chair", "ann_id": "3",
                                 "description": "a chair.", "token": ["a"]}]))
    (e,) = read_scanrefer(path)
    assert (e["object_id"], e["ann_id"], e["token"]) == (12, 3, ["a"])
    path.write_text("[{")
    with pytest.raises(ValueError, match=r"ok\.json' is not valid JSON"):
        read_scanrefer(path)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        read_scanrefer(tmp_path / "nope.json")


def test_gap_data_writes_the_three_tasks(tmp_path, capsys):
    from geoalign.cli import main

    for k in range(2):
        write_scannet_layout(make_box_room(seed=40 + k, num_frames=5, height=48, width=64, stacked=1),
                             tmp_path / "scans" / f"scene00{k}")
    out = tmp_path / "data" / "ft.json"
    common = ["--scenes", str(tmp_path / "scans"), "--frames", "2", "--samples-per-scene", "3", "--no-progress"]
    assert main(["gap-data", "--task", "finetune", "--out", str(out), *common]) == 0
    recs = json.loads(out.read_text())
    kinds = {(r["metadata"]["task"], r["metadata"].get("query")) for r in recs}
    assert kinds == {("gap_detection", None), ("gap_grounding", "marker"), ("gap_grounding", "language"),
                     ("gap_dense_caption", None)}
    assert all(r["metadata"]["box_source"] == "annotated" for r in recs)
    caps = [(r["metadata"]["scene"], r["metadata"]["object_id"]) for r in recs
            if r["metadata"]["task"] == "gap_dense_caption"]
    assert len(set(caps)) < len(caps)                      # training data: an object may be captioned in several clips
    assert main(["gap-data", "--task", "finetune", "--out", str(out), "--captions-once-per-object", *common]) == 0
    caps = [(r["metadata"]["scene"], r["metadata"]["object_id"]) for r in json.loads(out.read_text())
            if r["metadata"]["task"] == "gap_dense_caption"]
    assert caps and len(set(caps)) == len(caps)

    # a "real" scene: no scanrefer.json of its own, descriptions from --scanrefer (other scenes' entries ignored)
    real = tmp_path / "real"
    write_scannet_layout(make_box_room(seed=50, num_frames=5, height=48, width=64), real / "scene0123_00",
                         language=False)
    sr = tmp_path / "ScanRefer_filtered_train.json"
    sr.write_text(json.dumps([{"scene_id": "scene0123_00", "object_id": "10", "object_name": "x", "ann_id": "0",
                               "description": "the thing in the room."},
                              {"scene_id": "scene9999_00", "object_id": "1", "object_name": "y", "ann_id": "0",
                               "description": "elsewhere."}]))
    out2 = tmp_path / "data" / "real.json"
    args = ["--scenes", str(real), "--frames", "2", "--samples-per-scene", "4", "--no-progress", "--seed", "2"]
    assert main(["gap-data", "--task", "finetune", "--out", str(out2), "--scanrefer", str(sr), *args]) == 0
    recs = json.loads(out2.read_text())
    lang = [r for r in recs if r["metadata"].get("query") == "language"]
    caps = [r for r in recs if r["metadata"]["task"] == "gap_dense_caption"]
    assert lang and caps and all(r["metadata"]["object_id"] == 10 for r in lang + caps)
    assert all(r["metadata"]["references"] == ["the thing in the room."] for r in caps)
    assert main(["gap-data", "--task", "finetune", "--out", str(out2), *args]) == 0      # no descriptions: no
    assert {r["metadata"]["task"] for r in json.loads(out2.read_text())} == {"gap_detection", "gap_grounding"}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"scene_id": "scene0123_00", "object_id": 77, "object_name": "x", "ann_id": 0,
                                "description": "a ghost."}]))
    assert main(["gap-data", "--task", "finetune", "--out", str(out2), "--scanrefer", str(bad), *args]) == 2
    err = capsys.readouterr().err
    assert "bad.json" in err and "object_id 77" in err and "no annotated box for objectId 77" in err, err
