"""geoalign: GeoAlign's Top-K routed multi-layer geometry fusion, with exact sparse streaming fast paths."""
from .config import GeoAlignConfig

__all__ = ["GeoAlignConfig"]
__version__ = "0.1.0"
