"""Language for GAP-MLLM's grounding and dense-captioning tasks: ScanRefer-format descriptions (read, validated, and
generated for procedural scenes from their exact geometry) and the records built from them.

ScanRefer's JSON is a list of ``{"scene_id", "object_id", "object_name", "ann_id", "description"}`` (ScanRefer
stores ``object_id`` and ``ann_id`` as digit strings; both spellings are read, as ints). ``object_id`` is the
aggregation's ``objectId`` (see annotations.py). "unique" (ScanRefer's split) = the object is the only one of its
class among the scene's annotated objects; here the class is the aggregation's raw label (ScanRefer maps
``object_name`` to a NYU40 class first; that mapping is not done yet).

Procedural descriptions (:func:`describe_scene`): each is a conjunction of attributes, every one computed from the
exact boxes and the first frame's camera, and each answers "yes", "no" or "unclear" (near a threshold) for every
object. A description is emitted only if its object answers "yes" to all of its attributes and every other object
answers a clear "no" to at least one of them, so it identifies its object uniquely by construction (a template that
would be ambiguous for a scene is not emitted). Attributes: class, colour (each class has one colour), size word
(small / medium / large by volume), "on the floor", largest / smallest / tallest / shortest of its class,
leftmost / rightmost of its class and "left of" / "right of" an anchor as seen from the first frame (the horizontal
angle atan2(x, z) of the box centre in that camera), "on" an anchor (its bottom on the anchor's top, footprints
overlapping) and "the closest <class> to" an anchor (box-centre distance). An anchor is an object whose class is
unique in the scene, so naming it by class is unambiguous.
"""
from __future__ import annotations

import os

import numpy as np

from ..atomic_files import read_json

SCANREFER_FIELDS = ("scene_id", "object_id", "object_name", "ann_id", "description")
COLOUR_NAMES = {4: "red", 5: "green", 6: "blue", 7: "yellow", 8: "purple", 9: "teal"}
ANGLE_MARGIN = 0.1          # radians: "left of" / leftmost need this clearance, else "unclear"
DIST_MARGIN = 0.2           # metres: "closest to" needs the runner-up this much farther
SIZE_WORDS = ((0.2, "small"), (0.45, "medium"), (np.inf, "large"))     # volume (m^3) upper bounds


# --------------------------------------------------------------------------------------------- ScanRefer JSON
def _int_field(value, path: str, i: int, key: str) -> int:
    if isinstance(value, bool):
        value = None
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, int) and value >= 0:
        return value
    raise ValueError(f"{path!r}: entry {i}: {key!r} must be a non-negative integer (or a digit string, as ScanRefer "
                     f"writes it), got {value!r}")


def read_scanrefer(path: str | os.PathLike) -> list[dict]:
    """The entries of ScanRefer-format JSON ``path``, each ``{"scene_id": str, "object_id": int, "object_name": str,
    "ann_id": int, "description": str}`` (extra keys, e.g. ScanRefer's ``token``, are kept). Errors name the file and
    the entry: not a list, an entry not an object, a missing field, an empty string, a non-integer id, and an
    (scene_id, object_id, ann_id) given twice."""
    path = os.fspath(path)
    data = read_json(path, "ScanRefer file")
    if not isinstance(data, list):
        raise ValueError(f"{path!r}: expected a JSON list of ScanRefer entries, got {type(data).__name__}")
    out, seen = [], {}
    for i, d in enumerate(data):
        if not isinstance(d, dict):
            raise ValueError(f"{path!r}: entry {i} must be an object with {list(SCANREFER_FIELDS)}, got {str(d)[:80]}")
        missing = [k for k in SCANREFER_FIELDS if k not in d]
        if missing:
            raise ValueError(f"{path!r}: entry {i} lacks {missing} (a ScanRefer entry has {list(SCANREFER_FIELDS)})")
        for k in ("scene_id", "object_name", "description"):
            if not isinstance(d[k], str) or not d[k].strip():
                raise ValueError(f"{path!r}: entry {i}: {k!r} must be a non-empty string, got {d[k]!r}")
        e = {**d, "object_id": _int_field(d["object_id"], path, i, "object_id"),
             "ann_id": _int_field(d["ann_id"], path, i, "ann_id")}
        key = (e["scene_id"], e["object_id"], e["ann_id"])
        if key in seen:
            raise ValueError(f"{path!r}: entry {i} repeats entry {seen[key]} (scene_id {key[0]!r}, object_id "
                             f"{key[1]}, ann_id {key[2]})")
        seen[key] = i
        out.append(e)
    return out


