"""A deterministic stand-in predictor for plumbing tests (NOT a model).

``geoalign eval TASK --predictor geoalign.eval.fake:FakePredictor --model oracle`` answers
with the ground truth (scores must be 100 / perfect EM); any other ``--model`` value
gives hash-derived answers that depend only on the sample id.
"""
from __future__ import annotations

import hashlib
from typing import Any, Sequence

from .predictor import Sample

_WORDS = ("chair", "table", "left", "right", "two", "brown", "yes", "no")


def _h(s: str) -> int:
    return int(hashlib.sha256(s.encode()).hexdigest()[:8], 16)


class FakePredictor:
    """Deterministic answers; counts calls; can load frames and can crash on demand."""

    def __init__(self, model_dir: str | None = None, mode: str | None = None,
                 load_frames: bool = False, fail_after: int | None = None,
                 max_batch_size: int = 4, **_: Any):
        self.mode = mode or ("oracle" if model_dir == "oracle" else "hash")
        self.load_frames = load_frames
        self.fail_after = fail_after  # raise after answering this many samples
        self.max_batch_size = max_batch_size
        self.answered = 0
        self.batches: list[int] = []
        self.frames_seen: list[int] = []

    def _answer(self, s: Sample) -> str:
        m = s.meta
        if self.mode == "oracle":
            if "ground_truth" in m:
                gt = str(m["ground_truth"])
                return gt + "." if m.get("options") else gt
            return m["answers"][0]
        h = _h(s.id)
        if m.get("options"):
            return "ABCD"[h % len(m["options"])]
        if "ground_truth" in m:
            return f"{(h % 50) / 10:.1f}"
        return _WORDS[h % len(_WORDS)]

    def predict(self, samples: Sequence[Sample]) -> list[str]:
        """One answer per sample."""
        self.batches.append(len(samples))
        out = []
        for s in samples:
            if self.fail_after is not None and self.answered >= self.fail_after:
                raise RuntimeError("FakePredictor: simulated crash")
            if self.load_frames:
                self.frames_seen.append(len(s.load_frames()))
            out.append(self._answer(s))
            self.answered += 1
        return out
