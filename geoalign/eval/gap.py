"""GAP-MLLM's object-level tasks as a benchmark: 3D video object detection, 3D visual grounding (ScanRefer) and 3D
dense captioning (Scan2Cap), scored from the model's text answers.

Data: ``<data>/gap_<split>.json`` (default split ``test``), records written by ``geoalign gap-data --task finetune``
(each record's frames in a folder; ``metadata.task`` gap_detection / gap_grounding / gap_dense_caption). Prediction
records carry ``gap_task`` and what their metric needs, so scoring needs the predictions file alone:
detection ``objects``; grounding ``target`` (and ``query`` / ``unique`` when the record has them); dense captioning
``box``, ``prompt_box``, ``references``, ``object_id``, ``frame_ids``; all of them ``scene`` and ``answers`` (the
record's answer).

* Detection: ScanNet mAP@0.25 / @0.5 as VoteNet (:func:`geoalign.eval.boxes3d.detection_map`); each detection record
  is its own "scene" for matching.
* Grounding: ScanRefer Acc@0.25 / @0.5 (:func:`geoalign.eval.boxes3d.grounding_accuracy`, IoU >= k) over all queries
  ("overall"), and split as ScanRefer reports it into "unique" (``metadata.unique`` true: the target is the only
  object of its class in the scene) and "multiple" (false). Records without ``metadata.unique`` (the marker queries,
  ``metadata.query`` "marker") count in "overall" only.
* Dense captioning: Scan2Cap's m@kIoU for m in CIDEr, BLEU-4, METEOR, ROUGE-L and k in 0.25, 0.5. One record is one
  ground-truth object: ``box`` its box, ``prompt_box`` the proposal the prompt gives the model (null: no proposal),
  ``references`` all its reference descriptions, the prediction its caption. ``scan2cap_style`` (:data:`CAPTION_STYLES`)
  follows, by name, the code below:

  - ``"scan2cap"`` (default): Scan2Cap's ``lib/eval_helper.py`` (daveredrum/Scan2Cap): ``feed_scene_cap`` keeps an
    object's caption only when its proposal has IoU *strictly* above k with the object's box (``ious > min_iou``);
    ``check_candidates`` gives every other object of the corpus (no proposal, or one that fails) the caption
    ``"sos eos"``; ``prepare_corpus`` / ``decode_caption`` wrap references and captions in ``sos ... eos``; the
    metrics are then computed once over the corpus of *all* ground-truth objects (``Bleu(4)`` / ``Cider`` / ``Rouge`` /
    ``Meteor`` ``compute_score(corpus, candidates)``). So a failed object is not a per-object 0 multiplied in: its
    "sos eos" caption scores CIDEr 0 (sos / eos occur in every object's references, so their IDF is 0, and the bigram
    "sos eos" occurs in none) but takes part in the corpus BLEU counts and scores a small ROUGE-L / METEOR; and CIDEr's
    document frequencies come from every object's references, whatever the gating. Text: pycocoevalcap's PTB
    tokenizer (Java; without it :func:`geoalign.eval.caption.simple_tokenize`, labelled) on the caption and on each
    reference, then ``sos``/``eos`` added (Scan2Cap reads ScanRefer's own ``token`` lists, which we do not have).
  - ``"leo"``: the LEO / Video-3D LLM recipe, as in the lmms-eval ``scan2cap`` task that states it follows LEO's
    ``evaluator/cap_eval.py`` (``scan2cap_process_results`` / ``scan2cap_aggregate_results``): the caption is kept when
    IoU >= k (*inclusive*), else replaced by ""; caption and references are lower-cased, "." and "," split off,
    wrapped in ``sos ... eos`` (no PTB tokenizer, other punctuation kept); corpus-level metrics over all objects as
    above. Video-3D LLM's ``llava/eval/eval_scan2cap.py`` (zd11024/Video-3D-LLM) writes the text the same way.

  Scores are in 0-100, as pycocoevalcap's caption metrics in :mod:`geoalign.eval.caption`; METEOR needs Java and is
  omitted without it (``meteor_missing_reason``). Each ground-truth object of a clip must appear once (key: scene,
  the clip's frame ids, object_id): a clip's first frame is its own frame of reference, so an object that two clips
  show is two objects here.
"""
from __future__ import annotations

import json
import os

from .boxes3d import THRESHOLDS, Box3D, detection_map, grounding_accuracy, iou3d
from .caption import PYCOCOEVALCAP_MISSING, caption_scores, java_available, pycocoevalcap_available, tokenize

KINDS = {"gap_detection": "detection", "gap_grounding": "grounding", "gap_dense_caption": "dense_caption"}
#: dense-captioning scoring recipes (module docstring): Scan2Cap's official code, or LEO / Video-3D LLM's
CAPTION_STYLES = ("scan2cap", "leo")
DEFAULT_CAPTION_STYLE = CAPTION_STYLES[0]
#: the caption metrics reported per IoU threshold (keys of :func:`geoalign.eval.caption.caption_scores`)
CAPTION_METRICS = ("CIDEr", "BLEU-4", "METEOR", "ROUGE-L")