def by_object(entries: list[dict], scene_id: str) -> dict[int, list[dict]]:
    """{object_id: that scene's entries of the object, by ann_id}."""
    out: dict[int, list[dict]] = {}
    for e in entries:
        if e["scene_id"] == scene_id:
            out.setdefault(e["object_id"], []).append(e)
    return {k: sorted(v, key=lambda e: e["ann_id"]) for k, v in out.items()}


#: ScanRefer's 18 classes (its ScannetDatasetConfig.type2class, in order); every other class is "others"
SCANREFER_CLASSES = ("cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf", "picture", "counter",
                     "desk", "curtain", "refrigerator", "shower curtain", "toilet", "sink", "bathtub", "others")


def read_scannet_label_map(path: str) -> dict[str, str]:
    """{raw category: ScanRefer class} from ScanNet's ``scannetv2-labels.combined.tsv``, as ScanRefer's
    ``_get_raw2label`` (lib/dataset.py, daveredrum/ScanRefer) builds it: a raw category whose ``nyu40class`` is one of
    :data:`SCANREFER_CLASSES` maps to it, any other to "others" (so NYU40's "refridgerator" is "others" there too).
    Columns are found by their header names; a file without them is a ValueError naming it."""
    import csv

    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    header = rows[0] if rows else []
    if "raw_category" not in header or "nyu40class" not in header:
        raise ValueError(f"{path!r}: expected ScanNet's scannetv2-labels.combined.tsv with the columns raw_category "
                         f"and nyu40class; its header is {header[:8]}")
    raw, nyu40 = header.index("raw_category"), header.index("nyu40class")
    classes = set(SCANREFER_CLASSES)
    return {r[raw]: (r[nyu40] if r[nyu40] in classes else "others") for r in rows[1:] if len(r) > max(raw, nyu40)}


def scanrefer_unique(entries: list[dict], label_map: dict[str, str] | None = None) -> dict[tuple[str, int], bool]:
    """ScanRefer's unique / multiple lookup (``_get_unique_multiple_lookup``, lib/dataset.py): per scene, the class
    of every object its entries mention (the first entry's ``object_name`` with "_" read as " ", mapped by
    ``label_map``, :func:`read_scannet_label_map`; a name it lacks is "others"); an object is unique when its class
    occurs once among them. Without a label map the name itself is the class (procedural scenes name classes).
    Returns {(scene_id, object_id): unique}."""
    named: dict[str, dict[int, str]] = {}
    for e in entries:
        objects = named.setdefault(e["scene_id"], {})
        if e["object_id"] not in objects:
            name = " ".join(e["object_name"].split("_"))
            objects[e["object_id"]] = name if label_map is None else label_map.get(name, "others")
    out = {}
    for scene_id, objects in named.items():
        classes = list(objects.values())
        out.update({(scene_id, oid): classes.count(c) == 1 for oid, c in objects.items()})
    return out


# ------------------------------------------------------------------------------------ procedural descriptions
YES, NO, UNCLEAR = 1, 0, -1


def _compare(a: float, b: float, margin: float) -> int:
    """a < b clearly (YES), a > b clearly (NO), else UNCLEAR."""
    return YES if a < b - margin else NO if a > b + margin else UNCLEAR


