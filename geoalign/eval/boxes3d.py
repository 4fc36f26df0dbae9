"""3D boxes as text for GAP-MLLM's object-level tasks: serialisation, a tolerant parser, 3D IoU, detection mAP and
grounding accuracy.

A box is axis-aligned: centre (x, y, z) and size (dx, dy, dz), in metres, in the first frame's camera coordinates
(the frame GAP-MLLM's pre-training and fine-tuning use). The text form is one object per line::

    chair: [1.23, -0.40, 2.10, 0.50, 0.50, 0.90]

Which published protocol each metric follows:

* :func:`iou3d` / :func:`iou3d_pairwise`: the axis-aligned 3D IoU of VoteNet's ``utils/metric_util.py``
  (``calc_iou``: boxes as centre + size, intersection of the extents over the union of the volumes), in float64.
  As there, each volume is the product of the box's *sizes* (not of its corner extents, whose rounding depends on
  where the box is). The overlap along an axis is the length of the two extents' intersection, written in the
  equal form ``min(size_a, size_b, (size_a + size_b) / 2 - |centre_a - centre_b|)`` (clipped at 0), which depends
  only on the sizes and the centre distance: identical boxes give exactly 1.0 and a box nested in another with the
  same centre exactly the volume ratio (as far as the product of the sizes is exact). VoteNet's own float expression
  (``min(max) - max(min)`` of the corners) rounds differently: the two can differ in the last bit, so on an IoU that
  is mathematically exactly a threshold either may fall on either side (no float64 formula decides every such
  decimal case exactly).
* Zero-size boxes: a box with a size of 0 in some axis (``chair: [1, 2, 3, 0, 1, 1]``) is a box, of volume 0: its
  IoU with any box is 0 (VoteNet's ``calc_iou`` returns 0.0 when the extents do not overlap with positive length),
  so as a detection it is a false positive. A negative or non-finite size is no box at all (a malformed line).
* :func:`detection_map`: ScanNet 3D detection mAP@0.25 / mAP@0.5 as VoteNet's ``utils/eval_det.py``
  (``eval_det_cls`` + ``voc_ap`` with ``use_07_metric=False``), also used by ScanRefer, 3DETR, Group-Free-3D.
  Per class, the predictions of all scenes in descending score; each is compared with every ground-truth box of its
  scene and class and takes the one of highest IoU (the first one on equal IoU); it is a true positive when that IoU
  is *strictly* above the threshold (``ovmax > ovthresh``) and that box is not matched yet, else a false positive
  (a duplicate of an already matched box is a false positive even when another, unmatched box would pass: VOC
  matching, no fall-back to the second best). AP = the all-point interpolated area under the precision/recall
  curve (:func:`average_precision`); mAP = mean AP over the classes with ground truth.
* :func:`grounding_accuracy`: ScanRefer's Acc@0.25 / Acc@0.5 (``lib/eval_helper.py``: ``ious >= 0.25``,
  *inclusive*): the share of queries whose predicted box has IoU >= the threshold with the query's one target box.
  The prediction is the *first* box line of the answer (ScanRefer and VG-LLM take the first box): prose lines before
  it are skipped as the parser skips them, and when that first box line is malformed or of zero size the query is a
  miss (counted in ``malformed``); a later line never stands in for it.

All scores are fractions in [0, 1] (papers print them x100).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

THRESHOLDS = (0.25, 0.5)


# ------------------------------------------------------------------------------------------------------------ boxes
def _box_problem(center: tuple[float, ...], size: tuple[float, ...]) -> str | None:
    """Why (centre, size) is not a usable box, or None. Shared by :class:`Box3D` (raises) and the parser (counts).

    A size of 0 is allowed (a zero-size box, IoU 0 with everything); a negative size, a NaN or an infinity is not:
    such numbers describe no box, so the line is malformed rather than a detection. Also refused: a positive size
    that vanishes at its centre in float64 (centre -+ size / 2 round to one number: the text holds no usable
    extent) and an infinite volume."""
    if len(center) != 3 or len(size) != 3:
        return f"expected 6 numbers (x, y, z, dx, dy, dz), got {len(center) + len(size)}"
    if not all(math.isfinite(v) for v in center + size):
        return "non-finite number"
    if any(s < 0 for s in size):
        return "size must be >= 0 in every axis"
    vanished = any(s > 0 and not c + s / 2 > c - s / 2 for c, s in zip(center, size))
    if vanished or not math.isfinite(math.prod(size)):
        return "size too small or too large for its centre in float64 (vanishing extent or infinite volume)"
    return None


def _triple(value, what: str) -> tuple[float, float, float]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"Box3D {what} must be 3 numbers (metres), got {type(value).__name__}")
    out = tuple(float(v) for v in value)
    if len(out) != 3:
        raise ValueError(f"Box3D {what} must be 3 numbers (metres), got {len(out)}")
    return out


@dataclass(frozen=True)
class Box3D:
    """An axis-aligned 3D box: ``center`` (x, y, z) and ``size`` (dx, dy, dz) in metres, ``score`` its confidence
    (1.0 for boxes read from text, which carry none). Raises on a non-finite value or a size < 0; a size of 0 is a
    zero-size box (volume 0, IoU 0 with every box)."""

    label: str
    center: tuple[float, float, float]
    size: tuple[float, float, float]
    score: float = 1.0

    def __post_init__(self):
        if not isinstance(self.label, str):
            raise TypeError(f"Box3D label must be a str, got {type(self.label).__name__}")
        center, size = _triple(self.center, "center"), _triple(self.size, "size")
        problem = _box_problem(center, size)
        if problem:
            raise ValueError(f"Box3D {self.label!r}: {problem} (center {center}, size {size})")
        score = float(self.score)
        if not math.isfinite(score):
            raise ValueError(f"Box3D {self.label!r}: score must be finite, got {score}")
        object.__setattr__(self, "center", center)
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "score", score)

    def as_array(self) -> np.ndarray:
        """[6] float64: x, y, z, dx, dy, dz (metres)."""
        return np.array(self.center + self.size)


# -------------------------------------------------------------------------------------------------- text <-> boxes
def _fmt(v: float) -> str:
    s = f"{v:.2f}"
    return "0.00" if s == "-0.00" else s


def format_boxes(objects: Iterable[Box3D]) -> str:
    """The training-target text of a scene's objects: one ``label: [x, y, z, dx, dy, dz]`` line per object, every
    number with exactly 2 decimals (metres, ``-0.00`` written ``0.00``), lines sorted by label, then by the rounded
    centre, then by the rounded size; no score. No objects gives ``""``.

    ``parse_boxes(format_boxes(objs)).boxes`` gives the objects back in that order with every number rounded to
    2 decimals, and formatting that again gives the same text. Raises ValueError for a label that would not read
    back (empty, ':' or '[' in it, surrounding spaces, ...) or a size that rounds to 0.00 (a zero-size target box
    could never be matched)."""
    rows = []
    for i, box in enumerate(objects):
        if not isinstance(box, Box3D):
            raise TypeError(f"objects[{i}] must be a Box3D, got {type(box).__name__}")
        if not box.label:
            raise ValueError(f"objects[{i}] has an empty label")
        cells = [_fmt(v) for v in box.center + box.size]
        if any(float(c) <= 0 for c in cells[3:]):
            raise ValueError(f"objects[{i}] ({box.label!r}): size {box.size} rounds to {cells[3:]} at 2 decimals; "
                             f"a target box needs a size > 0 (a zero-size box has IoU 0 with everything)")
        line = f"{box.label}: [{', '.join(cells)}]"
        back = _parse_line(line)
        if not isinstance(back, Box3D) or back.label != box.label:
            raise ValueError(f"objects[{i}]: label {box.label!r} would not read back from {line!r} "
                             f"(use a non-empty label without ':', '[', ']', line breaks or surrounding spaces)")
        rows.append((box.label, tuple(float(c) for c in cells), line))
    rows.sort()                                    # equal (label, numbers) means equal lines
    return "\n".join(line for _, _, line in rows)


@dataclass(frozen=True)
class ParseResult:
    """What :func:`parse_boxes` read: ``boxes`` in text order, ``rejected`` the (line, reason) of each line that
    looked like a box but was not a valid one; ``malformed`` is their number."""

    boxes: list[Box3D] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)

    @property
    def malformed(self) -> int:
        return len(self.rejected)


_BULLET = re.compile(r"(?:[-*\u2022+]|\d{1,3}[.)])\s+")
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf|infinity)", re.IGNORECASE)
_SEPARATORS = re.compile(r"[,\s]+")
_BRACKETS = str.maketrans("", "", "[]()")


def _clean_label(text: str) -> str:
    if ":" in text:
        text = text.rsplit(":", 1)[1]
    return " ".join(text.strip().strip("*`\"'").split())


def _parse_line(line: str) -> Box3D | str | None:
    """A Box3D, the reason the line is a malformed box, or None for prose."""
    s = line.strip()
    bullet = _BULLET.match(s)
    if bullet:
        s = s[bullet.end():]
    if "[" in s:                                   # "label: [..]", "label [..]", "[..]"
        label, payload = s.split("[", 1)
        label, payload = label.rstrip().removesuffix(":"), "[" + payload
    elif ":" in s:                                 # "label: x, y, z, dx, dy, dz"
        label, payload = s.split(":", 1)
    else:                                          # "x, y, z, dx, dy, dz"
        label, payload = "", s
    payload = payload.strip().rstrip(".,; \t")
    tokens = [t for t in _SEPARATORS.split(payload.translate(_BRACKETS)) if t]
    values = [float(t) if _NUMBER.fullmatch(t) else None for t in tokens]
    numeric = sum(v is not None for v in values)
    looks_like_box = (payload.startswith("[") or (len(tokens) >= 3 and numeric == len(tokens))
                      or (label.strip() and "," in payload and numeric > 0))
    if not looks_like_box:
        return None
    bad = [t for t, v in zip(tokens, values) if v is None]
    if bad:
        return f"unparsable number {bad[0]!r}"
    center, size = tuple(values[:3]), tuple(values[3:])
    problem = _box_problem(center, size)
    if problem:
        return problem
    return Box3D(_clean_label(label), center, size)


def parse_boxes(text: str | None) -> ParseResult:
    """Read boxes from model output; never raises on any string (``None`` reads as no output).

    One box per line. Accepted: ``label: [x, y, z, dx, dy, dz]`` with any spacing, round or no brackets, commas
    and/or spaces between the numbers, a trailing '.', ',' or ';', a list bullet ('- ', '* ', '1. '), a label
    before the '[' without a colon, or no label at all (``[x, y, z, dx, dy, dz]``, or 3+ bare numbers on a line;
    label ``""``). The label is the text before the box (after its last ':'), trimmed of spaces, '*', quotes and
    backticks. Lines of prose are skipped without being counted. A line that looks like a box (it has '[', or is
    3+ numbers, or is ``label: ...`` with a comma and a number after the colon) but does not have exactly 6 plain
    numbers, all finite, with sizes >= 0, is counted in ``malformed`` with its reason in ``rejected``. A size of 0
    gives a zero-size box (in ``boxes``: a detection that can never match, as VoteNet counts every output box); a
    negative or NaN size is malformed (it describes no box).
    """
    if text is None:
        return ParseResult()
    if not isinstance(text, str):
        raise TypeError(f"parse_boxes expects model output as a str, got {type(text).__name__}")
    result = ParseResult()
    for line in text.splitlines():
        got = _parse_line(line)
        if isinstance(got, Box3D):
            result.boxes.append(got)
        elif got is not None:
            result.rejected.append((line, got))
    return result


# ------------------------------------------------------------------------------------------------------------- IoU
def _as_box_array(x, name: str) -> np.ndarray:
    if isinstance(x, Box3D):
        return x.as_array()[None]
    if isinstance(x, (list, tuple)) and x and all(isinstance(b, Box3D) for b in x):
        return np.stack([b.as_array() for b in x])
    if hasattr(x, "detach"):                       # a torch tensor
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 6:
        raise ValueError(f"{name} must have shape [N, 6] (x, y, z, dx, dy, dz in metres), got {arr.shape}")
    for i, row in enumerate(arr):
        problem = _box_problem(tuple(row[:3]), tuple(row[3:]))
        if problem:
            raise ValueError(f"{name}[{i}] = {row.tolist()}: {problem}")
    return arr


def iou3d_pairwise(a, b) -> np.ndarray:
    """IoU of every box of ``a`` with every box of ``b``: ``a`` [N, 6] and ``b`` [M, 6] as (x, y, z, dx, dy, dz) in
    metres (numpy array, CPU torch tensor, nested lists, or a list of Box3D); returns [N, M] float64 in [0, 1].
    Exact up to float64 rounding (no sampling or approximation): volumes are the products of the sizes, the overlap
    per axis ``min(size_a, size_b, (size_a + size_b) / 2 - |centre_a - centre_b|)`` clipped at 0 (module doc). A
    zero-size box has IoU 0 with every box (two of them too, where 0 / 0 would be NaN)."""
    a, b = _as_box_array(a, "a"), _as_box_array(b, "b")
    size_a, size_b = a[:, None, 3:], b[None, :, 3:]
    overlap = np.minimum(np.minimum(size_a, size_b),
                         (size_a + size_b) / 2 - np.abs(a[:, None, :3] - b[None, :, :3]))
    inter = np.clip(overlap, 0.0, None).prod(-1)
    union = a[:, None, 3:].prod(-1) + b[None, :, 3:].prod(-1) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def _one_box(x, name: str):
    if isinstance(x, Box3D):
        return x
    if hasattr(x, "detach"):                       # a torch tensor
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.shape != (6,):
        raise ValueError(f"{name} must be a Box3D or 6 numbers (x, y, z, dx, dy, dz in metres), got shape {arr.shape}")
    return arr[None]


def iou3d(a, b) -> float:
    """IoU of two axis-aligned boxes, each a Box3D or 6 numbers (x, y, z, dx, dy, dz in metres); in [0, 1]."""
    return float(iou3d_pairwise(_one_box(a, "a"), _one_box(b, "b"))[0, 0])


# ------------------------------------------------------------------------------------------------------- detection
def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC all-point AP (VoteNet ``voc_ap``, ``use_07_metric=False``) of a precision/recall curve, both [D] in
    detection order: recall gets sentinels 0 and 1, precision 0 and 0; precision is made non-increasing from the
    right; AP = sum over the points i where recall changes of (r[i+1] - r[i]) * p[i+1]."""
    if np.ndim(recall) != 1 or np.shape(recall) != np.shape(precision):
        raise ValueError(f"recall and precision must be 1-D of one length, got shapes {np.shape(recall)} and "
                         f"{np.shape(precision)}")
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _class_key(label: str) -> str:
    return " ".join(label.lower().split())


