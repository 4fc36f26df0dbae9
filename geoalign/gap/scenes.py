"""Posed RGB-D scenes in ScanNet's exported layout (what ScanNet's SensReader writes per scene):

    <scene>/color/<i>.jpg                 colour frames
    <scene>/depth/<i>.png                 uint16 depth in millimetres (0 = no measurement)
    <scene>/pose/<i>.txt                  4 x 4 camera-to-world matrix (OpenCV camera: x right, y down, z forward)
    <scene>/intrinsic/intrinsic_color.txt, intrinsic_depth.txt   4 x 4 (the top-left 3 x 3 is K)
    <scene>/label-filt/<i>.png, instance-filt/<i>.png            optional: per-pixel label id / instance id of the
                                                                   depth frame (0 = unlabelled)
    <scene>/labels.json                   optional: {"<label id>": "<name>"} (else ScanNet's
                                          scannetv2-labels.combined.tsv in the scene or its parent, else "class_<id>")

Frame ids are the numeric file stems; color, depth and pose must hold the same ids. A pose with a non-finite entry
(ScanNet marks lost tracking with -inf) makes the scene invalid: a ValueError names the file. (The scene-level
mesh, aggregation and segmentation files, for the benchmarks' instance boxes, are read by annotations.py.)
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field

import numpy as np

SUBDIRS = ("color", "depth", "pose")


@dataclass
class PosedScene:
    """One scene: frame ids, file paths, poses [N, 4, 4] float64 (camera-to-world), intrinsics [3, 3] float64."""

    name: str
    root: str
    frame_ids: list[int]
    pose: np.ndarray
    K_color: np.ndarray
    K_depth: np.ndarray
    label_names: dict[int, str] = field(default_factory=dict)
    has_labels: bool = False
    depth_scale: float = 1000.0                  # depth png units per metre

    def _path(self, sub: str, i: int, ext: str) -> str:
        return os.path.join(self.root, sub, f"{self.frame_ids[i]}{ext}")

    def color_path(self, i: int) -> str:
        return self._path("color", i, ".jpg")

    def color(self, i: int) -> np.ndarray:
        """uint8 [H_c, W_c, 3]."""
        from PIL import Image

        with Image.open(self.color_path(i)) as im:
            return np.asarray(im.convert("RGB"))

    def depth(self, i: int) -> np.ndarray:
        """float64 [H_d, W_d] metres; 0 where the sensor measured nothing."""
        return _read_uint16(self._path("depth", i, ".png")).astype(np.float64) / self.depth_scale

    def labels(self, i: int) -> np.ndarray:
        """int64 [H_d, W_d] label ids (0 = unlabelled)."""
        self._need_labels()
        return _read_uint16(self._path("label-filt", i, ".png")).astype(np.int64)

    def instances(self, i: int) -> np.ndarray:
        """int64 [H_d, W_d] instance ids (0 = none)."""
        self._need_labels()
        return _read_uint16(self._path("instance-filt", i, ".png")).astype(np.int64)

    def label_name(self, label_id: int) -> str:
        return self.label_names.get(int(label_id), f"class_{int(label_id)}")

    def _need_labels(self) -> None:
        if not self.has_labels:
            raise ValueError(f"scene {self.root!r} has no label-filt/ and instance-filt/ folders")

    def __len__(self) -> int:
        return len(self.frame_ids)


def _read_uint16(path: str) -> np.ndarray:
    from PIL import Image

    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing frame file {path!r}")
    with Image.open(path) as im:
        a = np.asarray(im)
    if a.ndim != 2 or a.dtype not in (np.uint16, np.int32, np.uint8, np.int16):
        raise ValueError(f"{path!r}: expected a single-channel 16-bit png, got mode {im.mode} shape {a.shape}")
    return a.astype(np.int64)


def _ids(folder: str, ext: str) -> list[int]:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"scene folder {folder!r} not found")
    out = []
    for name in os.listdir(folder):
        stem, e = os.path.splitext(name)
        if e.lower() == ext and stem.isdigit():
            out.append(int(stem))
    return sorted(out)


def read_matrix(path: str, shape: tuple[int, int]) -> np.ndarray:
    """A whitespace-separated matrix file as float64 of ``shape`` (ValueError naming the file otherwise)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing {path!r}")
    try:
        m = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError as e:
        raise ValueError(f"{path!r} is not a numeric matrix: {e}") from e
    if m.shape != shape:
        raise ValueError(f"{path!r}: expected a {shape[0]} x {shape[1]} matrix, got {m.shape[0]} x {m.shape[1]}")
    return m


