"""GAP-MLLM's object-level fine-tuning data: 3D video object detection and 3D visual grounding as text, from posed
RGB-D scenes with instance masks.

A clip's objects are the instances visible in its frames, except the room's shell (wall / floor / ceiling, as
ScanNet's detection benchmark leaves them out). Each object's box, in the first frame's camera coordinates, comes
from ``box_source``:

* ``"annotated"`` (the default when the scene folder holds ScanNet's mesh annotations, see annotations.py): the
  benchmarks' box of the instance (objectId = instance id - 1) from the annotated mesh after the axis alignment,
  moved into the first camera as VG-LLM does; the text holds the axis-aligned extent of its 8 moved corners
  (``aabb_size``), the record's metadata also the oriented box (``rotation``).
* ``"clip_visible"`` (the default otherwise): the axis-aligned box of the object's back-projected valid-depth
  pixels over the clip (what the clip shows; no mesh annotation needed).

Answers use geoalign.eval.boxes3d's text form (``label: [x, y, z, dx, dy, dz]``), which
``geoalign score`` parses back.

Detection records: "Detect ..." -> every object, one per line. Grounding records, ``metadata.query``:
"marker" ("Where is the <label> marked <n>?" with the object's centre pixel marked on its first frame -> that
object's box) and, given ScanRefer-format descriptions (language.py), "language" (the description -> the
described object's box; ``metadata.unique``: ScanRefer's unique / multiple split). Dense-captioning records
(``gap_dense_caption``, Scan2Cap): the prompt gives the object by its box as text (Video-3D LLM's recipe,
``scripts/3d/preprocessing/process_scan2cap.py``: "Given an object located at <coord>, describe the object in
detail.", the ground-truth box in training), the answer is one of its descriptions, ``metadata.references`` all of
them. Language and caption records use only annotated boxes and the objects the clip shows.
"""
from __future__ import annotations

import io
import os
import zlib

import numpy as np

from ..eval.boxes3d import Box3D, format_boxes
from .annotations import SceneAnnotations, boxes_to_camera, has_annotations, load_scannet_annotations
from .pretrain_data import depth_to_colour_pixel, draw_markers
from .scenes import PosedScene, backproject, to_first_camera

SHELL = ("wall", "floor", "ceiling")
BOX_SOURCES = ("annotated", "clip_visible")
DETECT_QUESTION = ("Detect every object in these frames. For each, give its category and its 3D box "
                   "[x, y, z, dx, dy, dz] (centre and size in metres, in the camera coordinates of the first frame).")
GROUND_QUESTION = ("Where is the {label} marked {n}? Give its 3D box [x, y, z, dx, dy, dz] (centre and size in "
                   "metres, in the camera coordinates of the first frame).")
LANGUAGE_QUESTION = ("Find the object this describes: \"{description}\" Give its 3D box [x, y, z, dx, dy, dz] "
                     "(centre and size in metres, in the camera coordinates of the first frame).")
CAPTION_QUESTION = ("Given an object located at {box} (its 3D box [x, y, z, dx, dy, dz]: centre and size in metres, "
                    "in the camera coordinates of the first frame), describe the object in detail.")


def resolve_box_source(scene: PosedScene, box_source: str | None) -> str:
    """``box_source`` checked; None -> "annotated" when the scene folder has the annotation files, else
    "clip_visible"."""
    if box_source is None:
        return "annotated" if has_annotations(scene.root, scene.name) else "clip_visible"
    if box_source not in BOX_SOURCES:
        raise ValueError(f"box_source must be one of {BOX_SOURCES}, got {box_source!r}")
    return box_source


