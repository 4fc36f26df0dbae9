"""GAP-MLLM scenes: the procedural generator's geometry is exact, and the ScanNet-layout reader reads it back
(depth in mm, poses, intrinsics, labels), with clear errors for broken scenes."""
from __future__ import annotations

import numpy as np
import pytest

from geoalign.gap.procedural import LABELS, make_box_room, write_scannet_layout
from geoalign.gap.scenes import backproject, load_scannet_scene, to_first_camera


@pytest.fixture(scope="module")
def room():
    return make_box_room(seed=3, num_frames=5, height=48, width=64, num_boxes=3)


def test_procedural_depth_is_exact(room):
    """Back-projecting the rendered depth of any pixel through K and the pose lands on the surface that the ray
    analytically hits: a box face or the room's shell."""
    rng = np.random.default_rng(0)
    for _ in range(40):
        f, u, v = int(rng.integers(5)), int(rng.integers(64)), int(rng.integers(48))
        if room.depth[f, v, u] == 0:
            continue
        world = room.pose[f, :3, 3] + room.pose[f, :3, :3] @ backproject(room.K, u, v, room.depth[f, v, u])
        exact, label, inst = room.exact_point(f, u, v)
        np.testing.assert_allclose(world, exact, atol=1e-9)
        assert (label, inst) == (room.labels[f, v, u], room.instances[f, v, u])
        on_box = [k for k, (lab, lo, hi) in enumerate(room.boxes)
                  if np.all(world >= lo - 1e-9) and np.all(world <= hi + 1e-9)]
        if inst >= 10:
            assert inst - 10 in on_box and LABELS[label] not in ("wall", "floor", "ceiling")
        else:
            assert np.isclose(np.abs(world[:2]).max(), 2.5) or np.isclose(world[2], 0) or np.isclose(world[2], 2.6)
    assert (room.depth == 0).any()                                            # the simulated sensor holes


def test_reader_round_trip(room, tmp_path):
    root = write_scannet_layout(room, tmp_path / "scene0007_00")
    scene = load_scannet_scene(root)
    assert scene.name == "scene0007_00" and scene.frame_ids == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(scene.pose, room.pose, atol=1e-11)
    np.testing.assert_allclose(scene.K_depth, room.K, atol=1e-9)
    d = scene.depth(2)
    assert d.dtype == np.float64 and np.abs(d - room.depth[2]).max() <= 0.0005 + 1e-12      # millimetre png
    assert (d[room.depth[2] == 0] == 0).all()
    assert np.array_equal(scene.labels(1), room.labels[1]) and np.array_equal(scene.instances(1), room.instances[1])
    assert scene.label_name(2) == "floor" and scene.label_name(99) == "class_99"
    assert scene.color(0).shape == (48, 64, 3)
    # to_first_camera: frame 0's own points stay put; a world point seen from two frames agrees
    p = backproject(room.K, 10, 20, 3.0)
    np.testing.assert_allclose(to_first_camera(scene, 0, p), p, atol=1e-9)
    world = room.pose[3, :3, 3] + room.pose[3, :3, :3] @ p
    cam0 = np.linalg.inv(room.pose[0]) @ np.append(world, 1.0)
    np.testing.assert_allclose(to_first_camera(scene, 3, p), cam0[:3], atol=1e-9)


def test_broken_scenes_are_clear_errors(room, tmp_path):
    root = write_scannet_layout(room, tmp_path / "s")
    (tmp_path / "s" / "pose" / "3.txt").write_text("-inf -inf -inf -inf\n" * 4)
    with pytest.raises(ValueError, match=r"pose .*3\.txt.* is not finite"):
        load_scannet_scene(root)
    (tmp_path / "s" / "pose" / "3.txt").write_text("1 0 0\n0 1 0\n")
    with pytest.raises(ValueError, match=r"3\.txt.*expected a 4 x 4 matrix, got 2 x 3"):
        load_scannet_scene(root)
    (tmp_path / "s" / "pose" / "3.txt").unlink()
    with pytest.raises(ValueError, match=r"color/ has frames \[3\] that the other folders lack"):
        load_scannet_scene(root)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_scannet_scene(tmp_path / "nowhere")