def _label_names(root: str) -> dict[int, str]:
    path = os.path.join(root, "labels.json")
    if os.path.isfile(path):
        with open(path) as f:
            raw = json.load(f)
        if not isinstance(raw, dict):
            raise ValueError(f"{path!r} must map label ids to names")
        return {int(k): str(v) for k, v in raw.items()}
    for tsv in (os.path.join(root, "scannetv2-labels.combined.tsv"),
                os.path.join(os.path.dirname(os.path.normpath(root)), "scannetv2-labels.combined.tsv")):
        if os.path.isfile(tsv):
            with open(tsv, newline="") as f:
                return {int(r["id"]): r["category"] for r in csv.DictReader(f, delimiter="\t")}
    return {}


def load_scannet_scene(root: str | os.PathLike) -> PosedScene:
    """Read a scene in ScanNet's exported layout (see the module docstring); checks ids, matrices and poses."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"scene directory not found: {root!r}")
    ids = {sub: _ids(os.path.join(root, sub), ext) for sub, ext in zip(SUBDIRS, (".jpg", ".png", ".txt"))}
    common = sorted(set(ids["color"]) & set(ids["depth"]) & set(ids["pose"]))
    for sub, have in ids.items():
        extra = sorted(set(have) - set(common))
        if extra:
            raise ValueError(f"scene {root!r}: {sub}/ has frames {extra[:5]} that the other folders lack")
    if not common:
        raise ValueError(f"scene {root!r} has no frames (color/*.jpg, depth/*.png, pose/*.txt)")
    poses = []
    for i in common:
        path = os.path.join(root, "pose", f"{i}.txt")
        p = read_matrix(path, (4, 4))
        if not np.isfinite(p).all():
            raise ValueError(f"pose {path!r} is not finite (lost tracking?): the scene cannot be used")
        poses.append(p)
    K_color = read_matrix(os.path.join(root, "intrinsic", "intrinsic_color.txt"), (4, 4))[:3, :3]
    K_depth = read_matrix(os.path.join(root, "intrinsic", "intrinsic_depth.txt"), (4, 4))[:3, :3]
    has_labels = os.path.isdir(os.path.join(root, "label-filt")) and os.path.isdir(os.path.join(root, "instance-filt"))
    return PosedScene(os.path.basename(os.path.normpath(root)), root, common, np.stack(poses), K_color, K_depth,
                      _label_names(root), has_labels)


def backproject(K: np.ndarray, u: np.ndarray, v: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Pixels (u, v) with z-depth z (metres) -> camera points [..., 3] (OpenCV camera)."""
    x = (np.asarray(u, np.float64) - K[0, 2]) / K[0, 0] * z
    y = (np.asarray(v, np.float64) - K[1, 2]) / K[1, 1] * z
    return np.stack([x, y, np.asarray(z, np.float64)], axis=-1)


def transform(T: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4 x 4 rigid transform to points [..., 3]."""
    return points @ T[:3, :3].T + T[:3, 3]


def to_first_camera(scene: PosedScene, frame: int, points_cam: np.ndarray, anchor: int = 0) -> np.ndarray:
    """Points in ``frame``'s camera -> the camera coordinates of frame ``anchor`` (the clip's first frame)."""
    world = transform(scene.pose[frame], points_cam)
    return transform(np.linalg.inv(scene.pose[anchor]), world)
