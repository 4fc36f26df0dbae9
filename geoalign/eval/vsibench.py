"""VSI-Bench: data loading, prompts and the official metrics.

Definitions follow the lmms-eval task shipped with VSI-Bench
(vision-x-nyu/thinking-in-space, ``lmms_eval/tasks/vsibench/utils.py``):

* multiple-choice (MCA) types are scored by exact match of the parsed letter;
  the answer is parsed like the official ``fuzzy_matching``: text up to the
  first *space* (``str.split(' ')``), trailing ``'.'`` stripped, then surrounding
  whitespace stripped; comparison is case-insensitive.
* numerical (NA) types are scored by Mean Relative Accuracy (MRA) over the
  thresholds ``numpy.linspace(0.5, 0.95, 10)``: an answer passes threshold
  ``t`` when ``abs(pred - gt) / gt <= 1 - t``, evaluated in float64 exactly in
  that form.  Floating point decides boundary cases the same way as the
  official code, e.g. 3 vs 2 -> 0.1 and 2.2 vs 2 -> 0.9 (0.1000...09 <=
  1 - 0.9000...02); do not "fix" this with a tolerance or the numbers stop
  matching published ones.  Unparsable answers score 0.
* per question-type means; relative direction = mean of its three sub-types;
  overall = mean of the task scores present (the 8 tasks on the full set).
* the stored answer is stripped of surrounding whitespace first (``strip=True``, the default, as
  this package always did); lmms-eval's task code does not strip (``strip=False``), which only
  matters for an answer that starts with whitespace: ``" A"`` parses as ``""`` there.

Subsets: ``"full"`` (every test question) or ``"debiased"`` (VSI-Bench-Debiased, the questions
left by Iterative Bias Pruning: ``test_debiased.parquet`` or ``test.jsonl`` minus
``pruned_ids.txt`` of the nyu-visionx/VSI-Bench dataset repo).
"""
from __future__ import annotations

import glob
import json
import math
import os
from typing import Any, Iterable, Sequence

import numpy as np

MCA_QUESTION_TYPES = (
    "object_rel_direction_easy",
    "object_rel_direction_medium",
    "object_rel_direction_hard",
    "object_rel_distance",
    "route_planning",
    "obj_appearance_order",
)
NA_QUESTION_TYPES = (
    "object_abs_distance",
    "object_counting",
    "object_size_estimation",
    "room_size_estimation",
)
REL_DIRECTION_TYPES = MCA_QUESTION_TYPES[:3]

# Columns of the paper's VSI-Bench table: (score key, header).
TABLE_COLUMNS = (
    ("overall", "Avg."),
    ("object_counting", "Obj. Count"),
    ("object_abs_distance", "Abs. Dist."),
    ("object_size_estimation", "Obj. Size"),
    ("room_size_estimation", "Room Size"),
    ("object_rel_distance", "Rel. Dist."),
    ("object_rel_direction", "Rel. Dir."),
    ("route_planning", "Route Plan"),
    ("obj_appearance_order", "Appr. Order"),
)
TASKS = tuple(k for k, _ in TABLE_COLUMNS[1:])

PRE_PROMPT = "These are frames of a video."
NA_POST_PROMPT = "Please answer the question using a single word or phrase."
MCA_POST_PROMPT = "Answer with the option's letter from the given choices directly."

# Thresholds exactly as the official code builds them:
# num = (end - start) / interval + 2 = 10.999999999999998 -> int -> 10 points.
MRA_THRESHOLDS = np.linspace(0.5, 0.95, int((0.95 - 0.5) / 0.05 + 2))


# --------------------------------------------------------------------------- metrics
def parse_answer(pred: str) -> str:
    """Official answer parsing: first ' '-separated token, trailing '.' removed, stripped."""
    return str(pred).split(" ")[0].rstrip(".").strip()


def to_float(x: Any) -> float | None:
    """``float(x)`` or None when it cannot be parsed."""
    try:
        return float(x)
    except (TypeError, ValueError, OverflowError):
        return None


def mca_accuracy(pred: str, ground_truth: str) -> float:
    """1.0 when the parsed letter equals the ground-truth letter (case-insensitive)."""
    return 1.0 if parse_answer(pred).lower() == str(ground_truth).lower() else 0.0


def mean_relative_accuracy(pred: float, gt: float) -> float:
    """MRA of one numeric prediction (float64, same expression as lmms-eval)."""
    rel = abs(pred - gt) / gt
    return float(np.mean(rel <= 1 - MRA_THRESHOLDS))


