"""SQA3D: data loading and EM-1.

Data (the official release, ``balanced/`` folder):
``v1_balanced_questions_{split}_scannetv2.json`` (``{"questions": [{question_id,
scene_id, situation, question, ...}]}``) and
``v1_balanced_sqa_annotations_{split}_scannetv2.json`` (``{"annotations":
[{question_id, scene_id, answers: [{answer, ...}]}]}``); papers report the test split.

EM-1: the prediction (parsed by the style, below) equals the answer, both through the same
``textnorm.normalize_answer`` (whitespace made single spaces, then ``clean_answer``), so an answer
identical to its reference always matches (in the vg-llm style: a one-line answer); the refined
variant (substring match without spaces, see ``textnorm.answer_match``) is reported separately,
labelled "EM-1-refined".  Breakdown by the question's first word (What / Is / How / Can / Which /
Others) as in the SQA3D paper.

Styles (prompt + answer parsing): ``"default"``: ``"{situation} {question} {suffix}"``, the
prediction cleaned of chat-template leftovers with its lines joined (``textnorm.normalize_answer``);
``"vg-llm"``: VG-LLM's lmms-eval task (``tasks/sqa3d``: ``sqa3d_doc_to_text`` with its yaml's
prompts, ``sqa3d_process_results``): three lines, ``VG_LLM_PRE_PROMPT``, ``"{situation}
{question}"`` and ``VG_LLM_POST_PROMPT``; only the first line of the stripped prediction is
scored (through ``normalize_answer``, like the references); 16 new tokens by default.
"""
from __future__ import annotations

import json
import os
from typing import Iterable

import numpy as np

from .textnorm import answer_match, normalize_answer

PROMPT_SUFFIX = "Answer the question using a single word or phrase."
QUESTION_TYPES = ("what", "is", "how", "can", "which", "others")
STYLES = ("default", "vg-llm")
VG_LLM_PRE_PROMPT = "Carefully watch the video and answer the question."
VG_LLM_POST_PROMPT = "Please answer the question using a single word or phrase."
VG_LLM_MAX_NEW_TOKENS = 16


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


def check_style(style: str) -> None:
    """ValueError unless ``style`` is one of :data:`STYLES`."""
    if style not in STYLES:
        raise ValueError(f"unknown SQA3D style {style!r}; expected one of {STYLES}")


def build_prompt(doc: dict, suffix: str | None = None, style: str = "default") -> str:
    """The question's prompt in ``style`` (module docstring); ``suffix`` replaces the style's answer instruction
    ("" drops it)."""
    check_style(style)
    if style == "vg-llm":
        post = VG_LLM_POST_PROMPT if suffix is None else suffix
        return "\n".join([VG_LLM_PRE_PROMPT, doc["situation"] + " " + doc["question"]] + ([post] if post else []))
    suffix = PROMPT_SUFFIX if suffix is None else suffix
    parts = [doc["situation"].strip(), doc["question"].strip()] + ([suffix] if suffix else [])
    return " ".join(parts)


def parse_prediction(prediction: str, style: str = "default") -> str:
    """The cleaned answer that EM compares: ``default``: chat-template leftovers removed and lines joined;
    ``vg-llm``: the first line of the stripped prediction (``pred.strip().split("\\n")[0]``); then the references'
    path, :func:`~geoalign.eval.textnorm.normalize_answer`."""
    check_style(style)
    text = str(prediction).strip().split("\n")[0] if style == "vg-llm" else str(prediction)
    return normalize_answer(text)


def score(records: Iterable[dict], style: str = "default") -> dict:
    """EM-1, refined EM-1 and per-type EM-1 (0-100) from records with ``prediction``/``answers``; ``style``: how
    a prediction is parsed (:func:`parse_prediction`)."""
    em, ref, per_type = [], [], {}
    for r in records:
        p = parse_prediction(r.get("prediction", ""), style)
        e, rf = answer_match(p, [normalize_answer(a) for a in r["answers"]])
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
        "style": style,
    }


def format_table(scores: dict) -> str:
    """Paper layout: What | Is | How | Can | Which | Others | Avg. (EM-1)."""
    cols = [t.capitalize() for t in QUESTION_TYPES] + ["Avg. (EM-1)"]
    vals = [scores["per_type"].get(t) for t in QUESTION_TYPES] + [scores["EM-1"]]
    cells = ["-" if v is None else f"{v:.1f}" for v in vals]
    w = [max(len(a), len(b)) for a, b in zip(cols, cells)]
    return "\n".join([
        f"SQA3D (n={scores['num_samples']}, exact match after answer normalisation"
        + (", VG-LLM parsing: first line of the answer)" if scores.get("style") == "vg-llm" else ")"),
        " | ".join(c.rjust(x) for c, x in zip(cols, w)),
        "-+-".join("-" * x for x in w),
        " | ".join(c.rjust(x) for c, x in zip(cells, w)),
        f"EM-1-refined (reported separately, substring match): {scores['EM-1-refined']:.1f}",
    ])
