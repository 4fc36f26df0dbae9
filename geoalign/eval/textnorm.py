"""Answer normalisation and exact match for ScanQA / SQA3D.

``clean_answer`` reproduces the normalisation used by the 3D-QA evaluation code
that reports SQA3D EM-1 and ScanQA EM@1 (LEO ``data_utils.clean_answer``, reused by
Video-3D-LLM, LLaVA-3D and VG-LLM's lmms-eval tasks): lower-case, whitespace
squeezed, punctuation other than ``, ' - :`` removed, a few typo fixes, small
numbers spelled out, article before a word dropped.  The steps are applied in the
same order as there because later steps depend on earlier ones (e.g. "tv" becomes
"TV" after lower-casing, and prediction and references go through the same path).

``normalize_answer`` is the one path that the prediction *and every reference* take before they are
compared: ``strip_special`` (chat-template leftovers removed; every run of whitespace, "\\n", "\\t",
"\\r", a non-breaking space and the other Unicode spaces included, made one space; ends trimmed),
then ``clean_answer``. LEO sends prediction and references through one function (its
``clean_answer``), so a prediction identical to a reference always matches it; with the same path
on both sides that holds here too (it did not while only the prediction's whitespace was squeezed:
a reference "brown\\nchair" never matched the answer "brown\\nchair").

``answer_match`` gives (EM, refined EM) by the exact-first rule: EM = the cleaned prediction
equals one of the cleaned references (identical strings match, two empty strings included, as
LEO's ``pred == gt``); otherwise refined EM accepts a non-empty prediction whose space-free form
contains, or is contained in, a reference's space-free form (an empty prediction that equals no
reference -> (0, 0)).
``leo_answer_match`` is LEO's own loop (``evaluator/scanqa_eval.py``, ``answer_match``): the
references in order, the first that equals the prediction (1, 1) or is in a substring relation
with it (0, 1) decides. It gives EM 0 where an earlier reference merely overlaps a later exact one
(["brown chair", "brown"] vs "brown") and refined EM 1 for an empty prediction ("" is in every
string); an empty prediction against an empty first reference is (1, 1) there too.
"""
from __future__ import annotations

import re
from typing import Sequence

_NUMBER_WORDS = {
    "0": "zero", "none": "zero", "1": "one", "2": "two", "3": "three", "4": "four",
    "5": "five", "6": "six", "7": "seven", "8": "eight", "9": "nine", "10": "ten",
    "11": "eleven", "12": "twelve", "13": "thirteen", "14": "fourteen", "15": "fifteen",
    "16": "sixteen", "17": "seventeen", "18": "eighteen", "19": "nineteen",
    "20": "twenty", "23": "twenty-three",
}
_TYPOS = {
    "letf": "left", "let": "left", "tehre": "there", "rigth": "right", "rght": "right",
    "behine": "behind", "tv": "TV", "chai": "chair", "wasing": "washing",
    "waslked": "walked", "oclock": "o'clock",
}


def _word(w: str) -> re.Pattern:
    return re.compile(r"\b" + re.escape(w) + r"\b")


# (pattern, replacement) in application order.
_STEPS: list[tuple[re.Pattern, str]] = [
    (re.compile(r"[ ]+$"), ""),
    (re.compile(r"^[ ]+"), ""),
    (re.compile(r" {2,}"), " "),
    (re.compile(r"\.[ ]{2,}"), ". "),
    (re.compile(r"[^a-zA-Z0-9,'\s\-:]+"), ""),
    (re.compile("\u00e7"), "c"),
    (re.compile("\u2019"), "'"),
    *[(_word(k), v) for k, v in _TYPOS.items()],
    (re.compile(r"\bo'[ ]+clock\b"), "o'clock"),
    *[(_word(k), v) for k, v in _NUMBER_WORDS.items()],
    (re.compile(r"\b([a-zA-Z]+)([0-9])\b"), r"\g<1>"),  # "no1", "mat2" -> "no", "mat"
    (re.compile(r"\ba\b ([a-zA-Z]+)"), r"\g<1>"),
    (re.compile(r"\ban\b ([a-zA-Z]+)"), r"\g<1>"),
    (re.compile(r"\bthe\b ([a-zA-Z]+)"), r"\g<1>"),
    (_word("backwards"), "backward"),
]


def clean_answer(text: str) -> str:
    """Standard 3D-QA answer normalisation (see module docstring)."""
    s = str(text).lower()
    for pat, repl in _STEPS:
        s = pat.sub(repl, s)
    return s


def answer_match(pred: str, refs: Sequence[str]) -> tuple[int, int]:
    """(EM, refined EM) of an already cleaned prediction against cleaned references: (1, 1) when the prediction
    equals a reference (``"" == ""`` included, as LEO); else (0, 1) when it is non-empty and its space-free form
    contains or is contained in a reference's; else (0, 0)."""
    if pred in refs:
        return 1, 1
    if len(pred) == 0:
        return 0, 0
    p = "".join(pred.split())
    for ref in refs:
        r = "".join(ref.split())
        if p in r or r in p:
            return 0, 1
    return 0, 0


def leo_answer_match(pred: str, refs: Sequence[str]) -> tuple[int, int]:
    """(EM, refined EM) by LEO's rule: the first reference, in order, that matches decides (module docstring):
    equal strings (two empty ones included) give (1, 1), a space-free substring relation (0, 1)."""
    p = "".join(pred.split())
    for ref in refs:
        r = "".join(ref.split())
        if pred == ref:
            return 1, 1
        if p in r or r in p:
            return 0, 1
    return 0, 0


def normalize_whitespace(text: str) -> str:
    """Every run of whitespace (``str.split``'s: spaces, "\\n", "\\t", "\\r", non-breaking and other Unicode spaces)
    as one space, without leading or trailing whitespace."""
    return " ".join(str(text).split())


def strip_special(text: str) -> str:
    """Remove chat-template leftovers from a decoded answer, then :func:`normalize_whitespace` (lines joined)."""
    for tok in ("ASSISTANT:", "<|im_end|>", "<|endoftext|>", "</s>", "<s>", "<unk>"):
        text = text.replace(tok, "")
    return normalize_whitespace(text)


def normalize_answer(text) -> str:
    """The path every prediction and every reference takes before EM: ``clean_answer(strip_special(text))``."""
    return clean_answer(strip_special(str(text)))
