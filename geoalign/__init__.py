"""geoalign: GeoAlign's Top-K routed multi-layer geometry fusion, with exact sparse streaming fast paths."""
from .config import GeoAlignConfig
from .fusion import FusionStream, GeoAlignFusion
from .model_config import GeoAlignModelConfig
from .modeling import GeoAlignForConditionalGeneration, load_fusion, save_fusion
from .processing import GeoAlignProcessor
from .routing import Routing

__all__ = [
    "GeoAlignConfig",
    "GeoAlignFusion",
    "FusionStream",
    "Routing",
    "GeoAlignForConditionalGeneration",
    "GeoAlignModelConfig",
    "GeoAlignProcessor",
    "load_fusion",
    "save_fusion",
]
__version__ = "0.1.0"
