"""The predictor protocol the runners drive, and the GeoAlign model adapter.

A predictor is any object with ``predict(samples) -> list[str]`` (one greedy answer per
sample, same order) and optionally ``max_batch_size: int``.  The runners know nothing
about models; ``geoalign eval --model DIR`` builds its predictor with
:func:`load_predictor` (a :class:`GeoAlignPredictor`), the single place where the GeoAlign
model and processor are touched.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

from ..backends import ALL_BACKENDS
from ..lazy_exports import deprecated_aliases
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
    frame_sampling: str = "linspace-round"  # geoalign.geometry.sampling.FRAME_SAMPLING

    def load_frames(self) -> list:
        """This question's ``num_frames`` uniformly sampled RGB frames (lazy; see :mod:`.media`)."""
        if self.media is None:
            raise RuntimeError(f"sample {self.id} has no media")
        return load_frames(self.media, self.num_frames, self.frame_sampling)


@runtime_checkable
class Predictor(Protocol):
    """What the runners need from a model."""

    def predict(self, samples: Sequence[Sample]) -> list[str]:
        ...


# ============================================================================ MODEL SEAM
# Everything model-specific lives below: GeoAlignForConditionalGeneration + GeoAlignProcessor.

#: ``--dtype`` names -> torch dtype names ("auto": bfloat16 on CUDA, float32 on CPU)
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def _to_device(v: Any, device):
    import torch

    if isinstance(v, torch.Tensor):
        return v.to(device)
    if isinstance(v, (list, tuple)):
        return [_to_device(x, device) for x in v]
    return v


class GeoAlignPredictor:
    """Greedy answers of a GeoAlign model (:class:`geoalign.GeoAlignForConditionalGeneration`).

    Per batch: every sample's frames are loaded (``Sample.load_frames``: ``num_frames`` sampled
    uniformly by ``geoalign.geometry``), ``GeoAlignProcessor`` turns frames + benchmark prompt into
    the model inputs (chat template, VGGT/Qwen frames, ``gather_index``; left-padded, samples may
    have different frame counts and resolutions), ``model.generate`` decodes greedily
    (``do_sample=False``, one beam, up to the largest ``max_new_tokens`` of the batch) and the new
    tokens are decoded without the prompt and special tokens, and not stripped (as lmms-eval's model
    wrappers return them; scoring strips where the benchmark's code does).
    """

    def __init__(self, model, processor, *, device=None, max_batch_size: int = 1,
                 fusion_backend: str | None = None, save_routing: bool = False):
        self.model = model
        self.processor = processor
        self.device = device if device is not None else model.device
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive int, got {max_batch_size!r}")
        self.max_batch_size = max_batch_size
        self.fusion_backend = fusion_backend
        cfg = getattr(getattr(model, "fusion", None), "config", None)
        if save_routing and cfg is not None and (cfg.injection_layers or cfg.is_progressive):
            raise ValueError("--save-routing records the routed pre-LLM fusion; this model has "
                             + ("in-LLM injection" if cfg.injection_layers else "GAP-MLLM's progressive fusion")
                             + ", which has no such routing")
        self.save_routing = save_routing
        self.last_extras: list[dict] | None = None  # per sample of the last predict(): fields added to its record

    def _frames(self, s: Sample) -> list:
        try:
            return s.load_frames()
        except (OSError, ValueError, RuntimeError) as e:
            if hasattr(e, "add_note"):  # Python >= 3.11
                where = s.media.path if s.media is not None else "no media"
                e.add_note(f"while loading the frames of sample {s.id} ({where})")
            raise

    def generation_kwargs(self, samples: Sequence[Sample]) -> dict[str, Any]:
        """Greedy decoding settings for a batch (the checkpoint's other generation settings, e.g.
        ``repetition_penalty``, stay as in its ``generation_config.json``, as lmms-eval does)."""
        kw: dict[str, Any] = {"do_sample": False, "num_beams": 1,
                              "max_new_tokens": max(s.max_new_tokens for s in samples)}
        gc = getattr(getattr(self.model, "qwen", None), "generation_config", None)
        if gc is not None:
            # unset sampling-only knobs so greedy decoding does not warn about them
            for k in ("temperature", "top_p", "top_k"):
                if getattr(gc, k, None) is not None:
                    kw[k] = None
        tok = getattr(self.processor, "tokenizer", None)
        if (gc is None or getattr(gc, "pad_token_id", None) is None) and getattr(tok, "pad_token_id", None) is not None:
            kw["pad_token_id"] = tok.pad_token_id
        if self.fusion_backend is not None:
            kw["fusion_backend"] = self.fusion_backend
        return kw

    def predict(self, samples: Sequence[Sample]) -> list[str]:
        import torch

        if not samples:
            return []
        frames = [self._frames(s) for s in samples]
        inputs = self.processor(frames, [s.prompt for s in samples])
        inputs = {k: _to_device(v, self.device) for k, v in inputs.items()}
        with torch.inference_mode():
            if self.save_routing:           # the routing of each sample's prefill: per-layer mean alpha (%)
                with self.model.record_routing() as recorder:
                    out = self.model.generate(**inputs, **self.generation_kwargs(samples))
                self.last_extras = [{"routing": {k: r.summary()[k] for k in ("bank_layers", "mean_alpha_pct")}}
                                    for r in recorder.samples]
            else:
                out = self.model.generate(**inputs, **self.generation_kwargs(samples))
        new_tokens = out[:, inputs["input_ids"].shape[1]:]
        # each sample keeps only its own budget, so batching never changes an answer's length limit
        return [self.processor.batch_decode(new_tokens[i:i + 1, :s.max_new_tokens], skip_special_tokens=True)[0]
                for i, s in enumerate(samples)]