def check_caption_style(style: str) -> None:
    """ValueError unless ``style`` is one of :data:`CAPTION_STYLES`."""
    if style not in CAPTION_STYLES:
        raise ValueError(f"unknown Scan2Cap style {style!r}; expected one of {CAPTION_STYLES}")


def _six(value, what: str, rid) -> list[float]:
    """``value`` as a box [cx, cy, cz, dx, dy, dz]; ValueError naming record ``rid`` otherwise."""
    ok = isinstance(value, (list, tuple)) and len(value) == 6
    try:
        out = [float(v) for v in value] if ok else None
        if out is not None:
            iou3d(out, out)                         # finite, sizes >= 0 (boxes3d's checks)
    except (TypeError, ValueError) as e:
        raise ValueError(f"dense-caption record {rid!r}: {what} must be a box [cx, cy, cz, dx, dy, dz], got "
                         f"{value!r} ({e})") from None
    if out is None:
        raise ValueError(f"dense-caption record {rid!r}: {what} must be a box [cx, cy, cz, dx, dy, dz], got "
                         f"{value!r}")
    return out


def _check_dense_caption(rid, box, prompt_box, references) -> None:
    """ValueError naming record ``rid`` unless it holds what dense-caption scoring needs."""
    if not isinstance(references, list) or not references or \
            not all(isinstance(r, str) and r.strip() for r in references):
        raise ValueError(f"dense-caption record {rid!r} needs references: a non-empty list of non-empty reference "
                         f"descriptions, got {references!r}")
    _six(box, "box", rid)
    if prompt_box is not None:
        _six(prompt_box, "prompt_box", rid)


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
                             f"detection / grounding / dense-caption record (metadata.task {task!r})")
        if task == "gap_dense_caption":
            m = d["metadata"]
            try:
                _check_dense_caption(d.get("id"), m.get("box"), m.get("prompt_box"), m.get("references"))
            except ValueError as e:
                raise ValueError(f"{path!r}: {e}") from None
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
    elif m["task"] == "gap_grounding":
        out["target"] = m["target"]
        for key in ("query", "unique"):            # language queries (ScanRefer); marker records lack them
            if key in m:
                out[key] = m[key]
    else:
        out.update(box=m["box"], prompt_box=m.get("prompt_box"), references=m["references"],
                   object_id=m.get("object_id"), frame_ids=m.get("frame_ids"))
    return out


def _box(d: dict) -> Box3D:
    return Box3D(d["label"], tuple(d["center"]), tuple(d["size"]))


def _grounding(records: list[dict]) -> dict:
    out = grounding_accuracy([r["prediction"] for r in records], [_box(r["target"]) for r in records])
    for name, flag in (("unique", True), ("multiple", False)):
        part = [r for r in records if r.get("unique") is flag]
        out[name] = grounding_accuracy([r["prediction"] for r in part], [_box(r["target"]) for r in part]) \
            if part else None
    return out


def _leo_text(text: str) -> str:
    return "sos " + text.replace(".", " . ").replace(",", " , ").lower() + " eos"