def _check_thresholds(thresholds) -> tuple[float, ...]:
    out = tuple(float(t) for t in thresholds)
    if not out or not all(0.0 <= t <= 1.0 for t in out):
        raise ValueError(f"thresholds must be IoUs in [0, 1], got {thresholds!r}")
    return out


def _scene_boxes(value, scene, what: str) -> list[Box3D]:
    if isinstance(value, (list, tuple)) and all(isinstance(b, Box3D) for b in value):
        return list(value)
    raise TypeError(f"{what}[{scene!r}] must be a list of Box3D{' or model text' if what == 'predictions' else ''}, "
                    f"got {type(value).__name__}")


def detection_map(predictions: Mapping[str, Sequence[Box3D] | str | None],
                  ground_truth: Mapping[str, Sequence[Box3D]],
                  thresholds: Sequence[float] = THRESHOLDS) -> dict:
    """ScanNet-style 3D detection AP per class and mAP per IoU threshold (VoteNet protocol, see the module doc).

    predictions: scene id -> Box3D list, or the model's text for the scene (read with :func:`parse_boxes`; its
        malformed lines are counted in ``"malformed"``), or None (no output). Every scene must be in
        ``ground_truth``; a ground-truth scene without predictions has no detections. A zero-size box is a
        detection like any other (VoteNet counts every output box) with IoU 0: always a false positive.
    ground_truth: scene id -> Box3D list (an empty list for a scene without objects).
    Labels compare case-insensitively with spaces collapsed ("Office Chair" is class "office chair").

    Ties: boxes read from text all have score 1.0, so the ranking is the order of the predictions: scenes in the
    iteration order of ``predictions``, then each scene's boxes in the model's output order (a stable sort by
    descending score; VoteNet's ``np.argsort`` leaves the order of equal scores unspecified).

    Returns ``{"mAP@0.25": float, "mAP@0.5": float, "AP@0.25": {class: AP}, "AP@0.5": {...}, "num_gt": {class: n},
    "num_pred": {class: n}, "num_scenes": n, "malformed": n, "ignored_predictions": n}`` (keys per threshold as
    ``f"{t:g}"``): AP over the classes with ground truth, in [0, 1]; a class never predicted has AP 0;
    predictions of a class without ground truth count in ``"ignored_predictions"`` only.
    """
    thresholds = _check_thresholds(thresholds)
    if not isinstance(predictions, Mapping) or not isinstance(ground_truth, Mapping):
        raise TypeError(f"predictions and ground_truth must be mappings scene id -> boxes, got "
                        f"{type(predictions).__name__} and {type(ground_truth).__name__}")
    unknown = [s for s in predictions if s not in ground_truth]
    if unknown:
        raise ValueError(f"{len(unknown)} predicted scene(s) not in ground_truth: {unknown[:5]!r}")
    gt: dict[str, dict[str, list[Box3D]]] = {}     # class -> scene -> boxes
    for scene, boxes in ground_truth.items():
        for box in _scene_boxes(boxes, scene, "ground_truth"):
            gt.setdefault(_class_key(box.label), {}).setdefault(scene, []).append(box)
    if not gt:
        raise ValueError("ground_truth has no boxes: mAP is undefined")
    dets: dict[str, list[tuple[str, Box3D]]] = {c: [] for c in gt}
    malformed = ignored = 0
    for scene, value in predictions.items():
        if value is None or isinstance(value, str):
            parsed = parse_boxes(value)
            malformed += parsed.malformed
            boxes = parsed.boxes
        else:
            boxes = _scene_boxes(value, scene, "predictions")
        for box in boxes:
            key = _class_key(box.label)
            if key in dets:
                dets[key].append((scene, box))
            else:
                ignored += 1
    out: dict = {}
    ap = {t: {} for t in thresholds}
    for cls in sorted(gt):
        for t, value in zip(thresholds, _class_ap(dets[cls], gt[cls], thresholds)):
            ap[t][cls] = value
    for t in thresholds:
        out[f"mAP@{t:g}"] = float(np.mean(list(ap[t].values())))
    for t in thresholds:
        out[f"AP@{t:g}"] = ap[t]
    out["num_gt"] = {c: sum(len(b) for b in gt[c].values()) for c in sorted(gt)}
    out["num_pred"] = {c: len(dets[c]) for c in sorted(gt)}
    out.update(num_scenes=len(ground_truth), malformed=malformed, ignored_predictions=ignored)
    return out


