"""Procedural posed RGB-D scenes with exactly known geometry (numpy only): axis-aligned boxes on the floor of a
box-shaped room, seen by cameras that circle the room's centre. Every pixel is ray-cast, so depth, labels and
instances are exact, and :meth:`SyntheticScene.exact_point` gives the true 3D point behind any pixel -- what the
pre-training data is checked against.

World frame: x, y horizontal, z up (metres); the room spans [-2.5, 2.5]^2 x [0, 2.6]. Cameras are OpenCV
(x right, y down, z forward); poses are camera-to-world. Depth is the z-depth along the camera axis (ScanNet's
convention). A few square holes of zero depth imitate missing sensor readings.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass

import numpy as np

ROOM = (np.array([-2.5, -2.5, 0.0]), np.array([2.5, 2.5, 2.6]))
SURFACES = {1: "wall", 2: "floor", 3: "ceiling"}               # label ids of the room's own surfaces
OBJECTS = {4: "chair", 5: "table", 6: "bed", 7: "sofa", 8: "cabinet", 9: "box"}
LABELS = {**SURFACES, **OBJECTS}
COLOURS = {1: (170, 160, 150), 2: (120, 90, 60), 3: (230, 230, 225), 4: (200, 40, 40), 5: (40, 160, 60),
           6: (60, 80, 200), 7: (200, 160, 30), 8: (140, 60, 160), 9: (40, 170, 170)}


@dataclass
class SyntheticScene:
    """Frames [N, H, W, 3] uint8, depth [N, H, W] float64 metres (0 = hole), labels / instances [N, H, W] int64,
    pose [N, 4, 4] camera-to-world, K [3, 3]; boxes: (label id, lo [3], hi [3]) in world coordinates."""

    color: np.ndarray
    depth: np.ndarray
    labels: np.ndarray
    instances: np.ndarray
    pose: np.ndarray
    K: np.ndarray
    boxes: list[tuple[int, np.ndarray, np.ndarray]]

    def exact_point(self, frame: int, u: float, v: float) -> tuple[np.ndarray, int, int]:
        """(the world point [3] the ray through pixel (u, v) of ``frame`` hits, its label id, its instance id)."""
        t, label, inst = _cast(self.pose[frame], self.K, np.array([[u]], np.float64), np.array([[v]], np.float64),
                               self.boxes)
        d = self.pose[frame, :3, :3] @ np.array([(u - self.K[0, 2]) / self.K[0, 0], (v - self.K[1, 2]) / self.K[1, 1],
                                                 1.0])
        return self.pose[frame, :3, 3] + t[0, 0] * d, int(label[0, 0]), int(inst[0, 0])


def look_at(eye: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Camera-to-world 4 x 4 (OpenCV camera) at ``eye`` looking at ``target`` with world z up."""
    f = target - eye
    f = f / np.linalg.norm(f)
    r = np.cross(f, np.array([0.0, 0.0, 1.0]))
    r = r / np.linalg.norm(r)
    d = np.cross(f, r)
    T = np.eye(4)
    T[:3, 0], T[:3, 1], T[:3, 2], T[:3, 3] = r, d, f, eye
    return T


def _slabs(origin: np.ndarray, dirs: np.ndarray, lo: np.ndarray, hi: np.ndarray):
    """Ray / axis-aligned box: (t_near, t_far) [...] of rays origin + t * dirs [..., 3]."""
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / dirs
        t0 = (lo - origin) * inv
        t1 = (hi - origin) * inv
    t_near = np.nanmax(np.minimum(t0, t1), axis=-1)
    t_far = np.nanmin(np.maximum(t0, t1), axis=-1)
    return t_near, t_far


def _cast(pose: np.ndarray, K: np.ndarray, u: np.ndarray, v: np.ndarray, boxes):
    """z-depth t (the ray is eye + t * R [x', y', 1]), label and instance of the first surface hit per pixel."""
    d_cam = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], axis=-1)
    dirs = d_cam @ pose[:3, :3].T
    eye = pose[:3, 3]
    _, t_room = _slabs(eye, dirs, *ROOM)                          # inside the room: the exit is the wall hit
    hit = eye + t_room[..., None] * dirs
    label = np.full(u.shape, 1, np.int64)                         # walls
    label[np.isclose(hit[..., 2], ROOM[0][2], atol=1e-9)] = 2     # floor
    label[np.isclose(hit[..., 2], ROOM[1][2], atol=1e-9)] = 3     # ceiling
    inst = label.copy()                                           # one instance per room surface kind
    t = t_room
    for k, (lab, lo, hi) in enumerate(boxes):
        t_near, t_far = _slabs(eye, dirs, lo, hi)
        closer = (t_near > 0) & (t_near <= t_far) & (t_near < t)
        t = np.where(closer, t_near, t)
        label = np.where(closer, lab, label)
        inst = np.where(closer, 10 + k, inst)
    return t, label, inst


