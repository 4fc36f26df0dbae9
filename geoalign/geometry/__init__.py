"""geoalign.geometry: VGGT geometry encoder with streaming layer output, frame loading and VGGT/Qwen alignment.

Typical use with the real checkpoint (local path; nothing is downloaded)::

    from geoalign.geometry import VGGTAggregator, prepare_frames
    vggt = VGGTAggregator.from_pretrained("/ckpt/VGGT-1B/model.safetensors", device="cuda")
    fr = prepare_frames("scene.mp4", num_frames=32, group_size=4)   # or an image folder / tensor
    for i, layer in vggt.iter_layers(fr.vggt_images[None].cuda(), layers=range(12, 24)):
        rows = layer.reshape(-1, layer.shape[-1])                    # [S*h_v*w_v, 2048]
        x = rows[fr.gather_index.cuda()]                             # [L, G, 2048]; then drop `layer`

* :class:`VGGTAggregator` - own implementation of VGGT's aggregator, official parameter names;
  ``iter_layers(images, layers)`` yields ``(i, [B, S, h*w, 2048])`` one layer at a time; ``forward`` returns the
  full list (reference / memory comparison).
* :class:`VGGTAggregatorConfig` - defaults are VGGT-1B; ``tiny()`` and ``from_patch_embed(name)`` for others.
* :func:`load_aggregator_weights` - strict loading of ``aggregator.*`` from ``.safetensors`` / ``.pt``.
* :func:`prepare_frames` - video/folder/tensor -> VGGT frames, Qwen frames, ``gather_index`` [L, G] (int64).
* :func:`build_gather_index`, :func:`concat_gather_indices` - the token map and its batched form.
"""
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
    SampledFrames,
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
    "SampledFrames",
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