def _class_ap(dets: list[tuple[str, Box3D]], gt: dict[str, list[Box3D]], thresholds) -> list[float]:
    """AP of one class at each threshold (VoteNet ``eval_det_cls``)."""
    npos = sum(len(b) for b in gt.values())
    order = sorted(range(len(dets)), key=lambda i: -dets[i][1].score)      # stable: ties keep prediction order
    best = []                                                               # (scene, best GT index, its IoU)
    gt_arrays = {scene: np.stack([b.as_array() for b in boxes]) for scene, boxes in gt.items()}
    for i in order:
        scene, box = dets[i]
        iou, j = -math.inf, None                                            # no box of the class in the scene
        if scene in gt_arrays:
            ious = iou3d_pairwise(box.as_array()[None], gt_arrays[scene])[0]
            j = int(np.argmax(ious))                                        # the first of equal IoUs
            iou = float(ious[j])
        best.append((scene, j, iou))
    aps = []
    for t in thresholds:
        matched = {scene: [False] * len(boxes) for scene, boxes in gt.items()}
        tp = np.zeros(len(best))
        for d, (scene, j, iou) in enumerate(best):
            if iou > t and not matched[scene][j]:
                tp[d] = 1.0
                matched[scene][j] = True
        tp_cum = np.cumsum(tp)
        fp_cum = np.cumsum(1.0 - tp)
        recall = tp_cum / npos
        precision = tp_cum / (tp_cum + fp_cum)                              # tp + fp = rank >= 1
        aps.append(average_precision(recall, precision))
    return aps