def make_box_room(seed: int = 0, num_frames: int = 6, height: int = 96, width: int = 128, num_boxes: int = 4,
                  holes: int = 3, stacked: int = 0) -> SyntheticScene:
    """A random room of ``num_boxes`` labelled boxes on the floor, seen from ``num_frames`` cameras circling its
    centre; ``stacked`` more small boxes each stand on top of floor box k (k = 0, 1, ...; drawn from their own
    random stream, so ``stacked=0`` gives the same room as before)."""
    rng = np.random.default_rng(seed)
    boxes = []
    for k in range(num_boxes):
        lab = int(rng.choice(list(OBJECTS)))
        size = rng.uniform([0.4, 0.4, 0.4], [1.0, 1.0, 1.1])
        centre = np.array([*rng.uniform(-1.4, 1.4, 2), size[2] / 2])
        boxes.append((lab, centre - size / 2, centre + size / 2))
    srng = np.random.default_rng([seed, 7])
    for k in range(stacked):
        _, lo, hi = boxes[k % num_boxes]
        size = srng.uniform([0.15, 0.15, 0.15], [0.3, 0.3, 0.35])
        xy = srng.uniform(lo[:2] + size[:2] / 2, np.maximum(hi[:2] - size[:2] / 2, lo[:2] + size[:2] / 2))
        boxes.append((int(srng.choice(list(OBJECTS))), np.array([*(xy - size[:2] / 2), hi[2]]),
                      np.array([*(xy + size[:2] / 2), hi[2] + size[2]])))
    K = np.array([[0.8 * width, 0, (width - 1) / 2], [0, 0.8 * width, (height - 1) / 2], [0, 0, 1.0]])
    start = rng.uniform(0, 2 * np.pi)
    poses = []
    for i in range(num_frames):
        a = start + 2 * np.pi * i / max(num_frames, 1) * 0.35      # a 126-degree arc around the room
        eye = np.array([2.1 * np.cos(a), 2.1 * np.sin(a), 1.5 + 0.1 * rng.standard_normal()])
        target = np.array([0.3 * rng.standard_normal(), 0.3 * rng.standard_normal(), 0.6])
        poses.append(look_at(eye, target))
    pose = np.stack(poses)
    v, u = np.mgrid[0:height, 0:width].astype(np.float64)
    color = np.zeros((num_frames, height, width, 3), np.uint8)
    depth = np.zeros((num_frames, height, width))
    labels = np.zeros((num_frames, height, width), np.int64)
    instances = np.zeros_like(labels)
    for i in range(num_frames):
        t, lab, inst = _cast(pose[i], K, u, v, boxes)
        depth[i], labels[i], instances[i] = t, lab, inst
        d_cam = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], axis=-1)
        world = pose[i, :3, 3] + t[..., None] * (d_cam @ pose[i, :3, :3].T)
        checker = ((np.floor(world[..., 0] * 4) + np.floor(world[..., 1] * 4) + np.floor(world[..., 2] * 4)) % 2)
        base = np.array([COLOURS[int(x)] for x in range(10) if x in COLOURS])
        rgb = base[np.searchsorted(sorted(COLOURS), lab)] * (0.85 + 0.15 * checker[..., None])
        color[i] = np.clip(rgb, 0, 255).astype(np.uint8)
        for _ in range(holes):                                     # missing depth readings
            r, c = rng.integers(0, height - 4), rng.integers(0, width - 4)
            depth[i, r:r + 4, c:c + 4] = 0.0
    return SyntheticScene(color, depth, labels, instances, pose, K, boxes)


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


SCANREFER_NAME = "scanrefer.json"


def write_scannet_layout(scene: SyntheticScene, root: str | os.PathLike, annotations: bool = True,
                         language: bool = True) -> str:
    """Write ``scene`` in ScanNet's exported layout (see scenes.py); depth in millimetres as uint16 png. With
    ``annotations`` (default) also ScanNet's mesh annotation files (:func:`write_mesh_annotations`), so the scene
    has the benchmarks' annotated boxes; with ``language`` (default; needs ``annotations``) also
    ``<root>/scanrefer.json``, ScanRefer-format descriptions of its objects computed from the exact geometry
    (language.describe_scene; scene_id = the folder's name, object_id = the aggregation's objectId)."""
    from PIL import Image

    from ..atomic_files import write_bytes, write_text

    root = os.fspath(root)
    K4 = np.eye(4)
    K4[:3, :3] = scene.K
    matrix = "\n".join(" ".join(f"{x:.10f}" for x in row) for row in K4) + "\n"
    write_text(os.path.join(root, "intrinsic", "intrinsic_color.txt"), matrix)
    write_text(os.path.join(root, "intrinsic", "intrinsic_depth.txt"), matrix)
    write_text(os.path.join(root, "labels.json"), json.dumps({str(k): v for k, v in LABELS.items()}, indent=1))
    for i in range(scene.color.shape[0]):
        buf = io.BytesIO()
        Image.fromarray(scene.color[i]).save(buf, format="JPEG", quality=95)
        write_bytes(os.path.join(root, "color", f"{i}.jpg"), buf.getvalue())
        write_bytes(os.path.join(root, "depth", f"{i}.png"), _png(np.round(scene.depth[i] * 1000).astype(np.uint16)))
        write_text(os.path.join(root, "pose", f"{i}.txt"),
                   "\n".join(" ".join(f"{x:.12f}" for x in row) for row in scene.pose[i]) + "\n")
        write_bytes(os.path.join(root, "label-filt", f"{i}.png"), _png(scene.labels[i].astype(np.uint16)))
        write_bytes(os.path.join(root, "instance-filt", f"{i}.png"), _png(scene.instances[i].astype(np.uint16)))
    if annotations:
        write_mesh_annotations(scene, root)
        if language:
            from .language import describe_scene

            name = os.path.basename(os.path.normpath(root))
            write_text(os.path.join(root, SCANREFER_NAME),
                       json.dumps(describe_scene(scene.boxes, scene.pose[0], name, LABELS), indent=1))
    return root


