"""ScanNet's per-scene annotations, read as the benchmarks read them, and the instance boxes they define.

Files (in the scene's folder, next to the exported color/ depth/ pose/ ...)::

    <scene>_vh_clean_2.ply                 binary little-endian PLY; the ``vertex`` element's float x, y, z are read
    <scene>_vh_clean_2.0.010000.segs.json  {"segIndices": [segment id per vertex]}
    <scene>.aggregation.json               {"segGroups": [{"objectId", "label", "segments"}, ...]}
    <scene>.txt                            the line ``axisAlignment = m00 m01 ... m33`` (row-major 4 x 4)

Instance boxes follow VoteNet's ``scannet/load_scannet_data.py`` (facebookresearch/votenet; Video-3D LLM's
``scripts/3d/preprocessing/extract_scannet_pcd.py`` computes the same; ScanRefer's copy of VoteNet's script takes
the box of the *unaligned* vertices): vertices ``p`` are aligned as ``axisAlignment @ [p, 1]``; each vertex belongs
to the object whose segments hold its segment (segGroups in file order, a later group overwriting an earlier one);
an object's box is the axis-aligned min / max of its aligned vertices, as centre + size; an object left with no
vertex has no box.

Into a video frame's camera (:func:`boxes_to_camera`), as VG-LLM (LaVi-Lab/VG-LLM,
``src/lmms_eval/tasks/scanrefer/utils.py``: ``extrinsic = axis_align_matrix @ cam2global[frame]``,
``transform_scanrefer_bbox``): ScanNet poses are camera-to-world in the *unaligned* mesh frame, so aligned -> camera
is ``inv(axisAlignment @ pose)``. The box moves rigidly: its centre is transformed, its size kept, its orientation
becomes that transform's rotation (VG-LLM keeps this oriented box, 9-DoF, and scores it with an oriented IoU).
``aabb_size`` is the axis-aligned extent of the 8 moved corners (``|R| @ size``), what an axis-aligned text box can
hold; it contains the oriented box and is larger unless the rotation permutes axes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..atomic_files import read_json
from .scenes import transform

# PLY scalar types (both spellings of the PLY spec) -> little-endian numpy dtypes
_PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "<i2", "int16": "<i2",
              "ushort": "<u2", "uint16": "<u2", "int": "<i4", "int32": "<i4", "uint": "<u4", "uint32": "<u4",
              "float": "<f4", "float32": "<f4", "double": "<f8", "float64": "<f8"}


def annotation_paths(root: str | os.PathLike, name: str | None = None) -> dict[str, str]:
    """{"mesh", "segs", "aggregation", "meta"}: the four files' paths for scene folder ``root`` (``name`` defaults
    to the folder's name)."""
    root = os.fspath(root)
    name = name or os.path.basename(os.path.normpath(root))
    return {"mesh": os.path.join(root, f"{name}_vh_clean_2.ply"),
            "segs": os.path.join(root, f"{name}_vh_clean_2.0.010000.segs.json"),
            "aggregation": os.path.join(root, f"{name}.aggregation.json"),
            "meta": os.path.join(root, f"{name}.txt")}


def has_annotations(root: str | os.PathLike, name: str | None = None) -> bool:
    """Whether all four annotation files exist."""
    return all(os.path.isfile(p) for p in annotation_paths(root, name).values())