def dense_caption_scores(records: list[dict], style: str = DEFAULT_CAPTION_STYLE, use_java: bool | None = None,
                         thresholds=THRESHOLDS) -> dict:
    """Scan2Cap m@kIoU of dense-caption prediction records (module docstring; ``style`` one of
    :data:`CAPTION_STYLES`). Returns ``{"n": objects, "no_proposal": objects without a prompt box, "style",
    "tokenizer", f"@{k:g}": {"CIDEr", "BLEU-4", "METEOR", "ROUGE-L" (0-100; METEOR absent without Java),
    "matched": objects whose proposal passes the IoU gate}, "meteor_missing_reason"?}``."""
    check_caption_style(style)
    if not pycocoevalcap_available():
        raise ImportError(PYCOCOEVALCAP_MISSING)
    if use_java is None:
        use_java = java_available()
    keys, seen = [], {}
    for r in records:
        rid = r.get("id")
        _check_dense_caption(rid, r.get("box"), r.get("prompt_box"), r.get("references"))
        # one ground-truth object per clip: a clip's first frame is its own frame of reference (as each detection
        # record is its own scene), so an object seen by two clips is two objects here
        clip = tuple(r["frame_ids"]) if r.get("frame_ids") is not None else None
        key = (r.get("scene"), clip, r["object_id"]) if r.get("object_id") is not None else ("record", rid)
        if key in seen:
            raise ValueError(f"dense-caption records {seen[key]!r} and {rid!r} are the same object of one clip "
                             f"(scene {key[0]!r}, frames {key[1]!r}, object_id {key[2]!r}): Scan2Cap scores each "
                             "ground-truth object once")
        seen[key] = rid
        keys.append(str(len(keys)))
    ious = [None if r.get("prompt_box") is None else iou3d(r["prompt_box"], r["box"]) for r in records]
    preds = [r.get("prediction") or "" for r in records]
    if style == "scan2cap":
        refs = tokenize({k: [t.replace("\n", " ").strip() for t in r["references"]] for k, r in zip(keys, records)},
                        use_java)
        refs = {k: [f"sos {t} eos" for t in v] for k, v in refs.items()}
        said = tokenize({k: [p.replace("\n", " ").strip()] for k, p in zip(keys, preds)}, use_java)
        said = {k: f"sos {v[0]} eos" for k, v in said.items()}
        placeholder, passes = "sos eos", (lambda iou, k: iou is not None and iou > k)
        tokenizer = "ptb (java)" if use_java else "simple (python; Java not found)"
    else:
        refs = {k: [_leo_text(t) for t in r["references"]] for k, r in zip(keys, records)}
        said = {k: _leo_text(p) for k, p in zip(keys, preds)}
        placeholder, passes = _leo_text(""), (lambda iou, k: iou is not None and iou >= k)
        tokenizer = "leo (lower-cased, '.' and ',' split off; no PTB)"
    out: dict = {"n": len(records), "no_proposal": sum(v is None for v in ious), "style": style,
                 "tokenizer": tokenizer}
    for t in thresholds:
        gate = [passes(iou, t) for iou in ious]
        got = caption_scores(refs, {k: said[k] if g else placeholder for k, g in zip(keys, gate)},
                             use_java=use_java, tokenized=True)
        out[f"@{t:g}"] = {m: got[m] for m in CAPTION_METRICS if m in got}
        out[f"@{t:g}"]["matched"] = sum(gate)
        if "meteor_missing_reason" in got:
            out["meteor_missing_reason"] = got["meteor_missing_reason"]
    return out


def score(records: list[dict], use_java: bool | None = None, scan2cap_style: str = DEFAULT_CAPTION_STYLE) -> dict:
    """{"detection": detection_map(...) or None, "grounding": grounding_accuracy(...) with "unique" / "multiple"
    (each grounding_accuracy(...) or None) or None, "dense_caption": dense_caption_scores(...) or None,
    "num_samples"}."""
    check_caption_style(scan2cap_style)
    det = [r for r in records if r.get("gap_task") == "detection"]
    ground = [r for r in records if r.get("gap_task") == "grounding"]
    cap = [r for r in records if r.get("gap_task") == "dense_caption"]
    out: dict = {"num_samples": len(records), "detection": None, "grounding": None, "dense_caption": None}
    if det:
        out["detection"] = detection_map({r["id"]: r["prediction"] for r in det},
                                         {r["id"]: [_box(o) for o in r["objects"]] for r in det})
    if ground:
        out["grounding"] = _grounding(ground)
    if cap:
        out["dense_caption"] = dense_caption_scores(cap, style=scan2cap_style, use_java=use_java)
    return out


def _pct(value) -> str:
    return "   n/a" if value is None else f"{value:6.2f}"


def format_table(scores: dict) -> str:
    rows = [f"GAP object-level tasks ({scores['num_samples']} questions)"]
    d, g, c = scores.get("detection"), scores.get("grounding"), scores.get("dense_caption")
    if d:
        rows.append(f"  3D detection   mAP@0.25 {100 * d['mAP@0.25']:6.2f}   mAP@0.5 {100 * d['mAP@0.5']:6.2f}   "
                    f"({d['num_scenes']} clips, {d['malformed']} malformed lines)")
    if g:
        rows.append(f"  3D grounding   Acc@0.25 {100 * g['acc@0.25']:6.2f}   Acc@0.5 {100 * g['acc@0.5']:6.2f}   "
                    f"({g['n']} queries, {g['malformed']} without a box)")
        for name in ("unique", "multiple"):
            part = g.get(name)
            if part:
                rows.append(f"    {name:<10}   Acc@0.25 {100 * part['acc@0.25']:6.2f}   "
                            f"Acc@0.5 {100 * part['acc@0.5']:6.2f}   ({part['n']} queries)")
    if c:
        rows.append(f"  3D dense captioning ({c['n']} objects, {c['no_proposal']} without a proposal; "
                    f"{c['style']} scoring, {c['tokenizer']} tokenizer)")
        for key in sorted((k for k in c if k.startswith("@")), key=lambda k: float(k[1:])):
            m = c[key]
            metrics = "   ".join(f"{name} {_pct(m.get(name))}" for name in CAPTION_METRICS)
            rows.append(f"    {key + 'IoU':<9}  {metrics}   ({m['matched']} proposals pass)")
        if "meteor_missing_reason" in c:
            rows.append(f"    ({c['meteor_missing_reason']})")
    return "\n".join(rows)
