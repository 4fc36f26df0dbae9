"""geoalign.geometry: VGGT geometry encoder with streaming layer output, frame loading and VGGT/Qwen alignment."""
from .aggregator import VGGTAggregator, count_parameters
from .checkpoint import (
    load_aggregator_weights,
    official_aggregator_param_shapes,
    read_aggregator_state_dict,
    resolve_checkpoint_path,
)
from .alignment import (
    build_gather_index,
    check_grid_thw,
    check_grids,
    check_token_count,
    concat_gather_indices,
    gather_rows,
    num_visual_tokens,
    qwen_grid_for_vggt,
    qwen_grid_thw,
)
from .config import VGGTAggregatorConfig
from .frames import (
    AlignedFrames,
    check_qwen_size,
    crop_for_qwen,
    load_frames,
    load_image_folder,
    load_video_frames,
    prepare_frames,
    resize_for_vggt,
    sample_frame_indices,
    vggt_frame_shape,
)

__all__ = [
    "AlignedFrames",
    "build_gather_index",
    "check_grid_thw",
    "check_grids",
    "check_qwen_size",
    "check_token_count",
    "concat_gather_indices",
    "crop_for_qwen",
    "gather_rows",
    "load_frames",
    "load_image_folder",
    "load_video_frames",
    "num_visual_tokens",
    "prepare_frames",
    "qwen_grid_for_vggt",
    "qwen_grid_thw",
    "resize_for_vggt",
    "sample_frame_indices",
    "vggt_frame_shape",
    "VGGTAggregator",
    "VGGTAggregatorConfig",
    "count_parameters",
    "load_aggregator_weights",
    "official_aggregator_param_shapes",
    "read_aggregator_state_dict",
    "resolve_checkpoint_path",
]
