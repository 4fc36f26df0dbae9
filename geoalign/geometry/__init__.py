"""geoalign.geometry: VGGT geometry encoder with streaming layer output, frame loading and VGGT/Qwen alignment."""
from .aggregator import VGGTAggregator, count_parameters
from .checkpoint import (
    load_aggregator_weights,
    official_aggregator_param_shapes,
    read_aggregator_state_dict,
    resolve_checkpoint_path,
)
from .config import VGGTAggregatorConfig

__all__ = [
    "VGGTAggregator",
    "VGGTAggregatorConfig",
    "count_parameters",
    "load_aggregator_weights",
    "official_aggregator_param_shapes",
    "read_aggregator_state_dict",
    "resolve_checkpoint_path",
]