def mra_score(pred: str, ground_truth: Any) -> float:
    """MRA of a raw model answer; unparsable answer (or ground truth) -> 0."""
    p = to_float(parse_answer(pred))
    g = to_float(ground_truth)
    if p is None or g is None:
        return 0.0
    if g == 0:  # never in VSI-Bench; the official code would raise ZeroDivisionError here
        return float(p == 0)
    return mean_relative_accuracy(p, g)


def score_sample(question_type: str, prediction: str, ground_truth: Any) -> float:
    """Per-question score in [0, 1]."""
    if question_type in MCA_QUESTION_TYPES:
        return mca_accuracy(prediction, ground_truth)
    if question_type in NA_QUESTION_TYPES:
        return mra_score(prediction, ground_truth)
    raise ValueError(f"unknown VSI-Bench question_type: {question_type!r}")


def score(records: Iterable[dict], strip: bool = True) -> dict:
    """Aggregate prediction records into VSI-Bench scores (0-100).

    Each record needs ``question_type``, ``prediction`` and ``ground_truth``; ``strip``: strip each
    prediction before parsing it (False: lmms-eval's task code, which parses the raw answer).
    Returns ``{"overall", <task>: ..., "per_type": {...}, "counts": {...}, "num_samples", "stripped"}``.
    """
    per_type: dict[str, list[float]] = {}
    for r in records:
        qt = r["question_type"]
        pred = str(r.get("prediction", ""))
        per_type.setdefault(qt, []).append(score_sample(qt, pred.strip() if strip else pred, r["ground_truth"]))
    type_means = {qt: 100.0 * float(np.mean(v)) for qt, v in per_type.items()}
    out: dict[str, Any] = {}
    for qt in MCA_QUESTION_TYPES + NA_QUESTION_TYPES:
        if qt in type_means and qt not in REL_DIRECTION_TYPES:
            out[qt] = type_means[qt]
    present_dir = [qt for qt in REL_DIRECTION_TYPES if qt in type_means]
    if present_dir:
        # Official: (easy + medium + hard) / 3, a missing sub-type counting 0. Identical on
        # the full set; on a partial run (--limit) we average the present sub-types instead.
        out["object_rel_direction"] = float(np.mean([type_means[qt] for qt in present_dir]))
    tasks = [t for t in TASKS if t in out]
    result = {"overall": float(np.mean([out[t] for t in tasks])) if tasks else float("nan")}
    result.update({t: out[t] for t in TASKS if t in out})
    result["per_type"] = type_means
    result["counts"] = {qt: len(v) for qt, v in per_type.items()}
    result["num_samples"] = sum(len(v) for v in per_type.values())
    result["missing_tasks"] = [t for t in TASKS if t not in out]
    result["stripped"] = strip
    return result


def format_table(scores: dict) -> str:
    """The paper's VSI-Bench row layout (plus the per-type breakdown)."""
    headers = [h for _, h in TABLE_COLUMNS]
    cells = []
    for key, _ in TABLE_COLUMNS:
        v = scores.get(key)
        cells.append("-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}")
    widths = [max(len(h), len(c)) for h, c in zip(headers, cells)]
    name = "VSI-Bench-Debiased" if scores.get("subset") == "debiased" else "VSI-Bench"
    raw = ", answers not stripped (lmms-eval)" if scores.get("stripped") is False else ""
    lines = [
        f"{name} (MCA: accuracy, NA: MRA; x100{raw})",
        " | ".join(h.rjust(w) for h, w in zip(headers, widths)),
        "-+-".join("-" * w for w in widths),
        " | ".join(c.rjust(w) for c, w in zip(cells, widths)),
        "",
        "per question type:",
    ]
    counts = scores.get("counts", {})
    for qt in MCA_QUESTION_TYPES + NA_QUESTION_TYPES:
        if qt in scores.get("per_type", {}):
            lines.append(f"  {qt:<30} {scores['per_type'][qt]:6.2f}  (n={counts.get(qt, 0)})")
    if scores.get("missing_tasks"):
        lines.append(f"NOTE: tasks absent from the predictions: {', '.join(scores['missing_tasks'])}; "
                     "'Avg.' is over the present tasks only.")
    return "\n".join(lines)


# --------------------------------------------------------------------------- data
def build_prompt(doc: dict) -> str:
    """The benchmark's prompt for one question (lmms-eval default pre/post prompts)."""
    qt = doc["question_type"]
    if qt in NA_QUESTION_TYPES:
        return f"{PRE_PROMPT}\n{doc['question']}\n{NA_POST_PROMPT}"
    if qt in MCA_QUESTION_TYPES:
        options = "Options:\n" + "\n".join(str(o) for o in (doc.get("options") or []))
        return "\n".join([PRE_PROMPT, doc["question"], options, MCA_POST_PROMPT])
    raise ValueError(f"unknown VSI-Bench question_type: {qt!r}")


