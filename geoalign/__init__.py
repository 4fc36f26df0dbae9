"""geoalign: GeoAlign's Top-K routed multi-layer geometry fusion, with exact sparse streaming fast paths.

The names below are imported on first use (PEP 562), so ``import geoalign`` and the ``geoalign`` command's argument
parsing do not import torch or transformers. Touching a model name (``from geoalign import
GeoAlignForConditionalGeneration``, or ``import geoalign.modeling``) imports transformers and registers the model
with ``AutoConfig``, ``AutoModelForImageTextToText`` and ``AutoProcessor``.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: public name -> the submodule that defines it
_EXPORTS = {
    "GeoAlignConfig": "config",
    "GeoAlignFusion": "fusion",
    "FusionStream": "fusion",
    "Routing": "routing",
    "GeoAlignForConditionalGeneration": "modeling",
    "GeoAlignModelConfig": "model_config",
    "GeoAlignProcessor": "processing",
    "load_fusion": "modeling",
    "save_fusion": "modeling",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'geoalign' has no attribute {name!r}")
    if module in ("model_config", "processing"):
        module = "modeling"   # the Auto classes are registered there, with the config and the processor
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