# ------------------------------------------------------------------------------------------------------- grounding
def _first_box(pred, i: int) -> Box3D | None:
    """The query's predicted box, or None (a miss): the first line of the text that looks like a box decides (prose
    before it is skipped, as :func:`parse_boxes` skips it); a malformed or zero-size first box is None, whatever
    follows it."""
    if pred is None:
        return None
    if isinstance(pred, str):
        read = (_parse_line(line) for line in pred.splitlines())
        pred = next((got for got in read if got is not None), None)   # a Box3D, why it is malformed, or no box line
        if not isinstance(pred, Box3D):
            return None
    if isinstance(pred, Box3D):
        return pred if min(pred.size) > 0 else None
    raise TypeError(f"predictions[{i}] must be model text, a Box3D or None, got {type(pred).__name__}")


def grounding_accuracy(predictions: Sequence[str | Box3D | None], targets: Sequence[Box3D],
                       thresholds: Sequence[float] = THRESHOLDS) -> dict:
    """ScanRefer Acc@0.25 / Acc@0.5: the share of queries whose predicted box has IoU >= threshold (inclusive) with
    the query's target box.

    predictions[i]: the model's text for query i, a Box3D, or None (no output). In text, the first line that looks
        like a box (as :func:`parse_boxes` reads lines; prose lines before it are skipped) is the prediction and
        labels are ignored; only that line counts (ScanRefer / VG-LLM's first box): when it is malformed, or the box
        has a size of 0, the query is a miss even if a later line holds a valid box.
    targets[i]: the one ground-truth Box3D of query i.
    Returns ``{"acc@0.25": float, "acc@0.5": float, "n": queries, "malformed": queries without a usable box}``
    (accuracies in [0, 1]; keys per threshold as ``f"acc@{t:g}"``); ``malformed`` counts the misses for want of a
    box: no output, no box line, a malformed first box line, or a zero-size first box.
    """
    thresholds = _check_thresholds(thresholds)
    if isinstance(predictions, str):
        raise TypeError("predictions must be a list (one entry per query), got a single str")
    predictions, targets = list(predictions), list(targets)
    if len(predictions) != len(targets):
        raise ValueError(f"predictions and targets must have the same length, got {len(predictions)} predictions "
                         f"and {len(targets)} targets")
    if not targets:
        raise ValueError("no grounding queries to score")
    ious = []
    for i, (pred, target) in enumerate(zip(predictions, targets)):
        if not isinstance(target, Box3D):
            raise TypeError(f"targets[{i}] must be a Box3D, got {type(target).__name__}")
        box = _first_box(pred, i)
        ious.append(None if box is None else iou3d(box, target))
    out = {f"acc@{t:g}": sum(1 for v in ious if v is not None and v >= t) / len(ious) for t in thresholds}
    out.update(n=len(ious), malformed=sum(v is None for v in ious))
    return out
