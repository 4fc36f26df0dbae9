"""``geoalign eval --engine vllm``: the evaluation predictor on vLLM's offline engine.

Same questions, prompts, frame sampling and predictions file as the transformers engine
(geoalign.eval.predictor.GeoAlignPredictor): per batch, every sample's frames are loaded (``Sample.load_frames``),
its prompt is the same chat template with one placeholder per frame (G = 4) or one for the video (G = 8), and
vLLM decodes greedily (temperature 0, the checkpoint's other generation settings, as transformers' generate reads
them from generation_config.json). The answer is the new tokens decoded by the same tokenizer call as the
transformers engine's, so the two predictions files are equal wherever the two engines pick the same tokens.
A batch goes to vLLM as one ``generate`` call: vLLM batches the requests continuously.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

from ..eval.predictor import Sample

def video_metadata(num_frames: int, sampled_fps: float | None) -> dict:
    """vLLM's metadata for frames already sampled: all of them kept, at ``sampled_fps`` (None: no rate)."""
    return {"fps": sampled_fps, "total_num_frames": num_frames, "frames_indices": list(range(num_frames)),
            "duration": num_frames / sampled_fps if sampled_fps else None, "video_backend": "geoalign",
            "do_sample_frames": False}


class VLLMPredictor:
    """Greedy answers of a GeoAlign directory on vLLM (``LLM(model_dir)``), for the eval runners."""

    def __init__(self, llm, processor, *, max_batch_size: int = 64):
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive int, got {max_batch_size!r}")
        self.llm = llm
        self.processor = processor
        self.max_batch_size = max_batch_size
        self.last_extras = None

    def request(self, sample: Sample) -> dict[str, Any]:
        """The vLLM prompt of one sample: text with unexpanded placeholders + its frames."""
        import numpy as np

        frames = sample.load_frames()
        if self.processor.group_size == 4:
            return {"prompt": self.processor.prompt(len(frames), sample.prompt),
                    "multi_modal_data": {"image": list(frames)}}
        arrays = [np.asarray(f) for f in frames]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise ValueError(f"sample {sample.id}: a video's frames must share one size, got {sorted(shapes)}")
        fps = getattr(frames, "sampled_fps", None)
        return {"prompt": self.processor.prompt(1, sample.prompt),
                "multi_modal_data": {"video": (np.stack(arrays), video_metadata(len(arrays), fps))}}

    def sampling_params(self, sample: Sample):
        """The checkpoint's generation settings (vLLM reads generation_config.json, as transformers does) with
        greedy decoding (temperature 0: vLLM then ignores top-k / top-p) and this sample's token budget."""
        params = self.llm.get_default_sampling_params()
        params.temperature = 0.0
        params.max_tokens = sample.max_new_tokens
        params.n = 1
        return params

    def predict(self, samples: Sequence[Sample]) -> list[str]:
        if not samples:
            return []
        requests = [self.request(s) for s in samples]
        outputs = self.llm.generate(requests, [self.sampling_params(s) for s in samples], use_tqdm=False)
        return [self.processor.batch_decode([list(o.outputs[0].token_ids)], skip_special_tokens=True)[0]
                for o in outputs]


def load_vllm_predictor(model_dir: str, *, dtype: str | None = "auto", max_batch_size: int = 64,
                        num_frames: int = 32, tensor_parallel_size: int = 1, fusion_backend: str | None = None,
                        vllm_kwargs: dict | None = None, **_: Any) -> VLLMPredictor:
    """A :class:`VLLMPredictor` for a GeoAlign directory (local files only). ``num_frames`` bounds the images per
    prompt (G = 4); ``vllm_kwargs`` go to ``vllm.LLM`` (e.g. max_model_len, gpu_memory_utilization)."""
    from ..eval.predictor import resolve_device_dtype
    from ..model_config import GeoAlignModelConfig
    from ..processing import GeoAlignProcessor
    from . import unsupported_on_vllm

    why = unsupported_on_vllm(GeoAlignModelConfig.from_pretrained(model_dir).fusion)
    if why is not None:                          # said before vLLM starts its engine (and its worker fails on it)
        raise ValueError(f"{model_dir}: {why}")
    from vllm import LLM

    _, torch_dtype = resolve_device_dtype(None, dtype)    # as the transformers engine: auto = bf16 on CUDA, else fp32
    processor = GeoAlignProcessor.from_pretrained(model_dir)
    if fusion_backend is not None:
        os.environ["GEOALIGN_VLLM_FUSION_BACKEND"] = fusion_backend   # read by the model in vLLM's workers
    limits = {"image": num_frames, "video": 0} if processor.group_size == 4 else {"image": 0, "video": 1}
    kwargs = {"dtype": str(torch_dtype).removeprefix("torch."), "tensor_parallel_size": tensor_parallel_size,
              "limit_mm_per_prompt": limits, "seed": 0}
    if processor.group_size == 4:       # every G = 4 prompt has its own cache keys: a processor cache only fills up
        kwargs["mm_processor_cache_gb"] = 0
    kwargs.update(vllm_kwargs or {})
    llm = LLM(model=os.path.abspath(model_dir), **kwargs)
    return VLLMPredictor(llm, processor, max_batch_size=max_batch_size)
