"""SQA3D: data loading and EM-1.

Data (the official release, ``balanced/`` folder):
``v1_balanced_questions_{split}_scannetv2.json`` (``{"questions": [{question_id,
scene_id, situation, question, ...}]}``) and
``v1_balanced_sqa_annotations_{split}_scannetv2.json`` (``{"annotations":
[{question_id, scene_id, answers: [{answer, ...}]}]}``); papers report the test split.

EM-1: ``clean_answer(prediction)`` equals ``clean_answer`` of the answer; the refined
variant (substring match without spaces, see ``textnorm.answer_match``) is reported
separately, labelled "EM-1-refined".  Breakdown by the question's first word
(What / Is / How / Can / Which / Others) as in the SQA3D paper.
"""
from __future__ import annotations

import json
import os
from typing import Iterable

import numpy as np

from .textnorm import answer_match, clean_answer, strip_special

PROMPT_SUFFIX = "Answer the question using a single word or phrase."
QUESTION_TYPES = ("what", "is", "how", "can", "which", "others")


def question_type(question: str) -> str:
    """SQA3D breakdown category from the question's first word."""
    q = question.lstrip().lower()
    for t in ("what", "is", "how", "can", "which"):
        if q.startswith(t):
            return t
    return "others"


def _find(data_dir: str, name: str) -> str:
    for cand in (os.path.join(data_dir, name), os.path.join(data_dir, "balanced", name),
                 os.path.join(data_dir, "sqa_task", "balanced", name)):
        if os.path.isfile(cand):
            return cand
    raise FileNotFoundError(f"{name} not found in {data_dir!r} (or its balanced/ folder)")


def load_docs(data_dir: str, split: str = "test") -> list[dict]:
    """Questions joined with their answers, in the questions file's order."""
    with open(_find(data_dir, f"v1_balanced_questions_{split}_scannetv2.json"), encoding="utf-8") as f:
        questions = json.load(f)["questions"]
    with open(_find(data_dir, f"v1_balanced_sqa_annotations_{split}_scannetv2.json"), encoding="utf-8") as f:
        answers = {a["question_id"]: a for a in json.load(f)["annotations"]}
    docs = []
    for q in questions:
        a = answers.get(q["question_id"])
        if a is None:
            raise ValueError(f"question {q['question_id']} has no annotation")
        docs.append({
            "question_id": q["question_id"], "scene_id": q["scene_id"],
            "situation": q["situation"], "question": q["question"],
            "answers": [x["answer"] if isinstance(x, dict) else str(x) for x in a["answers"]],
            "question_type": question_type(q["question"]),
        })
    return docs


def build_prompt(doc: dict, suffix: str = PROMPT_SUFFIX) -> str:
    """``"{situation} {question} {suffix}"``."""
    parts = [doc["situation"].strip(), doc["question"].strip()] + ([suffix] if suffix else [])
    return " ".join(parts)


def score(records: Iterable[dict]) -> dict:
    """EM-1, refined EM-1 and per-type EM-1 (0-100) from records with ``prediction``/``answers``."""
    em, ref, per_type = [], [], {}
    for r in records:
        p = clean_answer(strip_special(str(r.get("prediction", ""))))
        e, rf = answer_match(p, [clean_answer(a) for a in r["answers"]])
        em.append(e)
        ref.append(rf)
        qt = r.get("question_type") or question_type(r.get("question", ""))
        per_type.setdefault(qt, []).append(e)
    if not em:
        raise ValueError("no SQA3D predictions to score")
    return {
        "EM-1": 100.0 * float(np.mean(em)),
        "EM-1-refined": 100.0 * float(np.mean(ref)),
        "per_type": {t: 100.0 * float(np.mean(per_type[t])) for t in QUESTION_TYPES if t in per_type},
        "counts": {t: len(per_type[t]) for t in QUESTION_TYPES if t in per_type},
        "num_samples": len(em),
    }


def format_table(scores: dict) -> str:
    """Paper layout: What | Is | How | Can | Which | Others | Avg. (EM-1)."""
    cols = [t.capitalize() for t in QUESTION_TYPES] + ["Avg. (EM-1)"]
    vals = [scores["per_type"].get(t) for t in QUESTION_TYPES] + [scores["EM-1"]]
    cells = ["-" if v is None else f"{v:.1f}" for v in vals]
    w = [max(len(a), len(b)) for a, b in zip(cols, cells)]
    return "\n".join([
        f"SQA3D (n={scores['num_samples']}, exact match after answer normalisation)",
        " | ".join(c.rjust(x) for c, x in zip(cols, w)),
        "-+-".join("-" * x for x in w),
        " | ".join(c.rjust(x) for c, x in zip(cells, w)),
        f"EM-1-refined (reported separately, substring match): {scores['EM-1-refined']:.1f}",
    ])
