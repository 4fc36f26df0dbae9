"""GeoAlignModelConfig: the whole model's transformers config = Qwen2.5-VL's config + the fusion and VGGT configs.

It *is* a ``Qwen2_5_VLConfig`` (text_config, vision_config, token ids: everything Qwen reads), with three fields more:

  geoalign_config      GeoAlignConfig as a dict (geoalign.GeoAlignConfig: D, D', bank, K, G, H, variants)
  vggt_config          VGGTAggregatorConfig as a dict (the frozen geometry encoder)
  freeze_vision_tower  keep Qwen's vision tower frozen (GeoAlign trains the fusion and the LLM; default True)

Registered with ``AutoConfig`` under model_type ``geoalign_qwen2_5_vl`` when geoalign.modeling is imported.
"""
from __future__ import annotations

from transformers import Qwen2_5_VLConfig

from .config import GeoAlignConfig
from .geometry.config import VGGTAggregatorConfig


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