def _box_corners(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """[8, 3]: corner j has x from hi when bit 2 of j is set, y bit 1, z bit 0."""
    return np.array([[(lo, hi)[(j >> 2) & 1][0], (lo, hi)[(j >> 1) & 1][1], (lo, hi)[j & 1][2]] for j in range(8)])


# the 12 triangles of a box over _box_corners' numbering
_BOX_FACES = np.array([[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1], [2, 3, 7], [2, 7, 6],
                       [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]])
DEFAULT_ALIGNMENT = np.array([[0.0, -1.0, 0.0, 2.5], [1.0, 0.0, 0.0, 2.5], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])


def ply_bytes(verts: np.ndarray, faces: np.ndarray) -> bytes:
    """A binary little-endian PLY as ScanNet's ``_vh_clean_2.ply``: vertices [N, 3] as float x, y, z + uchar
    red, green, blue, alpha; triangles [M, 3] as ``list uchar int vertex_indices``."""
    v = np.zeros(len(verts), np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"),
                                       ("blue", "u1"), ("alpha", "u1")]))
    v["x"], v["y"], v["z"], v["alpha"] = verts[:, 0], verts[:, 1], verts[:, 2], 255
    f = np.zeros(len(faces), np.dtype([("n", "u1"), ("i", "<i4", (3,))]))
    f["n"], f["i"] = 3, faces
    header = (f"ply\nformat binary_little_endian 1.0\nelement vertex {len(v)}\nproperty float x\nproperty float y\n"
              "property float z\nproperty uchar red\nproperty uchar green\nproperty uchar blue\nproperty uchar alpha\n"
              f"element face {len(f)}\nproperty list uchar int vertex_indices\nend_header\n")
    return header.encode("ascii") + v.tobytes() + f.tobytes()


def write_mesh_annotations(scene: SyntheticScene, root: str | os.PathLike,
                           axis_alignment: np.ndarray = DEFAULT_ALIGNMENT) -> dict[str, str]:
    """Write ScanNet's per-scene annotation files for ``scene`` into ``root`` (see annotations.py): a mesh of the
    room's shell and boxes (the world frame is the mesh's unaligned frame, which the poses use), one segment per
    face pair, one segGroup per instance (objectId = instance id - 1, as ScanNet's instance-filt images) and
    ``axis_alignment`` [4, 4] (default: a quarter turn about z and a shift, so the boxes stay exact)."""
    from ..atomic_files import write_bytes, write_text
    from .annotations import annotation_paths

    paths = annotation_paths(root)
    shell = [(1, ROOM[0], ROOM[1]), (2, ROOM[0], np.array([*ROOM[1][:2], 0.0])),
             (3, np.array([*ROOM[0][:2], ROOM[1][2]]), ROOM[1])]
    parts = [(lab, lab, lo, hi) for lab, lo, hi in shell] + [(lab, 10 + k, lo, hi)
                                                              for k, (lab, lo, hi) in enumerate(scene.boxes)]
    verts, faces, seg, groups = [], [], [], []
    for n, (lab, inst, lo, hi) in enumerate(parts):
        verts.append(_box_corners(lo, hi))
        faces.append(_BOX_FACES + 8 * n)
        seg += [100 * inst + (j & 1) for j in range(8)]           # two segments per part
        groups.append({"id": inst - 1, "objectId": inst - 1, "label": LABELS[lab],
                       "segments": [100 * inst, 100 * inst + 1]})
    write_bytes(paths["mesh"], ply_bytes(np.concatenate(verts), np.concatenate(faces)))
    name = os.path.basename(paths["meta"])[:-4]
    write_text(paths["segs"], json.dumps({"sceneId": name, "segIndices": seg}))
    write_text(paths["aggregation"], json.dumps({"sceneId": name, "segGroups": groups}))
    write_text(paths["meta"], "axisAlignment = " + " ".join(f"{x:.12g}" for x in np.ravel(axis_alignment)) + "\n")
    return paths