def clip_objects(scene: PosedScene, frames: list[int], min_pixels: int = 20, box_source: str | None = None,
                 annotations: SceneAnnotations | None = None) -> list[dict]:
    """Objects visible in ``frames`` (scene frame indices; the first is the anchor): per instance with at least
    ``min_pixels`` valid-depth pixels, {"instance", "label", "box": Box3D, "first": (frame position, u, v) of the
    pixel nearest its 2D centroid in the first frame showing it}, sorted by instance id. ``box_source``: see the
    module docstring (``annotations``: the scene's, if already loaded); "annotated" objects also carry
    "object_id" and "rotation" (float64 [3, 3], the oriented box's axes in the first camera)."""
    box_source = resolve_box_source(scene, box_source)
    if box_source == "annotated" and annotations is None:
        annotations = load_scannet_annotations(scene.root, scene.name)
    points: dict[int, list[np.ndarray]] = {}
    label_of: dict[int, int] = {}
    first: dict[int, tuple[int, float, float]] = {}
    for k, i in enumerate(frames):
        depth, labels, inst = scene.depth(i), scene.labels(i), scene.instances(i)
        valid = (depth > 0) & (inst > 0) & (labels > 0)
        for n in np.unique(inst[valid]):
            if scene.label_name(int(labels[valid & (inst == n)][0])) in SHELL:
                continue
            vd, ud = np.nonzero(valid & (inst == n))
            cam = backproject(scene.K_depth, ud, vd, depth[vd, ud])
            points.setdefault(int(n), []).append(to_first_camera(scene, i, cam, anchor=frames[0]))
            label_of[int(n)] = int(labels[vd[0], ud[0]])
            if int(n) not in first:
                j = int(np.argmin((ud - ud.mean()) ** 2 + (vd - vd.mean()) ** 2))
                first[int(n)] = (k, *depth_to_colour_pixel(scene, int(ud[j]), int(vd[j])))
    out = []
    for n in sorted(points):
        p = np.concatenate(points[n])
        if len(p) < min_pixels:
            continue
        label = scene.label_name(label_of[n])
        obj = {"instance": n, "label": label, "first": first[n]}
        if box_source == "annotated":
            try:
                row = annotations.index(n - 1)                   # instance-filt ids are objectId + 1
            except KeyError as e:
                raise ValueError(f"scene {scene.root!r}: instance {n} is visible but {e.args[0]}") from None
            cam = boxes_to_camera(annotations.center[row:row + 1], annotations.size[row:row + 1],
                                  annotations.axis_alignment, scene.pose[frames[0]])
            centre, size = cam.center[0], np.maximum(cam.aabb_size[0], 0.01)
            obj.update(object_id=int(annotations.object_ids[row]), rotation=cam.rotation)
        else:
            lo, hi = p.min(0), p.max(0)
            centre, size = (lo + hi) / 2, np.maximum(hi - lo, 0.01)   # a flat patch still gets a 2-decimal extent
        obj["box"] = Box3D(label, tuple(centre.tolist()), tuple(size.tolist()))
        out.append(obj)
    return out


def _box_json(obj: dict) -> dict:
    b = obj["box"]
    out = {"label": b.label, "center": [round(c, 4) for c in b.center], "size": [round(s, 4) for s in b.size]}
    if "object_id" in obj:
        out["object_id"] = obj["object_id"]
        out["rotation"] = np.round(obj["rotation"], 6).tolist()
    return out


def _box_text(obj: dict) -> str:
    return format_boxes([obj["box"]]).split(": ", 1)[1]


