"""geoalign: GeoAlign's Top-K routed multi-layer geometry fusion, with exact sparse streaming fast paths."""
from .config import GeoAlignConfig
from .fusion import FusionStream, GeoAlignFusion
from .routing import Routing

__all__ = ["GeoAlignConfig", "GeoAlignFusion", "FusionStream", "Routing"]
__version__ = "0.1.0"
