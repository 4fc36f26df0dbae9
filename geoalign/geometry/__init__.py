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

The names are imported on first use (PEP 562): ``geoalign.geometry.sampling`` (frame sampling rules, numpy only)
can be imported without torch.
"""

from __future__ import annotations

from ..lazy_exports import lazy_exports

#: public name -> the submodule that defines it
_EXPORTS = {
    "VGGTAggregator": "aggregator",
    "count_parameters": "aggregator",
    "load_aggregator_weights": "checkpoint",
    "official_aggregator_param_shapes": "checkpoint",
    "read_aggregator_state_dict": "checkpoint",
    "resolve_checkpoint_path": "checkpoint",
    "build_gather_index": "alignment",
    "check_grid_thw": "alignment",
    "check_grids": "alignment",
    "check_token_count": "alignment",
    "concat_gather_indices": "alignment",
    "gather_rows": "alignment",
    "num_visual_tokens": "alignment",
    "qwen_grid_for_vggt": "alignment",
    "qwen_grid_thw": "alignment",
    "VGGTAggregatorConfig": "config",
    "AlignedFrames": "frames",
    "check_qwen_size": "frames",
    "crop_for_qwen": "frames",
    "SampledFrames": "frames",
    "load_frames": "frames",
    "load_image_folder": "frames",
    "load_video_frames": "frames",
    "prepare_frames": "frames",
    "resize_for_vggt": "frames",
    "sample_frame_indices": "sampling",
    "vggt_frame_shape": "frames",
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
