"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr) via ``pycocoevalcap``.

Both the PTB tokenizer and METEOR of pycocoevalcap run Java.  ``java_available()``
detects it; without Java, METEOR is omitted (``result["meteor_missing_reason"]`` says
why) and a pure-Python stand-in for the PTB tokenizer is used (labelled in
``result["tokenizer"]``; it matches PTB on the cleaned, punctuation-free short answers
of ScanQA up to contractions such as "don't").
"""
from __future__ import annotations

import contextlib
import functools
import io
import re
import shutil
import subprocess
import threading
from typing import Mapping, Sequence

# Punctuation tokens that pycocoevalcap's PTBTokenizer drops after tokenizing.
_PTB_PUNCT = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",",
              ":", "-", "--", "...", ";"}


@functools.lru_cache(maxsize=None)
def java_available() -> bool:
    """True when a working ``java`` executable is on PATH."""
    java = shutil.which("java")
    if java is None:
        return False
    try:
        return subprocess.run([java, "-version"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


#: why BLEU / METEOR / ROUGE-L / CIDEr are missing when pycocoevalcap is not installed (EM needs none of it)
PYCOCOEVALCAP_MISSING = ('BLEU, METEOR, ROUGE-L and CIDEr not computed: they need pycocoevalcap, '
                         'install it with `pip install "geoalign[eval]"` (EM scores do not need it)')


def pycocoevalcap_available() -> bool:
    """True when ``pycocoevalcap`` can be imported (the caption metrics need it; EM does not)."""
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        return False
    return True


def _require_pycocoevalcap():
    if not pycocoevalcap_available():
        raise ImportError("ScanQA caption metrics need 'pycocoevalcap' (`pip install \"geoalign[eval]\"`); "
                          "EM scores do not")


def simple_tokenize(text: str) -> str:
    """Java-free approximation of PTBTokenizer(-lowerCase) + punctuation removal."""
    text = text.lower().replace("\n", " ")
    text = re.sub(r"([,.?!;:()\[\]{}\"`])", r" \1 ", text)
    toks = [t.strip("'") if t not in _PTB_PUNCT else t for t in text.split()]
    return " ".join(t for t in toks if t and t not in _PTB_PUNCT)


def tokenize(groups: Mapping, use_java: bool) -> dict:
    """id -> list of captions, tokenized: pycocoevalcap's PTBTokenizer (Java; lower-cased, punctuation dropped) when
    ``use_java``, else :func:`simple_tokenize`. Returns id -> list of space-joined token strings."""
    if use_java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
        with contextlib.redirect_stdout(io.StringIO()):
            return PTBTokenizer().tokenize(
                {k: [{"caption": c} for c in caps] for k, caps in groups.items()})
    return {k: [simple_tokenize(c) for c in caps] for k, caps in groups.items()}


_tokenize = tokenize  # the former private name


def caption_scores(refs: Mapping[str, Sequence[str]], preds: Mapping[str, str],
                   use_java: bool | None = None, meteor: bool = True, tokenized: bool = False) -> dict:
    """Corpus-level BLEU-1..4, ROUGE-L, CIDEr (and METEOR) in 0-100.

    ``refs``: id -> reference answers, ``preds``: id -> prediction (same ids).
    ``use_java=None`` means auto-detect.  METEOR is computed only with Java and ``meteor``.
    ``tokenized``: the texts are already space-separated tokens (e.g. from :func:`tokenize`, then edited by the
    caller) and are scored as they are; ``result["tokenizer"]`` then still names the ``use_java`` tokenizer, which
    the caller is expected to have used.
    """
    _require_pycocoevalcap()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if set(refs) != set(preds):
        raise ValueError("refs and preds must have the same ids")
    if not refs:
        raise ValueError("no samples to score")
    if use_java is None:
        use_java = java_available()
    keys = list(refs)
    if tokenized:
        gts = {k: list(refs[k]) for k in keys}
        res = {k: [preds[k]] for k in keys}
    else:
        gts = tokenize({k: [r.replace("\n", " ").strip() for r in refs[k]] for k in keys}, use_java)
        res = tokenize({k: [preds[k]] for k in keys}, use_java)
    out: dict = {"tokenizer": "ptb (java)" if use_java else "simple (python; Java not found)"}
    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its internals
        bleu, _ = Bleu(4).compute_score(gts, res)
        rouge, _ = Rouge().compute_score(gts, res)
        cider, _ = Cider().compute_score(gts, res)
    for i, b in enumerate(bleu, 1):
        out[f"BLEU-{i}"] = 100.0 * float(b)
    out["ROUGE-L"] = 100.0 * float(rouge)
    out["CIDEr"] = 100.0 * float(cider)
    if not meteor:
        out["meteor_missing_reason"] = "METEOR disabled by the caller"
    elif not use_java:
        out["meteor_missing_reason"] = ("METEOR not computed: it runs the Java program "
                                        "meteor-1.5.jar and no working `java` was found on PATH")
    else:
        from pycocoevalcap.meteor.meteor import Meteor
        scorer = Meteor()
        try:
            m, _ = scorer.compute_score(gts, res)
        finally:
            _close_meteor(scorer)
        out["METEOR"] = 100.0 * float(m)
    return out


def _close_meteor(scorer) -> None:
    proc = getattr(scorer, "meteor_p", None)
    if proc is None:
        return
    with contextlib.suppress(Exception):
        proc.stdin.close()
        proc.kill()
        proc.wait(timeout=10)
    scorer.lock = threading.Lock()  # its __del__ takes the lock; never let it block at exit