def read_ply_vertices(path: str) -> np.ndarray:
    """The ``vertex`` element's x, y, z of a binary little-endian PLY as float64 [N, 3]. Other vertex properties
    (colours, normals, ...) may be any PLY scalar type; elements before ``vertex`` must have scalar properties only
    (list properties, e.g. faces, are allowed after it). Anything else is a ValueError naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing mesh {path!r}")
    with open(path, "rb") as f:
        data = f.read()
    end = data.find(b"end_header\n")
    if not data.startswith(b"ply\n") or end < 0:
        raise ValueError(f"{path!r}: not a PLY file (expected 'ply' on the first line and an 'end_header' line)")
    lines = data[:end].decode("ascii", errors="replace").splitlines()[1:]
    elements: list[tuple[str, int, list[tuple[str, str | None]]]] = []     # (name, count, [(prop, dtype|None)])
    fmt = None
    for line in lines:
        words = line.split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "format":
            fmt = words[1:]
        elif words[0] == "element" and len(words) == 3 and words[2].isdigit():
            elements.append((words[1], int(words[2]), []))
        elif words[0] == "property" and elements and len(words) == 3 and words[1] in _PLY_TYPES:
            elements[-1][2].append((words[2], _PLY_TYPES[words[1]]))
        elif (words[0] == "property" and elements and len(words) == 5 and words[1] == "list"
              and words[2] in _PLY_TYPES and words[3] in _PLY_TYPES):
            elements[-1][2].append((words[4], None))
        else:
            raise ValueError(f"{path!r}: unexpected PLY header line {line!r} (expected format / element / property "
                             "lines with the PLY scalar types)")
    if fmt != ["binary_little_endian", "1.0"]:
        raise ValueError(f"{path!r}: expected 'format binary_little_endian 1.0' (ScanNet's meshes), got "
                         f"{' '.join(fmt or ['no format line'])!r}")
    offset = end + len(b"end_header\n")
    for name, count, props in elements:
        if any(t is None for _, t in props):
            raise ValueError(f"{path!r}: element {name!r} before 'vertex' has a list property: expected 'vertex' "
                             "first or elements of scalar properties before it")
        dtype = np.dtype([(p, t) for p, t in props])
        if name != "vertex":
            offset += count * dtype.itemsize
            continue
        types = dict(props)
        if any(types.get(a) not in ("<f4", "<f8") for a in "xyz"):
            raise ValueError(f"{path!r}: expected float (or double) x, y, z vertex properties, got "
                             f"{ {a: types.get(a) for a in 'xyz'} }")
        if len(data) < offset + count * dtype.itemsize:
            raise ValueError(f"{path!r}: truncated: the header declares {count} vertices of {dtype.itemsize} bytes, "
                             f"the file holds {max(len(data) - offset, 0)} bytes after the header")
        v = np.frombuffer(data, dtype, count, offset)
        xyz = np.stack([v["x"], v["y"], v["z"]], axis=-1).astype(np.float64)
        if not np.isfinite(xyz).all():
            raise ValueError(f"{path!r}: non-finite vertex coordinates")
        return xyz
    raise ValueError(f"{path!r}: no 'vertex' element in the PLY header")


def read_axis_alignment(path: str) -> np.ndarray:
    """The ``axisAlignment = ...`` line of ``<scene>.txt`` as float64 [4, 4] (row-major)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing scene meta file {path!r}")
    with open(path) as f:
        for line in f:
            key, eq, value = line.partition("=")
            if eq and key.strip() == "axisAlignment":
                try:
                    m = np.array([float(x) for x in value.split()], np.float64)
                except ValueError:
                    m = np.zeros(0)
                if m.shape != (16,) or not np.isfinite(m).all():
                    raise ValueError(f"{path!r}: axisAlignment must be 16 finite numbers, got {value.strip()!r}")
                return m.reshape(4, 4)
    raise ValueError(f"{path!r}: no 'axisAlignment = <16 numbers>' line")


def _load_json(path: str, key: str) -> list:
    d = read_json(path, "ScanNet annotation file")
    if not isinstance(d, dict) or not isinstance(d.get(key), list):
        raise ValueError(f"{path!r}: expected a JSON object with a {key!r} list")
    return d[key]


@dataclass
class SceneAnnotations:
    """Instance boxes in the axis-aligned scene frame: object_ids int64 [M] (the aggregation's objectId; the
    instance-filt images and VoteNet use objectId + 1), labels [M] (the aggregation's raw labels), center / size
    float64 [M, 3] (metres), axis_alignment float64 [4, 4]."""

    name: str
    object_ids: np.ndarray
    labels: list[str]
    center: np.ndarray
    size: np.ndarray
    axis_alignment: np.ndarray

    def index(self, object_id: int) -> int:
        """Row of ``object_id`` (KeyError when the scene has no box for it)."""
        hit = np.flatnonzero(self.object_ids == int(object_id))
        if not len(hit):
            raise KeyError(f"scene {self.name!r} has no annotated box for objectId {object_id}")
        return int(hit[0])


