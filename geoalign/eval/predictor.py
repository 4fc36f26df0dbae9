"""The predictor protocol the runners drive, and the GeoAlign model adapter seam.

A predictor is any object with ``predict(samples) -> list[str]`` (one greedy answer per
sample, same order) and optionally ``max_batch_size: int``.  The runners know nothing
about models; ``geoalign eval --model DIR`` builds its predictor with
:func:`load_predictor`, the single place where the GeoAlign model is touched.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

from .media import MediaRef, load_frames


@dataclass
class Sample:
    """One benchmark question, ready for a model."""

    id: str
    task: str
    prompt: str  # the full text prompt (benchmark wording), without chat template
    media: MediaRef | None
    num_frames: int = 32
    max_new_tokens: int = 16
    meta: dict[str, Any] = field(default_factory=dict)  # ground truth etc., for the record

    def load_frames(self) -> list:
        """Uniformly sampled RGB ``PIL.Image`` frames for this question (lazy)."""
        if self.media is None:
            raise RuntimeError(f"sample {self.id} has no media")
        return load_frames(self.media, self.num_frames)


@runtime_checkable
class Predictor(Protocol):
    """What the runners need from a model."""

    def predict(self, samples: Sequence[Sample]) -> list[str]:
        ...


# ============================================================================ MODEL SEAM
# Everything model-specific lives below.  GeoAlignForConditionalGeneration is being
# written by others; until it exists, load_predictor raises ImportError with a clear
# message.  Nothing here has run against the real model yet.

class GeoAlignPredictor:
    """Greedy decoding with a GeoAlign checkpoint (Qwen2.5-VL chat template + video frames).

    UNTESTED SEAM: written against the Qwen2.5-VL processor API of transformers; adjust
    when GeoAlignForConditionalGeneration lands (e.g. if VGGT needs its own inputs).
    """

    def __init__(self, model, processor, device: str = "cpu", max_batch_size: int = 1):
        self.model = model
        self.processor = processor
        self.device = device
        self.max_batch_size = max_batch_size

    def predict(self, samples: Sequence[Sample]) -> list[str]:
        import torch

        texts, videos = [], []
        for s in samples:
            messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": s.prompt}]}]
            texts.append(self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
            videos.append(s.load_frames())
        tok = getattr(self.processor, "tokenizer", None)
        if tok is not None and len(samples) > 1:
            tok.padding_side = "left"  # batched generation needs left padding
        inputs = self.processor(text=texts, videos=videos, padding=True, return_tensors="pt").to(self.device)
        max_new = max(s.max_new_tokens for s in samples)
        with torch.inference_mode():
            out = self.model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=max_new)
        new_tokens = out[:, inputs["input_ids"].shape[1]:]
        return [t.strip() for t in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]


def load_predictor(model_dir: str, *, device: str | None = None, dtype: str = "auto",
                   max_batch_size: int = 1, **_: Any) -> Predictor:
    """Load ``geoalign.GeoAlignForConditionalGeneration`` from ``model_dir`` as a predictor.

    Raises ImportError while the model class does not exist in ``geoalign``.
    """
    try:
        geoalign = importlib.import_module("geoalign")
        model_cls = getattr(geoalign, "GeoAlignForConditionalGeneration")
    except (ImportError, AttributeError) as e:
        raise ImportError(
            "geoalign.GeoAlignForConditionalGeneration is not available in this installation "
            "(the GeoAlign model is not implemented yet), so `--model DIR` cannot be loaded. "
            "Use `--predictor module:factory` to evaluate another predictor, or score an "
            "existing predictions file with `geoalign score`.") from e
    import torch
    from transformers import AutoProcessor

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    model = model_cls.from_pretrained(model_dir, dtype=torch_dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    return GeoAlignPredictor(model, processor, device=device, max_batch_size=max_batch_size)
# ========================================================================= END MODEL SEAM


def load_predictor_from_spec(spec: str, model_dir: str | None = None, **kwargs: Any) -> Predictor:
    """Build a predictor from ``'package.module:factory'``; the factory gets ``model_dir`` and kwargs."""
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise ValueError(f"--predictor must look like 'package.module:factory', got {spec!r}")
    factory = getattr(importlib.import_module(mod_name), attr)
    pred = factory(model_dir, **kwargs)
    if not isinstance(pred, Predictor):
        raise TypeError(f"{spec} returned {type(pred).__name__}, which has no predict(samples) method")
    return pred
