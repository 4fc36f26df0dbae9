"""Geometry inputs of the GeoAlign model: per-sample VGGT frames and gather_index, checked against Qwen's grids.

``vggt_pixel_values`` is one [S_b, 3, H_b, W_b] tensor in [0, 1] per sample (a list, or one [B, S, 3, H, W] tensor);
``gather_index`` is optional, one [L_b, G] tensor per sample (built from the frame grid when absent). Qwen's vision
tower output Q [L_total, D] is sample-major; split_by_sample cuts it into per-sample blocks and checks that Qwen's
grids, token counts and the VGGT frames describe the same frames.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .geometry.alignment import PATCH_SIZE, build_gather_index, check_grid_thw, qwen_grid_for_vggt


@dataclass
class SampleGeometry:
    images: torch.Tensor                  # [S, 3, H, W] in [0, 1] for VGGT
    gather_index: torch.Tensor | None     # [L, G] or None (built from the grid)

    @property
    def num_frames(self) -> int:
        return int(self.images.shape[0])

    @property
    def vggt_grid(self) -> tuple[int, int]:
        return int(self.images.shape[-2]) // PATCH_SIZE, int(self.images.shape[-1]) // PATCH_SIZE


def _per_sample(value, name: str, sample_dims: int, forms: str) -> list:
    """One entry per sample: a tensor with ``sample_dims`` dims is one sample, one more dim is a batch; a list or
    tuple is already per sample."""
    if isinstance(value, torch.Tensor):
        if value.dim() == sample_dims:
            return [value]
        if value.dim() == sample_dims + 1:
            return list(value.unbind(0))
        raise ValueError(f"{name} must be {forms} or a list, got shape {tuple(value.shape)}")
    if isinstance(value, (list, tuple)):
        return list(value)
    raise ValueError(f"{name} must be a tensor ({forms}) or a list of per-sample tensors, got {type(value).__name__}")


def as_samples(vggt_pixel_values, gather_index) -> list[SampleGeometry]:
    """Normalise VGGT inputs: a tensor [B, S, 3, H, W], a tensor [S, 3, H, W] (one sample) or a list of [S_b, 3,
    H_b, W_b] tensors; gather_index: None, a tensor [L, G] (one sample) or a list (None entries allowed)."""
    images = _per_sample(vggt_pixel_values, "vggt_pixel_values", 4, "[B, S, 3, H, W], [S, 3, H, W]")
    if not images:
        raise ValueError("vggt_pixel_values is empty: expected one [S, 3, H, W] tensor per sample")
    for b, im in enumerate(images):
        if not isinstance(im, torch.Tensor) or im.dim() != 4 or im.shape[1] != 3:
            desc = tuple(im.shape) if isinstance(im, torch.Tensor) else type(im).__name__
            raise ValueError(f"vggt_pixel_values[{b}] must be a tensor [S, 3, H, W], got {desc}")
        if im.shape[-2] % PATCH_SIZE or im.shape[-1] % PATCH_SIZE:
            raise ValueError(f"vggt_pixel_values[{b}]: height and width must be multiples of {PATCH_SIZE}, "
                             f"got {tuple(im.shape[-2:])}")
    if gather_index is None:
        gis = [None] * len(images)
    else:
        gis = _per_sample(gather_index, "gather_index", 2, "[L, G], [B, L, G]")
    if len(gis) != len(images):
        raise ValueError(f"got VGGT frames for {len(images)} samples but gather_index for {len(gis)}")
    return [SampleGeometry(im, gi) for im, gi in zip(images, gis)]


def frame_groups(samples: list[SampleGeometry]) -> list[list[int]]:
    """The sample positions grouped by their VGGT frames (the same tensor object: generate's beam copies), in
    first-appearance order: VGGT runs once per group and feeds every member."""
    groups: dict[int, list[int]] = {}
    for b, s in enumerate(samples):
        groups.setdefault(id(s.images), []).append(b)
    return list(groups.values())


def split_by_sample(q: torch.Tensor, grid_thw: torch.Tensor, samples: list[SampleGeometry], G: int):
    """[(Q_b [L_b, D], sample b, gather_index_b [L_b, G])] for the batch's visual tokens Q (sample-major);
    raises ValueError when Qwen's grids / token counts do not match the VGGT frames."""
    grid = torch.as_tensor(grid_thw).reshape(-1, 3).to("cpu", torch.int64)
    rows_per = [s.num_frames if G == 4 else 1 for s in samples]
    if grid.shape[0] != sum(rows_per):
        raise ValueError(
            f"Qwen encoded {grid.shape[0]} {'images' if G == 4 else 'videos'} (grid_thw rows) but the VGGT inputs "
            f"describe {sum(rows_per)} ({'frames per sample' if G == 4 else 'one video per sample'}: {rows_per})")
    out, row, off = [], 0, 0
    for b, (s, n) in enumerate(zip(samples, rows_per)):
        g = grid[row:row + n]
        row += n
        try:
            qgrid = qwen_grid_for_vggt(s.vggt_grid)
            check_grid_thw(g, s.num_frames, qgrid, G)
        except ValueError as e:
            raise ValueError(f"sample {b}: VGGT frames {tuple(s.images.shape)} (patch grid {s.vggt_grid}) do "
                             f"not match Qwen's visual tokens: {e}") from e
        L = int((g.prod(-1) // 4).sum())
        if off + L > q.shape[0]:
            raise ValueError(f"sample {b}: Qwen's vision tower produced {q.shape[0]} tokens, fewer than the "
                             f"grids imply ({off + L}+)")
        gi = s.gather_index
        if gi is None:
            gi = build_gather_index(s.num_frames, s.vggt_grid, qgrid, G)
        elif tuple(gi.shape) != (L, G):
            raise ValueError(f"sample {b}: gather_index has shape {tuple(gi.shape)}, expected [{L}, {G}] "
                             "(one row per Qwen visual token)")
        out.append((q[off:off + L], s, gi))
        off += L
    if off != q.shape[0]:
        raise ValueError(f"Qwen's vision tower produced {q.shape[0]} visual tokens, the grids imply {off}")
    return out


def forward_accepts(name: str) -> bool:
    """Whether the installed Qwen2.5-VL forward takes argument ``name`` (e.g. mm_token_type_ids)."""
    import inspect

    from transformers import Qwen2_5_VLForConditionalGeneration

    return name in inspect.signature(Qwen2_5_VLForConditionalGeneration.forward).parameters


def with_geometry_parameters(qwen_forward, return_routing: bool = True):
    """Qwen's forward signature with GeoAlign's keyword-only geometry parameters (and ``return_routing``, the
    wrapper's) before its ``**kwargs``."""
    import inspect

    sig = inspect.signature(qwen_forward)
    params = [p for p in sig.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    var_kw = [p for p in sig.parameters.values() if p.kind == inspect.Parameter.VAR_KEYWORD]
    names = ("vggt_pixel_values", "gather_index", "fusion_backend") + (("return_routing",) if return_routing else ())
    ours = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in names]
    return sig.replace(parameters=params + ours + var_kw)


@dataclass
class CallGeometry:
    """The geometry inputs of the forward in progress (GeoAlignModel.geometry holds one for one forward)."""

    samples: list[SampleGeometry]
    backend: str | None
    kind: str  # "image" or "video": the pixel input Qwen will encode
    visual_mask: torch.Tensor | None = None  # [B, T] visual-token positions (in-LLM / progressive injection)
    used: bool = False

    def expand(self, times: int) -> None:
        """Each sample repeated ``times`` times in place, as generate expands its batch for beams / returned
        sequences (sample b becomes rows b*times .. b*times+times-1). The copies share their SampleGeometry, so
        VGGT still runs once per sample (see frame_groups)."""
        self.samples = [s for s in self.samples for _ in range(times)]
        if self.visual_mask is not None:
            self.visual_mask = self.visual_mask.repeat_interleave(times, dim=0)


def call_geometry(config, fusion_config, vggt_pixel_values, gather_index, pixel_values, pixel_values_videos,
                  backend: str | None, input_ids: torch.Tensor | None) -> CallGeometry:
    """A forward's geometry, checked against the model (``config``: its GeoAlignModelConfig; ``fusion_config``: its
    fusion's GeoAlignConfig): one visual input kind, the one G selects; frames for VGGT; input_ids where in-LLM or
    progressive injection needs the visual-token positions. ValueError otherwise."""
    if pixel_values is not None and pixel_values_videos is not None:
        raise ValueError("GeoAlign fuses one visual input kind per model: got both pixel_values and "
                         "pixel_values_videos")
    group_size = fusion_config.group_size
    kind = "image" if pixel_values is not None else "video"
    want = "image" if group_size == 4 else "video"
    if kind != want:
        raise ValueError(f"this GeoAlign model has G={group_size} and fuses {want}s "
                         f"({'pixel_values' if want == 'image' else 'pixel_values_videos'}), got {kind} input")
    if vggt_pixel_values is None:
        raise ValueError("GeoAlign needs the frames for VGGT: pass vggt_pixel_values (see GeoAlignProcessor)")
    samples = as_samples(vggt_pixel_values, gather_index)
    mask = None
    cfg = fusion_config
    if cfg.injection_layers or cfg.progressive_inject_layers:
        if input_ids is None:
            field = "injection_layers" if cfg.injection_layers else "progressive_inject_layers"
            raise ValueError(f"in-LLM injection (geoalign_config.{field}) needs input_ids to find the "
                             "visual-token positions")
        mask = input_ids == (config.image_token_id if kind == "image" else config.video_token_id)
    return CallGeometry(samples, backend, kind, visual_mask=mask)