def load_scannet_annotations(root: str | os.PathLike, name: str | None = None) -> SceneAnnotations:
    """Read the four files of scene folder ``root`` (module docstring) and compute its instance boxes."""
    paths = annotation_paths(root, name)
    name = name or os.path.basename(os.path.normpath(os.fspath(root)))
    verts = read_ply_vertices(paths["mesh"])
    align = read_axis_alignment(paths["meta"])
    seg = _load_json(paths["segs"], "segIndices")
    if len(seg) != len(verts):
        raise ValueError(f"{paths['segs']!r}: {len(seg)} segIndices, but the mesh {paths['mesh']!r} has "
                         f"{len(verts)} vertices")
    try:
        seg = np.asarray(seg, np.int64)
    except (TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"{paths['segs']!r}: segIndices must be integers ({e})") from e
    groups = _load_json(paths["aggregation"], "segGroups")
    aligned = transform(align, verts)
    instance = np.full(len(verts), -1, np.int64)
    ids, labels = [], []
    known = set(np.unique(seg).tolist())
    for g in groups:
        if (not isinstance(g, dict) or not isinstance(g.get("objectId"), int) or not isinstance(g.get("label"), str)
                or not isinstance(g.get("segments"), list)):
            raise ValueError(f"{paths['aggregation']!r}: each segGroup needs an integer objectId, a string label and "
                             f"a segments list, got {str(g)[:120]}")
        if g["objectId"] in ids:
            raise ValueError(f"{paths['aggregation']!r}: objectId {g['objectId']} appears twice")
        missing = [s for s in g["segments"] if s not in known]
        if missing:
            raise ValueError(f"{paths['aggregation']!r}: objectId {g['objectId']} names segments {missing[:5]} that "
                             f"{paths['segs']!r} does not hold")
        instance[np.isin(seg, g["segments"])] = g["objectId"]      # a later group overwrites, as VoteNet
        ids.append(g["objectId"])
        labels.append(g["label"])
    keep, center, size = [], [], []
    for k, oid in enumerate(ids):
        p = aligned[instance == oid]
        if not len(p):
            continue                                                # VoteNet: `if len(obj_pc) == 0: continue`
        lo, hi = p.min(0), p.max(0)
        keep.append(k)
        center.append((lo + hi) / 2)
        size.append(hi - lo)
    return SceneAnnotations(name, np.array([ids[k] for k in keep], np.int64), [labels[k] for k in keep],
                            np.array(center, np.float64).reshape(-1, 3), np.array(size, np.float64).reshape(-1, 3),
                            align)


@dataclass
class CameraBoxes:
    """Boxes in a camera's coordinates (OpenCV): center float64 [M, 3], size [M, 3] (the box's own edges),
    rotation [3, 3] (box axes in camera coordinates: the oriented box is center + rotation @ (size * [-1/2, 1/2])),
    aabb_size [M, 3] (the axis-aligned extent of its 8 corners)."""

    center: np.ndarray
    size: np.ndarray
    rotation: np.ndarray
    aabb_size: np.ndarray


def boxes_to_camera(center: np.ndarray, size: np.ndarray, axis_alignment: np.ndarray,
                    cam_to_world: np.ndarray) -> CameraBoxes:
    """Aligned-frame axis-aligned boxes (center, size [M, 3]) -> the camera of pose ``cam_to_world`` [4, 4]
    (ScanNet's, in the unaligned frame): the rigid map ``inv(axis_alignment @ cam_to_world)``, as VG-LLM."""
    T = np.linalg.inv(np.asarray(axis_alignment, np.float64) @ np.asarray(cam_to_world, np.float64))
    R = T[:3, :3]
    size = np.asarray(size, np.float64)
    return CameraBoxes(transform(T, np.asarray(center, np.float64)), size.copy(), R.copy(), size @ np.abs(R).T)