def resolve_device_dtype(device: str | None = None, dtype: str | None = "auto"):
    """(device, torch dtype): device default cuda when available; dtype "auto" = bf16 on CUDA, fp32 else."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype in (None, "auto"):
        name = "bfloat16" if str(device).startswith("cuda") else "float32"
    elif dtype in DTYPES:
        name = DTYPES[dtype]
    else:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto or one of {sorted(DTYPES)}")
    return device, getattr(torch, name)


def load_predictor(model_dir: str, *, device: str | None = None, dtype: str | None = "auto",
                   attn_implementation: str | None = None, fusion_backend: str | None = None,
                   max_batch_size: int = 1, save_routing: bool = False, **_: Any) -> GeoAlignPredictor:
    """A :class:`GeoAlignPredictor` for a directory written by
    ``GeoAlignForConditionalGeneration.save_pretrained(dir, processor=...)`` (local files only).

    ``device``: default cuda when available; ``dtype``: auto (bf16 on CUDA, fp32 on CPU), bf16,
    fp16, fp32; ``attn_implementation``: Qwen's (e.g. sdpa, flash_attention_2, eager);
    ``fusion_backend``: reference, torch, triton or cuda (default: the fusion config's); ``save_routing``: add each
    question's per-layer mean routing weight to its record.
    Raises FileNotFoundError / ValueError for a missing or malformed directory.
    """
    from geoalign.modeling import GeoAlignForConditionalGeneration
    from geoalign.processing import GeoAlignProcessor

    if fusion_backend is not None and fusion_backend not in ALL_BACKENDS:
        raise ValueError(f"unknown fusion backend {fusion_backend!r}; choose from {ALL_BACKENDS}")
    device, torch_dtype = resolve_device_dtype(device, dtype)
    model = GeoAlignForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch_dtype, device=device, attn_implementation=attn_implementation)
    model.eval()
    processor = GeoAlignProcessor.from_pretrained(model_dir, group_size=model.group_size)
    return GeoAlignPredictor(model, processor, device=device, max_batch_size=max_batch_size,
                             fusion_backend=fusion_backend, save_routing=save_routing)
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


__getattr__ = deprecated_aliases(__name__, {"FUSION_BACKENDS": "geoalign.backends.registry:ALL_BACKENDS"})
