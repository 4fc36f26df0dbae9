"""The fusion op's benchmark shapes and modes: plain data, importable without torch (`geoalign bench --help` reads
them before anything heavy is imported)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from geoalign.config import GeoAlignConfig

# A 640x480 frame -> 518x392 for VGGT -> 28x37 patches; Qwen's even crop 28x36 -> 14x18 = 252 visual tokens.
VGGT_GRID = (28, 37)
TOKENS_PER_FRAME = 252
MODES = ("fwd", "bwd", "fwdbwd", "infer", "infer-fold")
FLOP_FACTOR = {"fwd": 1, "bwd": 2, "fwdbwd": 3, "infer": 1, "infer-fold": 1}  # backward = 2 forwards (dX, dW)
BASELINE_MODE = {"infer-fold": "infer"}  # the reference has no folded path: compare with its plain inference


@dataclass(frozen=True)
class FusionShape:
    """Widths of the fusion op. `paper` is Qwen2.5-VL-3B + VGGT-1B; `cpu` keeps the paper's ratios at 1/4 width;
    `tiny` is for counting launches and syncs (width-independent) where kernels run slowly (the interpreter)."""

    name: str
    hidden_size: int
    geo_dim: int
    projector_hidden: int
    router_hidden: int
    num_layers: int = 12
    top_k: int = 2
    group_size: int = 4

    def config(self) -> GeoAlignConfig:
        return GeoAlignConfig(hidden_size=self.hidden_size, geo_dim=self.geo_dim,
                              bank_layers=tuple(range(24 - self.num_layers, 24)), top_k=self.top_k,
                              group_size=self.group_size, projector_hidden=self.projector_hidden,
                              router_hidden=self.router_hidden)

    def sparse_macs_per_token(self) -> int:
        """Multiply-adds per visual token of the sparse path (docs/architecture.md, section 2), router included."""
        c = self
        return (c.top_k * c.group_size * c.geo_dim * c.projector_hidden + c.projector_hidden * c.hidden_size
                + c.hidden_size * c.hidden_size + c.hidden_size * c.router_hidden + c.router_hidden * c.num_layers)

    def dense_macs_per_token(self) -> int:
        """Multiply-adds per visual token of the dense bank as the paper writes it."""
        c = self
        return (c.num_layers * (c.group_size * c.geo_dim * c.projector_hidden + c.projector_hidden * c.hidden_size)
                + c.hidden_size * c.hidden_size + c.hidden_size * c.router_hidden + c.router_hidden * c.num_layers)


SHAPES = {
    "paper": FusionShape("paper", 2048, 2048, 4096, 512),
    "cpu": FusionShape("cpu", 512, 512, 1024, 128),
    "tiny": FusionShape("tiny", 64, 48, 96, 32),  # launch / sync counts of Triton under the interpreter
}


def shape_dict(shape: FusionShape) -> dict:
    return asdict(shape) | {"vggt_grid": VGGT_GRID, "tokens_per_frame": TOKENS_PER_FRAME,
                            "sparse_macs_per_token": shape.sparse_macs_per_token(),
                            "dense_macs_per_token": shape.dense_macs_per_token()}