def _extreme(values: np.ndarray, members: np.ndarray, margin: float, largest: bool) -> np.ndarray:
    """Per object: YES if it is the clear extreme of ``members``' values, NO if clearly not, UNCLEAR otherwise."""
    v = np.where(members, values if largest else -values, -np.inf)
    best = int(np.argmax(v))
    out = np.full(len(values), NO)
    for i in np.flatnonzero(members):
        if i == best:
            runner = np.max(np.delete(v, best)) if len(v) > 1 else -np.inf
            out[i] = YES if v[i] > runner + margin else UNCLEAR
        elif v[i] >= v[best] - margin:
            out[i] = UNCLEAR
    return out


def scene_attributes(boxes: list[tuple[int, np.ndarray, np.ndarray]], first_pose: np.ndarray,
                     names: dict[int, str]) -> list[tuple[str, np.ndarray, str | None]]:
    """The attributes of :func:`describe_scene` (module docstring): (template text, per-object answers [M] of
    YES / NO / UNCLEAR, kind). Template text uses {cls} for the described object's class; kind is "base" for the
    first sentence's attributes (class, colour, size, floor), else None. ``names``: label id -> class name
    (procedural.LABELS)."""
    m = len(boxes)
    labels = np.array([lab for lab, _, _ in boxes])
    lo = np.array([b[1] for b in boxes]).reshape(m, 3)
    hi = np.array([b[2] for b in boxes]).reshape(m, 3)
    centre, size = (lo + hi) / 2, hi - lo
    volume, height = size.prod(1), size[:, 2]
    to_cam = np.linalg.inv(first_pose)
    cam = centre @ to_cam[:3, :3].T + to_cam[:3, 3]
    angle = np.arctan2(cam[:, 0], cam[:, 2])                       # OpenCV: x right, so smaller = further left
    unique = [int((labels == lab).sum()) == 1 for lab in labels]
    attrs: list[tuple[str, np.ndarray, str | None]] = []
    for lab in sorted(set(labels.tolist())):
        same = labels == lab
        name = names[lab]
        attrs.append((f"class:{name}", np.where(same, YES, NO), "base"))
        for what, vals, margin in (("largest", volume, 0.15 * volume.max()), ("smallest", -volume, 0.15 * volume.max()),
                                   ("tallest", height, 0.1), ("shortest", -height, 0.1),
                                   ("rightmost", angle, ANGLE_MARGIN), ("leftmost", -angle, ANGLE_MARGIN)):
            if same.sum() >= 2:
                attrs.append((f"it is the {what} {name}" + (" as seen from the first view" if "most" in what else "")
                              + ".", _extreme(vals, same, margin, True), None))
    colour = np.array([YES] * m)                                    # one colour per class: never disambiguates alone
    attrs.append(("colour", colour, "base"))
    words = [next(w for ub, w in SIZE_WORDS if v < ub) for v in volume]
    near = np.array([any(abs(v - ub) < 0.1 * ub for ub, _ in SIZE_WORDS[:-1]) for v in volume])
    for w in sorted(set(words)):
        attrs.append((f"size:{w}", np.array([UNCLEAR if near[i] else YES if words[i] == w else NO for i in range(m)]),
                      "base"))
    on_floor = np.array([YES if lo[i, 2] < 0.01 else NO if lo[i, 2] > 0.05 else UNCLEAR for i in range(m)])
    attrs.append(("it is on the floor.", on_floor, None))
    for a in range(m):
        if not unique[a]:
            continue
        anchor = names[int(labels[a])]
        left = np.array([NO if i == a else _compare(angle[i], angle[a], ANGLE_MARGIN) for i in range(m)])
        right = np.array([NO if i == a else _compare(-angle[i], -angle[a], ANGLE_MARGIN) for i in range(m)])
        attrs.append((f"it is to the left of the {anchor} as seen from the first view.", left, None))
        attrs.append((f"it is to the right of the {anchor} as seen from the first view.", right, None))
        overlap = (np.minimum(hi[:, :2], hi[a, :2]) - np.maximum(lo[:, :2], lo[a, :2])).clip(0).prod(1)
        gap = np.abs(lo[:, 2] - hi[a, 2])
        on = np.array([NO if i == a else YES if gap[i] < 0.01 and overlap[i] > 0.05 * size[i, :2].prod()
                       else NO if gap[i] > 0.05 or overlap[i] == 0 else UNCLEAR for i in range(m)])
        if (on == YES).any():
            attrs.append((f"it is on the {anchor}.", on, None))
        dist = np.linalg.norm(centre - centre[a], axis=1)
        for lab in sorted(set(labels.tolist())):
            same = (labels == lab) & (np.arange(m) != a)
            if same.sum() >= 2:
                attrs.append((f"it is the {names[lab]} closest to the {anchor}.",
                              _extreme(-dist, same, DIST_MARGIN, True), None))
    return attrs


