"""ScanNet mesh annotations -> the benchmarks' instance boxes (VoteNet's definition), their move into a frame's
camera (VG-LLM's), the finetune data's box_source option, and clear errors for malformed files."""
from __future__ import annotations

import json

import numpy as np
import pytest

from geoalign.gap.annotations import (annotation_paths, boxes_to_camera, has_annotations, load_scannet_annotations,
                                      read_ply_vertices)
from geoalign.gap.finetune_data import clip_objects, make_finetune_records
from geoalign.gap.procedural import (_BOX_FACES, _box_corners, make_box_room, ply_bytes, write_mesh_annotations,
                                     write_scannet_layout)
from geoalign.gap.scenes import load_scannet_scene, transform


def _rotation(rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _rigid(rng, scale: float = 3.0) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = _rotation(rng), rng.uniform(-scale, scale, 3)
    return T


def _mesh_scene(root, rng):
    """A hand-built annotated scene: 3 boxes (known aligned-frame extents) whose vertices are their 8 corners plus
    random interior points, split over 2 segments each; unannotated clutter; a group whose only segment a later
    group takes back (so it has no box); an axisAlignment that rotates and translates. Returns (align, {objectId:
    (label, lo, hi)})."""
    align = _rigid(rng)
    objects, verts, seg, groups = {}, [], [], []
    for k, oid in enumerate(rng.permutation([3, 8, 15])):
        lo = rng.uniform(-2, 2, 3)
        hi = lo + rng.uniform(0.2, 1.5, 3)
        p = np.concatenate([_box_corners(lo, hi), rng.uniform(lo, hi, (20, 3))])
        s = rng.choice(1000, 2, replace=False) + 1000 * (k + 1)
        seg += [int(s[j % 2]) for j in range(len(p))]
        verts.append(p)
        objects[int(oid)] = (f"thing{k}", lo, hi)
        groups.append({"objectId": int(oid), "label": f"thing{k}", "segments": [int(s[0]), int(s[1])]})
    clutter = rng.uniform(5, 6, (7, 3))                                    # a segment in no group
    verts.append(clutter)
    seg += [7] * len(clutter)
    groups.insert(0, {"objectId": 4, "label": "ghost", "segments": [groups[-1]["segments"][0]]})
    aligned = np.concatenate(verts)
    unaligned = transform(np.linalg.inv(align), aligned)
    paths = annotation_paths(root)
    root.mkdir(parents=True, exist_ok=True)
    with open(paths["mesh"], "wb") as f:
        f.write(ply_bytes(unaligned, _BOX_FACES))
    with open(paths["segs"], "w") as f:
        json.dump({"segIndices": seg}, f)
    with open(paths["aggregation"], "w") as f:
        json.dump({"segGroups": groups}, f)
    with open(paths["meta"], "w") as f:
        f.write("colorHeight = 968\naxisAlignment = " + " ".join(repr(float(x)) for x in align.ravel())
                + "\nnumDepthFrames = 9\n")
    return align, objects


def test_boxes_from_a_hand_built_mesh(tmp_path):
    rng = np.random.default_rng(1234)
    root = tmp_path / "scene0042_01"
    align, objects = _mesh_scene(root, rng)
    assert has_annotations(root)
    ann = load_scannet_annotations(root)
    assert ann.name == "scene0042_01" and ann.object_ids.dtype == np.int64
    assert sorted(ann.object_ids.tolist()) == sorted(objects)              # the ghost lost its only segment
    np.testing.assert_array_equal(ann.axis_alignment, align)
    for oid, (label, lo, hi) in objects.items():
        i = ann.index(oid)
        assert ann.labels[i] == label
        np.testing.assert_allclose(ann.center[i], (lo + hi) / 2, atol=2e-6)   # float32 vertices
        np.testing.assert_allclose(ann.size[i], hi - lo, atol=4e-6)
    with pytest.raises(KeyError, match="objectId 4"):
        ann.index(4)


def test_camera_transform_by_hand():
    """Quarter turn about z + shift as the alignment, a camera 1 m above the unaligned origin: corners by hand."""
    A = np.array([[0.0, -1, 0, 1], [1, 0, 0, 2], [0, 0, 1, 0], [0, 0, 0, 1]])
    pose = np.eye(4)
    pose[2, 3] = 1.0
    cam = boxes_to_camera(np.array([[1.0, 0.0, 0.5]]), np.array([[2.0, 1.0, 1.0]]), A, pose)
    # aligned corner (0, -0.5, 0) -> unaligned (y - 2, -(x - 1), z) = (-2.5, 1, 0) -> camera (-2.5, 1, -1)
    np.testing.assert_allclose(cam.center, [[-2.0, 0.0, -0.5]], atol=1e-12)
    np.testing.assert_allclose(cam.size, [[2.0, 1.0, 1.0]])
    np.testing.assert_allclose(cam.aabb_size, [[1.0, 2.0, 1.0]], atol=1e-12)
    np.testing.assert_allclose(cam.rotation, [[0, 1, 0], [-1, 0, 0], [0, 0, 1]], atol=1e-12)


def test_camera_transform_matches_moved_corners():
    rng = np.random.default_rng(99)
    A, pose = _rigid(rng), _rigid(rng)
    lo = rng.uniform(-2, 2, (4, 3))
    size = rng.uniform(0.1, 2, (4, 3))
    cam = boxes_to_camera(lo + size / 2, size, A, pose)
    to_cam = np.linalg.inv(pose) @ np.linalg.inv(A)
    signs = _box_corners(-np.ones(3), np.ones(3)) / 2
    for m in range(4):
        c = transform(to_cam, _box_corners(lo[m], lo[m] + size[m]))
        np.testing.assert_allclose(cam.center[m], c.mean(0), atol=1e-12)
        np.testing.assert_allclose(cam.center[m] - cam.aabb_size[m] / 2, c.min(0), atol=1e-12)
        np.testing.assert_allclose(cam.center[m] + cam.aabb_size[m] / 2, c.max(0), atol=1e-12)
        oriented = cam.center[m] + (signs * size[m]) @ cam.rotation.T
        np.testing.assert_allclose(oriented, c, atol=1e-12)                   # same corner numbering


@pytest.fixture(scope="module")
def annotated_room(tmp_path_factory):
    room = make_box_room(seed=8, num_frames=5, height=60, width=80, num_boxes=3)
    root = write_scannet_layout(room, tmp_path_factory.mktemp("ann") / "scene0008_00")
    write_mesh_annotations(room, root)
    return load_scannet_scene(root), room


def test_finetune_boxes_follow_the_annotations(annotated_room, tmp_path):
    scene, room = annotated_room
    frames = [1, 2, 4]
    annotated = clip_objects(scene, frames)                                # files present: annotated by default
    visible = {o["instance"]: o for o in clip_objects(scene, frames, box_source="clip_visible")}
    assert annotated and {o["instance"] for o in annotated} == set(visible)
    to_cam = np.linalg.inv(room.pose[1])
    for o in annotated:
        _, lo, hi = room.boxes[o["instance"] - 10]
        assert o["object_id"] == o["instance"] - 1
        c = transform(to_cam, _box_corners(lo, hi))                        # the exact box, seen from frame 1
        np.testing.assert_allclose(o["box"].center, (c.min(0) + c.max(0)) / 2, atol=1e-5)
        np.testing.assert_allclose(o["box"].size, c.max(0) - c.min(0), atol=1e-5)
        v = visible[o["instance"]]["box"]
        assert (np.array(v.center) - np.array(v.size) / 2 >= c.min(0) - 2e-3).all()
        assert (np.array(v.center) + np.array(v.size) / 2 <= c.max(0) + 2e-3).all()
    recs = make_finetune_records(scene, str(tmp_path / "m"), str(tmp_path), samples=2, frames=3, seed=2)
    assert recs and all(r["metadata"]["box_source"] == "annotated" for r in recs)
    obj = recs[0]["metadata"]["objects"][0]
    assert {"object_id", "rotation"} <= set(obj) and np.asarray(obj["rotation"]).shape == (3, 3)
    with pytest.raises(ValueError, match="box_source must be one of"):
        clip_objects(scene, frames, box_source="mesh")


def test_without_files_the_clip_visible_boxes_stay(tmp_path):
    room = make_box_room(seed=5, num_frames=3, height=40, width=56, num_boxes=2)
    scene = load_scannet_scene(write_scannet_layout(room, tmp_path / "scene0005_00", annotations=False))
    objects = clip_objects(scene, [0, 1, 2])
    assert objects and all("object_id" not in o for o in objects)
    with pytest.raises(FileNotFoundError, match=r"scene0005_00_vh_clean_2\.ply"):
        clip_objects(scene, [0, 1, 2], box_source="annotated")


def test_a_visible_instance_without_annotation_is_an_error(tmp_path):
    room = make_box_room(seed=6, num_frames=3, height=40, width=56, num_boxes=2)
    root = write_scannet_layout(room, tmp_path / "scene0006_00")
    paths = write_mesh_annotations(room, root)
    agg = json.loads(open(paths["aggregation"]).read())
    agg["segGroups"] = [g for g in agg["segGroups"] if g["objectId"] < 9]  # drop every box
    open(paths["aggregation"], "w").write(json.dumps(agg))
    with pytest.raises(ValueError, match=r"instance 1\d is visible but scene 'scene0006_00' has no annotated box"):
        clip_objects(load_scannet_scene(root), [0, 1, 2])


@pytest.fixture
def good_scene(tmp_path):
    root = tmp_path / "scene0003_00"
    _mesh_scene(root, np.random.default_rng(7))
    return root, annotation_paths(root)


def _edit(path, fn):
    mode = "b" if path.endswith(".ply") else ""
    with open(path, "r" + mode) as f:
        data = f.read()
    with open(path, "w" + mode) as f:
        f.write(fn(data))


@pytest.mark.parametrize("what, edit, message", [
    ("mesh", lambda b: b[:-200], r"truncated: the header declares \d+ vertices of 16 bytes"),
    ("mesh", lambda b: b.replace(b"binary_little_endian", b"ascii"),
     "expected 'format binary_little_endian 1.0'"),
    ("mesh", lambda b: b.replace(b"property float z", b"property float64x z"), "unexpected PLY header line"),
    ("mesh", lambda b: b.replace(b"property float z", b"property short z"), "expected float .* x, y, z"),
    ("mesh", lambda b: b.replace(b"element vertex", b"element face 3\nproperty list uchar int vertex_indices\n"
                                 b"element vertex", 1), "element 'face' before 'vertex' has a list property"),
    ("mesh", lambda b: b"PLY" + b[3:], "not a PLY file"),
    ("segs", lambda t: json.dumps({"segIndices": json.loads(t)["segIndices"][:-1]}),
     r"segIndices, but the mesh .*_vh_clean_2\.ply.* has \d+ vertices"),
    ("meta", lambda t: t.replace("axisAlignment", "axisAlign"), "no 'axisAlignment = <16 numbers>' line"),
    ("meta", lambda t: t.replace("axisAlignment = ", "axisAlignment = 1 2 "), "must be 16 finite numbers"),
    ("aggregation", lambda t: t.replace('"segments": [', '"segments": [123456789, '),
     r"names segments \[123456789\]"),
    ("aggregation", lambda t: "{", "is not valid JSON"),
])
def test_malformed_files_name_the_file(good_scene, what, edit, message):
    root, paths = good_scene
    _edit(paths[what], edit)
    with pytest.raises(ValueError, match=message) as e:
        load_scannet_annotations(root)
    assert paths[what] in str(e.value)


def test_ply_reader_reads_the_vertex_element(good_scene):
    _, paths = good_scene
    v = read_ply_vertices(paths["mesh"])
    assert v.dtype == np.float64 and v.shape[1] == 3 and np.abs(v).max() > 0.1
