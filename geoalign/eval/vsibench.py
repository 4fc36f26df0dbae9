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
* a ground truth of 0 (none in VSI-Bench): the official code divides by it, which stops the whole
  run with ZeroDivisionError (Python floats). Here the same expression is evaluated in numpy
  float64, where it gives ``inf`` (prediction != 0) or ``nan`` (prediction 0); neither is
  ``<= 1 - t`` for any threshold, so the question scores 0, an exact 0 included (no warning).
* per question-type means; relative direction = mean of its three sub-types;
  overall = mean of the task scores present (the 8 tasks on the full set).

Answer parsing (``parsing``, :data:`PARSINGS`), each named by the code it follows:

* ``"official"`` (the default): thinking-in-space's task code, identical in lmms-eval up to 0.7.2
  (``vsibench_process_results``): the raw answer, not stripped, through ``fuzzy_matching`` above
  for both kinds, then ``float()`` for NA; an answer that starts with whitespace parses as ``""``
  (``" A"`` is wrong), ``"3.5m"`` and ``"three"`` are unparsable (0).
* ``"lmms-eval-0.7.3"``: lmms-eval 0.7.3 (PR #1386): MCA as official; an NA answer is read by its
  ``extract_number`` (:func:`lmms_eval_073_number`): the first number in the text, digits
  (regex ``-?\\d+(?:\\.\\d+)?``) or English number words, whichever comes first, so ``"3.5m"`` is
  3.5, ``"three"`` 3, ``"twenty-one"`` 21, and ``"1e2"`` 1 (no exponents).
* ``"stripped"``: the official parsing of the answer stripped of surrounding whitespace first (this
  package's default before the parsing modes existed).

Subsets: ``"full"`` (every test question) or ``"debiased"`` (VSI-Bench-Debiased, the questions
left by Iterative Bias Pruning: ``test_debiased.parquet`` or ``test.jsonl`` minus
``pruned_ids.txt`` of the nyu-visionx/VSI-Bench dataset repo).
"""
from __future__ import annotations

import glob
import json
import math
import os
import re
from typing import Any, Iterable, Sequence

import numpy as np

from ..local_paths import resolve_inside

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


#: answer parsing modes (module docstring); the first is the default
PARSINGS = ("official", "lmms-eval-0.7.3", "stripped")
DEFAULT_PARSING = PARSINGS[0]


def check_parsing(parsing: str) -> None:
    """ValueError unless ``parsing`` is one of :data:`PARSINGS`."""
    if parsing not in PARSINGS:
        raise ValueError(f"unknown VSI-Bench parsing {parsing!r}; expected one of {PARSINGS}")


# --------------------------------------------------------------------------- metrics
def parse_answer(pred: str) -> str:
    """Official answer parsing: first ' '-separated token, trailing '.' removed, stripped."""
    return str(pred).split(" ")[0].rstrip(".").strip()


# lmms-eval 0.7.3's extract_number, reimplemented from its behaviour (EvolvingLMMs-Lab/lmms-eval PR #1386,
# commit eab6655a, lmms_eval/tasks/vsibench/utils.py): the number words it knows and its digit pattern.
_LMMS_073_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen".split())}
_LMMS_073_WORDS.update(twenty=20, thirty=30, forty=40, fifty=50, sixty=60, seventy=70, eighty=80, ninety=90,
                       hundred=100, thousand=1000)
_LMMS_073_DIGITS = re.compile(r"-?\d+(?:\.\d+)?")
_LMMS_073_WORD = re.compile(r"[a-z]+")


def lmms_eval_073_number(text) -> float | None:
    """The number lmms-eval 0.7.3 reads from an NA answer (its ``extract_number``), or None.

    The text is stripped and lower-cased. Candidates: the first digit match ``-?\\d+(?:\\.\\d+)?`` (no
    exponent: "1e2" reads 1; "3.5m" 3.5; ".5" 5) and the first run of number words (runs of ``[a-z]+``; the run
    starts at the first number word, goes on over further number words, skips "and", ends at any other word;
    anything that is not a letter between them is passed over, so "twenty-one" is one run). Whichever starts
    first wins. Words add up, "hundred" multiplies what precedes it (or 1) by 100, "thousand" moves it (or 1)
    x 1000 into the total: "three hundred and twenty-one" is 321.0, "a hundred" 100.0.
    """
    if text is None:
        return None
    s = str(text).strip().lower()
    if not s:
        return None
    digits = _LMMS_073_DIGITS.search(s)
    run: list[str] = []
    run_start = None
    for m in _LMMS_073_WORD.finditer(s):
        word = m.group(0)
        if word in _LMMS_073_WORDS:
            run_start = m.start() if run_start is None else run_start
            run.append(word)
        elif run_start is not None and word != "and":
            break
    if digits is not None and (run_start is None or digits.start() < run_start):
        return float(digits.group(0))
    if run_start is None:
        return None
    total = current = 0
    for word in run:
        value = _LMMS_073_WORDS[word]
        if value == 100:
            current = max(current, 1) * 100
        elif value == 1000:
            total += max(current, 1) * 1000
            current = 0
        else:
            current += value
    return float(total + current)


def _as_parsed(pred: Any, parsing: str) -> str:
    check_parsing(parsing)
    text = str(pred)
    return text.strip() if parsing == "stripped" else text


def parse_number(pred: Any, parsing: str = DEFAULT_PARSING) -> float | None:
    """The number an NA answer gives under ``parsing`` (module docstring), or None when it gives none."""
    if parsing == "lmms-eval-0.7.3":
        return lmms_eval_073_number(pred)
    return to_float(parse_answer(_as_parsed(pred, parsing)))


def to_float(x: Any) -> float | None:
    """``float(x)`` or None when it cannot be parsed."""
    try:
        return float(x)
    except (TypeError, ValueError, OverflowError):
        return None


def mca_accuracy(pred: str, ground_truth: str, parsing: str = DEFAULT_PARSING) -> float:
    """1.0 when the parsed letter equals the ground-truth letter (case-insensitive); every parsing reads the letter
    with the official ``fuzzy_matching`` (``"stripped"``: of the stripped answer)."""
    return 1.0 if parse_answer(_as_parsed(pred, parsing)).lower() == str(ground_truth).lower() else 0.0


def mean_relative_accuracy(pred: float, gt: float) -> float:
    """MRA of one numeric prediction (float64, same expression as lmms-eval). A ground truth of 0 gives inf or nan
    there, which passes no threshold: 0.0 (module docstring)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.abs(np.float64(pred) - np.float64(gt)) / np.float64(gt)
    return float(np.mean(rel <= 1 - MRA_THRESHOLDS))


def mra_score(pred: str, ground_truth: Any, parsing: str = DEFAULT_PARSING) -> float:
    """MRA of a raw model answer read by ``parsing``; unparsable answer (or ground truth) -> 0."""
    p = parse_number(pred, parsing)
    g = to_float(ground_truth)
    if p is None or g is None:
        return 0.0
    return mean_relative_accuracy(p, g)


def score_sample(question_type: str, prediction: str, ground_truth: Any, parsing: str = DEFAULT_PARSING) -> float:
    """Per-question score in [0, 1]; ``parsing``: one of :data:`PARSINGS`."""
    if question_type in MCA_QUESTION_TYPES:
        return mca_accuracy(prediction, ground_truth, parsing)
    if question_type in NA_QUESTION_TYPES:
        return mra_score(prediction, ground_truth, parsing)
    raise ValueError(f"unknown VSI-Bench question_type: {question_type!r}")


def score(records: Iterable[dict], parsing: str = DEFAULT_PARSING) -> dict:
    """Aggregate prediction records into VSI-Bench scores (0-100).

    Each record needs ``question_type``, ``prediction`` and ``ground_truth``; ``parsing``: how an answer is read,
    one of :data:`PARSINGS` (module docstring).
    Returns ``{"overall", <task>: ..., "per_type": {...}, "counts": {...}, "num_samples", "missing_tasks",
    "parsing"}``.
    """
    check_parsing(parsing)
    per_type: dict[str, list[float]] = {}
    for r in records:
        qt = r["question_type"]
        pred = str(r.get("prediction", ""))
        per_type.setdefault(qt, []).append(score_sample(qt, pred, r["ground_truth"], parsing))
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
    result["parsing"] = parsing
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
    how = {"stripped": ", answers stripped before the official parsing",
           "lmms-eval-0.7.3": ", NA numbers read as lmms-eval 0.7.3"}.get(scores.get("parsing"), "")
    lines = [
        f"{name} (MCA: accuracy, NA: MRA; x100{how})",
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
    """``{data_dir}/{dataset}/{scene_name}.mp4`` as in the benchmark (a ``..`` that climbs out of data_dir is a
    ValueError)."""
    return resolve_inside(data_dir, os.path.join(str(doc["dataset"]), f"{doc['scene_name']}.mp4"), "VSI-Bench video")
