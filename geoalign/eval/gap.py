"""GAP-MLLM's object-level tasks as a benchmark: 3D video object detection and 3D visual grounding, scored from the
boxes-as-text answers (geoalign.eval.boxes3d: ScanNet mAP@0.25 / @0.5 as VoteNet, ScanRefer Acc@0.25 / @0.5).

Data: ``<data>/gap_<split>.json`` (default split ``test``), records written by ``geoalign gap-data --task finetune``
(each record's frames in a folder; ``metadata.task`` gap_detection / gap_grounding with the boxes as numbers).
Each detection record is its own "scene" for matching. Prediction records carry ``gap_task``, ``objects`` /
``target`` and ``answers`` (the reference text), so scoring needs the predictions file alone.
"""
from __future__ import annotations

import json
import os

from .boxes3d import Box3D, detection_map, grounding_accuracy

KINDS = {"gap_detection": "detection", "gap_grounding": "grounding"}


def load_docs(data_dir: str, split: str) -> list[dict]:
    """The records of ``<data_dir>/gap_<split>.json`` (a JSON list); ValueError names what is wrong."""
    path = os.path.join(data_dir, f"gap_{split}.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GAP data not found: {path!r} (write it with `geoalign gap-data --task finetune "
                                f"--out {path}`)")
    with open(path) as f:
        docs = json.load(f)
    if not isinstance(docs, list):
        raise ValueError(f"{path!r} must hold a JSON list of records")
    for d in docs:
        task = (d.get("metadata") or {}).get("task") if isinstance(d, dict) else None
        if task not in KINDS:
            raise ValueError(f"{path!r}: record {d.get('id') if isinstance(d, dict) else d!r} is not a GAP "
                             f"detection / grounding record (metadata.task {task!r})")
    return docs


def prompt(doc: dict) -> str:
    """The record's question without the image placeholder."""
    text = doc["conversations"][0]["value"]
    return text.split("\n", 1)[1] if text.startswith("<image>") else text


def meta(doc: dict) -> dict:
    m = doc["metadata"]
    out = {"gap_task": KINDS[m["task"]], "scene": m.get("scene"), "answers": [doc["conversations"][1]["value"]]}
    if m["task"] == "gap_detection":
        out["objects"] = m["objects"]
    else:
        out["target"] = m["target"]
    return out


def _box(d: dict) -> Box3D:
    return Box3D(d["label"], tuple(d["center"]), tuple(d["size"]))


def score(records: list[dict]) -> dict:
    """{"detection": detection_map(...) or None, "grounding": grounding_accuracy(...) or None, "num_samples"}."""
    det = [r for r in records if r.get("gap_task") == "detection"]
    ground = [r for r in records if r.get("gap_task") == "grounding"]
    out: dict = {"num_samples": len(records), "detection": None, "grounding": None}
    if det:
        out["detection"] = detection_map({r["id"]: r["prediction"] for r in det},
                                         {r["id"]: [_box(o) for o in r["objects"]] for r in det})
    if ground:
        out["grounding"] = grounding_accuracy([r["prediction"] for r in ground], [_box(r["target"]) for r in ground])
    return out


def format_table(scores: dict) -> str:
    rows = [f"GAP object-level tasks ({scores['num_samples']} questions)"]
    d, g = scores.get("detection"), scores.get("grounding")
    if d:
        rows.append(f"  3D detection   mAP@0.25 {100 * d['mAP@0.25']:6.2f}   mAP@0.5 {100 * d['mAP@0.5']:6.2f}   "
                    f"({d['num_scenes']} clips, {d['malformed']} malformed lines)")
    if g:
        rows.append(f"  3D grounding   Acc@0.25 {100 * g['acc@0.25']:6.2f}   Acc@0.5 {100 * g['acc@0.5']:6.2f}   "
                    f"({g['n']} queries, {g['malformed']} without a box)")
    return "\n".join(rows)
