"""GeoAlignModelConfig: the whole model's transformers config = Qwen2.5-VL's config + the fusion and VGGT configs.

It *is* a ``Qwen2_5_VLConfig`` (text_config, vision_config, token ids: everything Qwen reads), with three fields more:

  geoalign_config      GeoAlignConfig as a dict (geoalign.GeoAlignConfig: D, D', bank, K, G, H, variants)
  vggt_config          VGGTAggregatorConfig as a dict (the frozen geometry encoder)
  freeze_vision_tower  keep Qwen's vision tower frozen (GeoAlign trains the fusion and the LLM; default True)

Registered with ``AutoConfig`` under model_type ``geoalign_qwen2_5_vl`` when geoalign.modeling is imported.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from transformers import Qwen2_5_VLConfig

from .config import GeoAlignConfig
from .geometry.config import VGGTAggregatorConfig

if TYPE_CHECKING:
    from .geometry.aggregator import VGGTAggregator


class GeoAlignModelConfig(Qwen2_5_VLConfig):
    model_type = "geoalign_qwen2_5_vl"

    geoalign_config: dict | None = None
    vggt_config: dict | None = None
    freeze_vision_tower: bool = True

    @property
    def fusion(self) -> GeoAlignConfig:
        """The fusion's GeoAlignConfig (built from ``geoalign_config``; the paper's defaults when it is None)."""
        if self.geoalign_config is None:
            return default_fusion_config(self, self.vggt)
        return GeoAlignConfig.from_dict(dict(self.geoalign_config))

    @property
    def vggt(self) -> VGGTAggregatorConfig:
        """The geometry encoder's config (VGGT-1B when ``vggt_config`` is None)."""
        return VGGTAggregatorConfig(**self.vggt_config) if self.vggt_config is not None else VGGTAggregatorConfig()

    @classmethod
    def from_parts(cls, qwen_config, vggt: VGGTAggregatorConfig | None = None, fusion: GeoAlignConfig | None = None,
                   **kwargs) -> "GeoAlignModelConfig":
        """Qwen2.5-VL's config (a Qwen2_5_VLConfig or its dict) + the VGGT and fusion configs."""
        base = qwen_config.to_dict() if hasattr(qwen_config, "to_dict") else dict(qwen_config)
        for key in ("model_type", "architectures", "transformers_version", "auto_map"):
            base.pop(key, None)
        vggt = vggt if vggt is not None else VGGTAggregatorConfig()
        config = cls(**base, vggt_config=vggt.to_dict(), **kwargs)
        attn = getattr(qwen_config, "_attn_implementation", None)
        if attn is not None:
            config._attn_implementation = attn
        config.geoalign_config = (fusion if fusion is not None else default_fusion_config(config, vggt)).to_dict()
        return config


def default_fusion_config(qwen_config, vggt: VGGTAggregatorConfig) -> GeoAlignConfig:
    """The paper's settings (bank = VGGT's latter half, K = 2, G = 4) with D from Qwen's vision tower output and D'
    from VGGT's layer width."""
    vision = qwen_config.vision_config
    D = int(getattr(vision, "out_hidden_size", None) or qwen_config.text_config.hidden_size)
    return GeoAlignConfig(hidden_size=D, geo_dim=vggt.out_dim, bank_layers=tuple(range(vggt.depth // 2, vggt.depth)),
                          geo_depth=vggt.depth)


def check_fits(fusion: GeoAlignConfig, config: GeoAlignModelConfig, vggt: "VGGTAggregator") -> None:
    """The fusion's widths and bank fit Qwen's vision tower and this VGGT (ValueError naming both sides)."""
    vis_out = int(getattr(config.vision_config, "out_hidden_size", None) or config.text_config.hidden_size)
    if fusion.hidden_size != vis_out:
        raise ValueError(f"fusion hidden_size {fusion.hidden_size} != Qwen vision tower output width {vis_out}")
    if fusion.geo_dim != vggt.config.out_dim:
        raise ValueError(f"fusion geo_dim {fusion.geo_dim} != VGGT layer width {vggt.config.out_dim} (2 * embed_dim)")
    if fusion.group_size not in (4, 8):
        raise ValueError(f"fusion group_size must be 4 (images) or 8 (video), got {fusion.group_size}")
    if fusion.is_progressive:
        _check_progressive_fits(fusion, config, vggt)
        return                          # the routed bank (bank_layers, geo_depth) is not built
    if max(fusion.bank_layers) >= vggt.depth:
        raise ValueError(f"fusion bank_layers {list(fusion.bank_layers)} exceed VGGT's {vggt.depth} layers")
    if fusion.bank_selection != "explicit" and fusion.geo_depth != vggt.depth:
        raise ValueError(f"fusion bank_selection={fusion.bank_selection!r} was derived for geo_depth="
                         f"{fusion.geo_depth} layers, but this VGGT has {vggt.depth}; set geo_depth={vggt.depth}")


def _check_progressive_fits(fusion: GeoAlignConfig, config: GeoAlignModelConfig, vggt: "VGGTAggregator") -> None:
    """The progressive fusion's block / layer ids and widths fit Qwen's vision tower, its LLM and this VGGT."""
    vision_depth = int(config.vision_config.depth)
    text_layers = int(config.text_config.num_hidden_layers)
    checks = (("progressive_vit_blocks", fusion.progressive_vit_blocks, vision_depth, "Qwen vision tower blocks"),
              ("progressive_geo_layers", fusion.progressive_geo_layers, vggt.depth, "VGGT layers"),
              ("progressive_inject_layers", fusion.progressive_inject_layers, text_layers, "LLM decoder layers"))
    for name, ids, n, what in checks:
        bad = [i for i in ids if i >= n]
        if bad:
            raise ValueError(f"fusion {name} {list(ids)}: {bad} out of range for the {n} {what}")
    if fusion.progressive_vit_blocks and fusion.progressive_vit_hidden != int(config.vision_config.hidden_size):
        raise ValueError(f"fusion progressive_vit_hidden {fusion.progressive_vit_hidden} != Qwen vision tower width "
                         f"{int(config.vision_config.hidden_size)} (the level mergers read the ViT blocks' outputs)")
    if fusion.progressive_inject_layers and fusion.hidden_size != int(config.text_config.hidden_size):
        raise ValueError(f"fusion progressive_inject_layers needs hidden_size == the LLM width "
                         f"{int(config.text_config.hidden_size)}, got {fusion.hidden_size}")
    if int(config.vision_config.spatial_merge_size) != 2:
        raise ValueError("the progressive fusion's level mergers are 2x2; Qwen's vision tower has "
                         f"spatial_merge_size={int(config.vision_config.spatial_merge_size)}")
