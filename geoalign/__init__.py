"""geoalign: GeoAlign's Top-K routed multi-layer geometry fusion, with exact sparse streaming fast paths.

The names below are imported on first use (PEP 562), so ``import geoalign`` and the ``geoalign`` command's argument
parsing do not import torch or transformers. Touching a model name (``from geoalign import
GeoAlignForConditionalGeneration``, or ``import geoalign.modeling``) imports transformers and registers the model
with ``AutoConfig``, ``AutoModelForImageTextToText`` and ``AutoProcessor``.
"""
from __future__ import annotations

from .lazy_exports import lazy_exports

__version__ = "0.1.0"

#: public name -> the submodule it is taken from (the config and the processor through modeling, which registers the
#: Auto classes with all three)
_EXPORTS = {
    "GeoAlignConfig": "config",
    "GeoAlignFusion": "fusion",
    "FusionStream": "fusion",
    "Routing": "routing",
    "GeoAlignForConditionalGeneration": "modeling",
    "GeoAlignModelConfig": "modeling",
    "GeoAlignProcessor": "modeling",
    "load_fusion": "modeling",
    "save_fusion": "modeling",
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
