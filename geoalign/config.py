"""GeoAlignConfig: the hyper-parameters of the GeoAlign fusion module (paper eqs. 1-8)."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

BACKENDS = ("auto", "reference", "torch", "triton", "cuda")


@dataclass
class GeoAlignConfig:
    """Shapes and options of :class:`geoalign.GeoAlignFusion`.

    hidden_size       D, width of the MLLM's visual tokens Q (Qwen2.5-VL-3B: 2048)
    geo_dim           D', width of one VGGT patch row (concat(frame, global) = 2048)
    bank_layers       VGGT aggregator layer ids that form the bank, in bank order (default 12..23, M = 12)
    top_k             K, layers selected per visual token
    group_size        G, raw patch rows per visual token (4: a frame's 2x2 group; 8: two frames in Qwen's video path)
    projector_hidden  H, hidden width of the shared projector f_phi (VG-LLM's merger uses 4096)
    router_hidden     hidden width of the router f_theta
    layer_norm_eps    eps of the per-layer LayerNorms
    backend           default backend: "auto" (triton on CUDA when available, else torch), "reference", "torch",
                      "triton", "cuda"
    """

    hidden_size: int = 2048
    geo_dim: int = 2048
    bank_layers: Sequence[int] = field(default_factory=lambda: tuple(range(12, 24)))
    top_k: int = 2
    group_size: int = 4
    projector_hidden: int = 4096
    router_hidden: int = 512
    layer_norm_eps: float = 1e-5
    backend: str = "auto"

    def __post_init__(self) -> None:
        self.bank_layers = tuple(int(i) for i in self.bank_layers)
        for name in ("hidden_size", "geo_dim", "top_k", "group_size", "projector_hidden", "router_hidden"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GeoAlignConfig.{name} must be a positive int, got {value!r}")
        if len(self.bank_layers) == 0:
            raise ValueError("GeoAlignConfig.bank_layers must name at least one layer, got an empty list")
        if len(set(self.bank_layers)) != len(self.bank_layers):
            raise ValueError(f"GeoAlignConfig.bank_layers has repeated layers: {self.bank_layers}")
        if any(i < 0 for i in self.bank_layers):
            raise ValueError(f"GeoAlignConfig.bank_layers must be non-negative layer ids, got {self.bank_layers}")
        if self.top_k > self.num_bank_layers:
            raise ValueError(
                f"GeoAlignConfig.top_k must be <= the number of bank layers M={self.num_bank_layers}, got K={self.top_k}"
            )
        if not (isinstance(self.layer_norm_eps, (int, float)) and self.layer_norm_eps > 0):
            raise ValueError(f"GeoAlignConfig.layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        self.layer_norm_eps = float(self.layer_norm_eps)
        if self.backend not in BACKENDS:
            raise ValueError(f"GeoAlignConfig.backend must be one of {BACKENDS}, got {self.backend!r}")

    @property
    def num_bank_layers(self) -> int:
        """M, the number of layers in the bank."""
        return len(self.bank_layers)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["bank_layers"] = list(self.bank_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GeoAlignConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GeoAlignConfig keys: {unknown}; expected a subset of {sorted(known)}")
        return cls(**d)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "geoalign_config.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
        os.replace(tmp, path)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "GeoAlignConfig":
        path = os.path.join(directory, "geoalign_config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no geoalign_config.json in {directory!s}")
        with open(path) as f:
            return cls.from_dict(json.load(f))