def _read_parquet(paths: Sequence[str]) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        pq = None
    rows: list[dict] = []
    for p in paths:
        if pq is not None:
            rows.extend(pq.read_table(p).to_pylist())
            continue
        try:
            import pandas as pd
        except ImportError as e:
            raise ImportError(
                f"reading {p} needs 'pyarrow' (or 'pandas' with a parquet engine); "
                "install one with `pip install pyarrow`, or provide test.jsonl instead") from e
        rows.extend(pd.read_parquet(p).to_dict("records"))
    return rows


def _normalise_doc(doc: dict) -> dict:
    opts = doc.get("options")
    if opts is not None and not isinstance(opts, list):
        opts = list(opts)  # numpy arrays from parquet
    d = dict(doc)
    d["options"] = opts
    return d


SUBSETS = ("full", "debiased")
#: the dataset repo's files that define VSI-Bench-Debiased (the first present is used)
DEBIASED_FILES = ("test_debiased.parquet", "pruned_ids.txt")
_SUBSET_FILES = ("test_debiased", "test_pruned")  # parquet subsets of the test set, not more of it


def find_annotation_files(data_dir: str) -> list[str]:
    """``test.jsonl`` (preferred) or the parquet shard(s) of the HF dataset repo (its subset files
    ``test_debiased.parquet`` / ``test_pruned.parquet`` excluded)."""
    for name in ("test.jsonl", "test_vsibench.jsonl"):
        p = os.path.join(data_dir, name)
        if os.path.isfile(p):
            return [p]
    parquet = sorted(p for p in glob.glob(os.path.join(data_dir, "*.parquet")) +
                     glob.glob(os.path.join(data_dir, "data", "*.parquet"))
                     if not os.path.basename(p).startswith(_SUBSET_FILES))
    test_only = [p for p in parquet if os.path.basename(p).startswith("test")]
    if test_only or parquet:
        return test_only or parquet
    raise FileNotFoundError(
        f"no VSI-Bench annotations in {data_dir!r}: expected test.jsonl or *.parquet "
        "(the files of the nyu-visionx/VSI-Bench dataset repo)")


def debiased_ids(data_dir: str, ids: Sequence[str]) -> set[str]:
    """The ids (as str) among ``ids`` (the full test set's) that make up VSI-Bench-Debiased: those of
    ``test_debiased.parquet``, else those not listed in ``pruned_ids.txt`` (one id per line). An id of those
    files that is not in ``ids`` (files of another dataset version) is a ValueError."""
    for name in DEBIASED_FILES:
        for folder in (data_dir, os.path.join(data_dir, "data")):
            p = os.path.join(folder, name)
            if not os.path.isfile(p):
                continue
            if name.endswith(".parquet"):
                listed = {str(d["id"]) for d in _read_parquet([p])}
            else:
                with open(p, encoding="utf-8") as f:
                    listed = {line.strip() for line in f if line.strip()}
            unknown = sorted(listed - set(ids))
            if unknown:
                raise ValueError(f"{p} lists {len(unknown)} question id(s) that the test set does not have (e.g. "
                                 f"{unknown[:3]}); it must come from the same version of the dataset repo")
            return listed if name.endswith(".parquet") else set(ids) - listed
    raise FileNotFoundError(
        f"--vsibench-subset debiased needs {' or '.join(DEBIASED_FILES)} in {data_dir!r} (or its data/ folder): "
        "the files of the nyu-visionx/VSI-Bench dataset repo that define VSI-Bench-Debiased")


def load_docs(data_dir: str, subset: str = "full") -> list[dict]:
    """The VSI-Bench questions of ``subset`` (one of :data:`SUBSETS`) from ``data_dir``, in file order."""
    if subset not in SUBSETS:
        raise ValueError(f"unknown VSI-Bench subset {subset!r}; expected one of {SUBSETS}")
    files = find_annotation_files(data_dir)
    docs: list[dict] = []
    if files[0].endswith(".jsonl"):
        with open(files[0], encoding="utf-8") as f:
            docs = [json.loads(line) for line in f if line.strip()]
    else:
        docs = _read_parquet(files)
    if subset == "debiased":
        keep = debiased_ids(data_dir, [str(d["id"]) for d in docs])
        docs = [d for d in docs if str(d["id"]) in keep]
    return [_normalise_doc(d) for d in docs]


def video_path(data_dir: str, doc: dict) -> str:
    """``{data_dir}/{dataset}/{scene_name}.mp4`` as in the benchmark."""
    return os.path.join(data_dir, str(doc["dataset"]), f"{doc['scene_name']}.mp4")