def make_finetune_records(scene: PosedScene, media_dir: str, media_root: str, *, samples: int = 1, frames: int = 4,
                          grounding_per_sample: int = 1, seed: int = 0, box_source: str | None = None,
                          descriptions: list[dict] | None = None, captions_per_sample: int | None = None,
                          descriptions_source: str = "descriptions", captions_once_per_object: bool = False,
                          label_map: dict[str, str] | None = None) -> list[dict]:
    """Per sample: one detection record over ``frames`` frames and up to ``grounding_per_sample`` marker grounding
    records (each record's frames in its own folder under ``media_dir``; ``images`` is that folder, relative to
    ``media_root``). ``metadata.objects`` / ``metadata.target`` keep the boxes as numbers for scoring;
    ``metadata.box_source`` says where they come from (``box_source``: see the module docstring).

    ``descriptions`` (ScanRefer-format entries, language.read_scanrefer; those of other scenes are ignored) adds,
    per sample, up to ``grounding_per_sample`` language grounding records (distinct descriptions of objects the
    clip shows) and up to ``captions_per_sample`` (default ``grounding_per_sample``) dense-captioning records
    (distinct objects); both need annotated boxes. ``descriptions_source`` (their file) names them in errors.
    ``metadata.unique`` follows ScanRefer's lookup over the scene's entries (language.scanrefer_unique; ``label_map``
    maps raw ScanNet names to ScanRefer's classes, language.read_scannet_label_map).
    ``captions_once_per_object``: each object gets at most one caption record in the scene (the first clip that
    shows it), as Video-3D LLM's Scan2Cap validation set (one record per object; Scan2Cap scores each object once)."""
    from PIL import Image

    from ..atomic_files import write_bytes

    if len(scene) < frames:
        raise ValueError(f"scene {scene.root!r} has {len(scene)} frames, fewer than frames={frames}")
    box_source = resolve_box_source(scene, box_source)
    annotations = load_scannet_annotations(scene.root, scene.name) if box_source == "annotated" else None
    rng = np.random.default_rng([seed, zlib.crc32(scene.name.encode()), 1])
    described: dict[int, list[dict]] = {}
    lrng = np.random.default_rng([seed, zlib.crc32(scene.name.encode()), 2])   # language: its own stream
    if descriptions is not None:
        from .language import by_object, scanrefer_unique

        if box_source != "annotated":
            raise ValueError(f"scene {scene.root!r}: language grounding and dense captioning records need the "
                             "annotated boxes (box_source 'annotated' and ScanNet's mesh annotation files)")
        described = by_object(descriptions, scene.name)
        for oid in described:
            try:
                annotations.index(oid)
            except KeyError as e:
                raise ValueError(f"{descriptions_source!r}: the description of object_id {oid} (ann_id "
                                 f"{described[oid][0]['ann_id']}) names an object that {e.args[0][0].lower()}"
                                 f"{e.args[0][1:]}") from None
        unique_of = {oid: u for (sid, oid), u in scanrefer_unique(descriptions, label_map).items()
                     if sid == scene.name}
    captions_per_sample = grounding_per_sample if captions_per_sample is None else captions_per_sample
    captioned: set[int] = set()
    records = []

    def save_folder(imgs: list[np.ndarray], name: str) -> str:
        """The clip's frames as <media_dir>/<name>/<k>.jpg (a frame folder: the trainer and `geoalign eval gap`
        read it); returns its path relative to media_root."""
        folder = os.path.join(media_dir, name)
        for k, img in enumerate(imgs):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=92)
            write_bytes(os.path.join(folder, f"{k}.jpg"), buf.getvalue())
        return os.path.relpath(folder, media_root)

    for s in range(samples):
        window = int(rng.integers(frames, len(scene) + 1))
        start = int(rng.integers(0, len(scene) - window + 1))
        chosen = [start + int(round(x)) for x in np.linspace(0, window - 1, frames)]
        objects = clip_objects(scene, chosen, box_source=box_source, annotations=annotations)
        if not objects:
            continue
        colours = [scene.color(i) for i in chosen]
        base = f"{scene.name}_{seed}_{s}"
        images = save_folder(colours, base)
        meta = {"scene": scene.name, "frame_ids": [scene.frame_ids[i] for i in chosen], "box_source": box_source}
        records.append({"id": f"{scene.name}/{seed}/{s}/det", "images": images,
                        "conversations": [{"from": "human", "value": "<image>\n" + DETECT_QUESTION},
                                          {"from": "gpt", "value": format_boxes([o["box"] for o in objects])}],
                        "metadata": {**meta, "task": "gap_detection",
                                     "objects": [_box_json(o) for o in objects]}})
        order = rng.permutation(len(objects))[:grounding_per_sample]
        for q, j in enumerate(order):
            obj = objects[int(j)]
            k, u, v = obj["first"]
            marked = save_folder([draw_markers(c, [(u, v, 1)]) if j == k else c for j, c in enumerate(colours)],
                                 f"{base}_g{q}")
            records.append({"id": f"{scene.name}/{seed}/{s}/ground{q}", "images": marked,
                            "conversations": [{"from": "human",
                                               "value": "<image>\n" + GROUND_QUESTION.format(label=obj["label"], n=1)},
                                              {"from": "gpt", "value": format_boxes([obj["box"]])}],
                            "metadata": {**meta, "task": "gap_grounding", "query": "marker", "target": _box_json(obj),
                                         "marker": {"frame": k, "u": round(float(u), 3), "v": round(float(v), 3)}}})
        told = [o for o in objects if o.get("object_id") in described]
        pairs = [(o, e) for o in told for e in described[o["object_id"]]]
        for q, j in enumerate(lrng.permutation(len(pairs))[:grounding_per_sample]):
            obj, e = pairs[int(j)]
            records.append({"id": f"{scene.name}/{seed}/{s}/lang{q}", "images": images,
                            "conversations": [{"from": "human", "value": "<image>\n" + LANGUAGE_QUESTION.format(
                                description=e["description"])},
                                              {"from": "gpt", "value": format_boxes([obj["box"]])}],
                            "metadata": {**meta, "task": "gap_grounding", "query": "language",
                                         "unique": bool(unique_of[obj["object_id"]]), "target": _box_json(obj),
                                         "object_id": obj["object_id"], "ann_id": e["ann_id"],
                                         "description": e["description"]}})
        fresh = [o for o in told if not (captions_once_per_object and o["object_id"] in captioned)]
        for q, j in enumerate(lrng.permutation(len(fresh))[:captions_per_sample]):
            obj = fresh[int(j)]
            captioned.add(obj["object_id"])
            refs = described[obj["object_id"]]
            box = _box_json(obj)
            answer = refs[int(lrng.integers(len(refs)))]
            records.append({"id": f"{scene.name}/{seed}/{s}/cap{q}", "images": images,
                            "conversations": [{"from": "human", "value": "<image>\n" + CAPTION_QUESTION.format(
                                box=_box_text(obj))}, {"from": "gpt", "value": answer["description"]}],
                            "metadata": {**meta, "task": "gap_dense_caption", "box": box["center"] + box["size"],
                                         "prompt_box": box["center"] + box["size"], "label": obj["label"],
                                         "references": [e["description"] for e in refs],
                                         "object_id": obj["object_id"], "ann_id": answer["ann_id"]}})
    return records
