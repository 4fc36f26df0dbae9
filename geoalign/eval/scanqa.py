"""ScanQA: data loading and metrics.

Data: ``ScanQA_v1.0_{split}.json`` (a list of ``{question_id, scene_id, question,
answers, ...}``); the val split is the one with answers that papers report.

Metrics (as the LEO / LLaVA-3D / Video-3D-LLM / VG-LLM evaluation code): prediction and
every reference go through the same :func:`~geoalign.eval.textnorm.normalize_answer` (whitespace
made single spaces, then LEO's ``clean_answer``), then BLEU-1..4, METEOR, ROUGE-L, CIDEr
(pycocoevalcap, after PTB tokenisation) against all references of the question, and exact match
two ways (``textnorm``): "EM@1" / "EM@1-refined" by the exact-first rule (``answer_match``),
"EM@1-LEO" / "EM@1-refined-LEO" by LEO's first-matching-reference loop (``leo_answer_match``).
Without pycocoevalcap installed the EM scores are still computed; the caption metrics are then
None and ``"caption_metrics_missing_reason"`` says to ``pip install "geoalign[eval]"``.
"""
from __future__ import annotations

import json
import os
from typing import Iterable

from .caption import PYCOCOEVALCAP_MISSING, caption_scores, pycocoevalcap_available
from .textnorm import answer_match, leo_answer_match, normalize_answer

PROMPT_SUFFIX = "Answer the question using a single word or phrase."
#: the pycocoevalcap metrics (None in the scores when it is not installed)
CAPTION_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


def annotation_file(data_dir: str, split: str = "val") -> str:
    """Path of the split's JSON (``data_dir`` may also be the JSON file itself)."""
    if os.path.isfile(data_dir):
        return data_dir
    for cand in (os.path.join(data_dir, f"ScanQA_v1.0_{split}.json"),
                 os.path.join(data_dir, "qa", f"ScanQA_v1.0_{split}.json")):
        if os.path.isfile(cand):
            return cand
    raise FileNotFoundError(f"ScanQA_v1.0_{split}.json not found in {data_dir!r} (or its qa/ folder)")


def load_docs(data_dir: str, split: str = "val") -> list[dict]:
    """Questions of a split, in file order."""
    with open(annotation_file(data_dir, split), encoding="utf-8") as f:
        docs = json.load(f)
    for d in docs:
        if "answers" not in d:
            raise ValueError(f"{d.get('question_id')}: no 'answers' (use a split with answers, e.g. val)")
    return docs


def build_prompt(doc: dict, suffix: str | None = None) -> str:
    """Question followed by the short-answer instruction (``suffix``: another one; "" drops it)."""
    q = doc["question"].strip()
    suffix = PROMPT_SUFFIX if suffix is None else suffix
    return f"{q} {suffix}" if suffix else q


def score(records: Iterable[dict], use_java: bool | None = None, meteor: bool = True) -> dict:
    """ScanQA scores (0-100) from records with ``id``, ``prediction`` and ``answers``; without pycocoevalcap,
    the EM scores and :data:`CAPTION_METRICS` as None with ``"caption_metrics_missing_reason"``."""
    refs, preds = {}, {}
    em = {"EM@1": 0, "EM@1-refined": 0, "EM@1-LEO": 0, "EM@1-refined-LEO": 0}
    n = 0
    for r in records:
        key = str(r["id"])
        p = normalize_answer(r.get("prediction", ""))
        gts = [normalize_answer(a) for a in r["answers"]]
        for names, match in ((("EM@1", "EM@1-refined"), answer_match),
                             (("EM@1-LEO", "EM@1-refined-LEO"), leo_answer_match)):
            for name, hit in zip(names, match(p, gts)):
                em[name] += hit
        refs[key], preds[key] = gts, p
        n += 1
    if n == 0:
        raise ValueError("no ScanQA predictions to score")
    out = {name: 100.0 * hits / n for name, hits in em.items()}
    out["num_samples"] = n
    if pycocoevalcap_available():
        out.update(caption_scores(refs, preds, use_java=use_java, meteor=meteor))
    else:
        out.update(dict.fromkeys(CAPTION_METRICS))
        out["caption_metrics_missing_reason"] = PYCOCOEVALCAP_MISSING
    return out


def format_table(scores: dict) -> str:
    """Paper layout: BLEU-4, METEOR, ROUGE-L, CIDEr, EM@1 (+ BLEU-1, refined EM)."""
    cols = ["BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "EM@1"]
    cells = [f"{scores[c]:.1f}" if scores.get(c) is not None else "n/a" for c in cols]
    w = [max(len(a), len(b)) for a, b in zip(cols, cells)]
    tokenizer = f", tokenizer: {scores['tokenizer']}" if scores.get("tokenizer") else ""
    lines = [f"ScanQA (n={scores.get('num_samples')}{tokenizer})",
             " | ".join(c.rjust(x) for c, x in zip(cols, w)),
             "-+-".join("-" * x for x in w),
             " | ".join(c.rjust(x) for c, x in zip(cells, w)),
             f"EM@1-refined (reported separately): {scores['EM@1-refined']:.1f}"]
    if "EM@1-LEO" in scores:
        lines.append(f"LEO's rule (first matching reference decides): EM@1-LEO {scores['EM@1-LEO']:.1f}, "
                     f"EM@1-refined-LEO {scores['EM@1-refined-LEO']:.1f}")
    for reason in ("caption_metrics_missing_reason", "meteor_missing_reason"):
        if reason in scores:
            lines.append("NOTE: " + scores[reason])
    return "\n".join(lines)