def describe_scene(boxes: list[tuple[int, np.ndarray, np.ndarray]], first_pose: np.ndarray, scene_id: str,
                   names: dict[int, str], object_ids: list[int] | None = None, per_object: int = 4) -> list[dict]:
    """ScanRefer-format entries for procedural boxes (module docstring): per object, up to ``per_object``
    descriptions -- the base sentence "this is a <size> <colour> <class>." alone, then followed by each
    clause -- each kept only when it picks out its object uniquely. ``object_ids`` default: 9 + k for box k (the
    procedural instance id 10 + k, minus 1). ``names``: label id -> class name (procedural.LABELS)."""
    attrs = scene_attributes(boxes, first_pose, names)
    m = len(boxes)
    object_ids = list(object_ids) if object_ids is not None else [9 + k for k in range(m)]
    volume = [float(np.prod(hi - lo)) for _, lo, hi in boxes]
    out = []
    for t in range(m):
        lab = boxes[t][0]
        base = [a for a in attrs if a[2] == "base" and a[1][t] == YES]
        word = next(w for ub, w in SIZE_WORDS if volume[t] < ub)
        if not any(a[0] == f"size:{word}" for a in base):       # an unclear size word is left out
            word = ""
        base = [a for a in base if not a[0].startswith("size:") or a[0] == f"size:{word}"]
        head = f"this is a {word + ' ' if word else ''}{COLOUR_NAMES.get(lab, '')} {names[lab]}.".replace("  ", " ")
        candidates = [(head, base)] + [(f"{head} {text}", base + [(text, ans, kind)])
                                       for text, ans, kind in attrs if kind is None and ans[t] == YES]
        ann = 0
        for text, conj in candidates:
            answers = np.array([a[1] for a in conj])                # [attributes, objects]
            if not (answers[:, t] == YES).all():
                continue
            others = [i for i in range(m) if i != t]
            if all((answers[:, i] == NO).any() for i in others):
                out.append({"scene_id": scene_id, "object_id": int(object_ids[t]), "object_name": names[lab],
                            "ann_id": ann, "description": text})
                ann += 1
                if ann >= per_object:
                    break
    return out


def matching_objects(description: str, boxes, first_pose, names: dict[int, str]) -> list[int]:
    """Indices of the boxes a generated description fits (each of its attributes answered YES or UNCLEAR): a check
    that a description built by :func:`describe_scene` is unique reads back a single index."""
    attrs = {a[0]: a[1] for a in scene_attributes(boxes, first_pose, names)}
    head, _, clause = description.partition(". ")
    words = head.removeprefix("this is a ").rstrip(".").split()
    name = words[-1]
    keys = [f"class:{name}"] + [f"size:{w}" for w in words[:-1] if f"size:{w}" in attrs]
    if clause:
        keys.append(clause)
    if any(k not in attrs for k in keys):
        raise KeyError(f"description {description!r} uses an attribute this scene does not have")
    fit = np.all([attrs[k] != NO for k in keys], axis=0)
    return np.flatnonzero(fit).tolist()
