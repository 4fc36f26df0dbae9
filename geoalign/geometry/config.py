"""VGGTAggregatorConfig: the shapes of the VGGT aggregator (defaults: facebook/VGGT-1B)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# DINOv2 register variants as (width, depth, heads); all use MLP ratio 4 and 4 registers.
DINOV2_VARIANTS: dict[str, tuple[int, int, int]] = {
    "dinov2_vits14_reg": (384, 12, 6),
    "dinov2_vitb14_reg": (768, 12, 12),
    "dinov2_vitl14_reg": (1024, 24, 16),
    "dinov2_vitg2_reg": (1536, 40, 24),
}


@dataclass
class VGGTAggregatorConfig:
    """Shapes and options of :class:`geoalign.geometry.VGGTAggregator`.

    The defaults reproduce the aggregator of facebook/VGGT-1B.

    img_size                 image size the DINOv2 position embedding was trained for (518 -> 37x37 grid)
    patch_size               patch size in pixels (14)
    num_register_tokens      registers of the DINOv2 backbone and of the aggregator (4)
    patch_embed_dim          DINOv2 width (1024 for ViT-L/14)
    patch_embed_depth        DINOv2 depth (24)
    patch_embed_heads        DINOv2 heads (16)
    patch_embed_mlp_ratio    DINOv2 MLP ratio (4)
    patch_embed_init_values  DINOv2 LayerScale init (1.0, as VGGT builds it)
    interpolate_antialias    anti-aliased bicubic interpolation of the DINOv2 position embedding (True in VGGT)
    interpolate_offset       DINOv2's scale-factor offset kludge (0.0 in VGGT: interpolate to an explicit size)
    embed_dim                aggregator width (1024); must equal patch_embed_dim (VGGT has no projection between them)
    depth                    number of frame blocks = number of global blocks = number of layers (24)
    num_heads                aggregator heads (16)
    mlp_ratio                aggregator MLP ratio (4)
    qk_norm                  LayerNorm on q and k per head in the aggregator blocks (True); never in DINOv2 blocks
    rope_freq                base frequency of the 2D rotary embedding (100); <= 0 disables RoPE
    init_values              aggregator LayerScale init (0.01)
    qkv_bias, proj_bias, ffn_bias   linear biases (all True)
    """

    img_size: int = 518
    patch_size: int = 14
    num_register_tokens: int = 4
    patch_embed_dim: int = 1024
    patch_embed_depth: int = 24
    patch_embed_heads: int = 16
    patch_embed_mlp_ratio: float = 4.0
    patch_embed_init_values: float = 1.0
    interpolate_antialias: bool = True
    interpolate_offset: float = 0.0
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    qk_norm: bool = True
    rope_freq: float = 100.0
    init_values: float = 0.01
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True

    def __post_init__(self) -> None:
        for name in ("img_size", "patch_size", "patch_embed_dim", "patch_embed_depth", "patch_embed_heads",
                     "embed_dim", "depth", "num_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"VGGTAggregatorConfig.{name} must be a positive int, got {value!r}")
        if isinstance(self.num_register_tokens, bool) or not isinstance(self.num_register_tokens, int) \
                or self.num_register_tokens < 0:
            raise ValueError(f"VGGTAggregatorConfig.num_register_tokens must be an int >= 0, got {self.num_register_tokens!r}")
        if self.img_size % self.patch_size != 0:
            raise ValueError(
                f"VGGTAggregatorConfig.img_size must be a multiple of patch_size={self.patch_size}, got {self.img_size}"
            )
        if self.patch_embed_dim != self.embed_dim:
            raise ValueError(
                "VGGTAggregatorConfig.patch_embed_dim must equal embed_dim (VGGT feeds DINOv2 tokens straight into the "
                f"aggregator), got patch_embed_dim={self.patch_embed_dim}, embed_dim={self.embed_dim}"
            )
        if self.patch_embed_dim % self.patch_embed_heads != 0:
            raise ValueError(
                f"patch_embed_dim={self.patch_embed_dim} must be divisible by patch_embed_heads={self.patch_embed_heads}"
            )
        if self.embed_dim % self.num_heads != 0:
            raise ValueError(f"embed_dim={self.embed_dim} must be divisible by num_heads={self.num_heads}")
        head_dim = self.embed_dim // self.num_heads
        if self.rope_freq > 0 and head_dim % 4 != 0:
            raise ValueError(f"2D RoPE needs a head dim divisible by 4, got embed_dim/num_heads={head_dim}")

    @property
    def patch_start_idx(self) -> int:
        """Number of special tokens per frame (1 camera + registers) = index of the first patch token."""
        return 1 + self.num_register_tokens

    @property
    def out_dim(self) -> int:
        """Width of one layer output row: concat(frame, global) = 2 * embed_dim."""
        return 2 * self.embed_dim

    @property
    def pos_embed_grid(self) -> int:
        """Side of the square DINOv2 position-embedding grid (518 / 14 = 37)."""
        return self.img_size // self.patch_size

    @classmethod
    def vggt_1b(cls) -> "VGGTAggregatorConfig":
        """The facebook/VGGT-1B aggregator (the defaults)."""
        return cls()

    @classmethod
    def from_patch_embed(cls, name: str, **overrides: Any) -> "VGGTAggregatorConfig":
        """A config whose backbone and aggregator widths follow a DINOv2 register variant, e.g. "dinov2_vitb14_reg".

        The aggregator takes the backbone's width and heads (VGGT has no projection in between); its depth stays 24
        unless overridden.
        """
        if name not in DINOV2_VARIANTS:
            raise ValueError(f"unknown DINOv2 variant {name!r}; expected one of {sorted(DINOV2_VARIANTS)}")
        width, depth, heads = DINOV2_VARIANTS[name]
        kw: dict[str, Any] = dict(patch_embed_dim=width, patch_embed_depth=depth, patch_embed_heads=heads,
                                  embed_dim=width, num_heads=heads)
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def tiny(cls, **overrides: Any) -> "VGGTAggregatorConfig":
        """A few-MB config for CPU tests: width 64, 4 heads, 2 backbone blocks, 4 layers, 56-px position grid."""
        kw: dict[str, Any] = dict(img_size=56, patch_embed_dim=64, patch_embed_depth=2, patch_embed_heads=4,
                                  embed_dim=64, depth=4, num_heads=4)
        kw.update(overrides)
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
