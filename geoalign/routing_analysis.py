"""Routing analysis (the paper's Figure 3): which VGGT bank layers the router picks, per input, per frame, per token.

    with model.record_routing(keep_tensors=True) as recorder:
        model(**inputs)                              # or model.generate(**inputs, ...): prefill only
    sample = recorder.samples[0]                     # one SampleRouting per sample, in batch order
    sample.summary()                                 # {"mean_alpha_pct": [M], "selection_freq": [M], ...}

Per sample, with w[l, m] = the routing weight token l gives bank layer m (its alpha where m is among its top-K, else
0; the router's softmax makes each token's weights sum to 1):
  mean_alpha_pct[m]          100 * sum_l w[l, m] / sum_{l, m} w[l, m]          (sums to 100, Figure 3's bars)
  selection_freq[m]          fraction of tokens whose top-K holds layer m      (sums to K)
  per_frame_mean_alpha_pct   the same percentage over each frame's patches: token l's weights count once per patch
                             of the G it covers (so with G = 8 a token counts for both frames of its pair)
Kept only on request (``keep_tensors``): topk_idx / alpha [L, K] and each token's patches as (frame, row, column)
of the VGGT patch grid, from gather_index -- what the per-token heat map needs. Summaries are a few hundred floats
per sample, so recording over a whole benchmark is cheap.

Plots (matplotlib): :func:`plot_layer_bars` (Figure 3 style) and :func:`plot_heatmaps` (per frame, the layer with
the highest alpha at each token's patches, over the faded frame).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .routing import Routing


@dataclass
class SampleRouting:
    """One sample's routing at prefill. Shapes: M bank layers, S frames, L tokens, K slots, G patches per token."""

    bank_layers: list[int]                      # VGGT layer id of each bank position
    num_frames: int
    grid: tuple[int, int]                       # VGGT patch grid (rows, columns) of every frame
    mean_alpha: torch.Tensor                    # [M] float64, fractions summing to 1
    selection_freq: torch.Tensor                # [M] float64
    per_frame_mean_alpha: torch.Tensor          # [S, M] float64, rows sum to 1 (0 for a frame without tokens)
    num_tokens: int
    topk_idx: torch.Tensor | None = None        # [L, K] int64 bank positions (keep_tensors)
    alpha: torch.Tensor | None = None           # [L, K] float32
    token_cells: torch.Tensor | None = None     # [L, G, 3] int64 (frame, row, column) of each token's patches

    def summary(self) -> dict:
        """JSON-ready percentages (rounded to 1e-4) and counts."""
        def r(t):
            return [round(float(x), 4) for x in t]

        return {"bank_layers": list(self.bank_layers), "num_frames": self.num_frames, "num_tokens": self.num_tokens,
                "grid": list(self.grid), "mean_alpha_pct": r(100 * self.mean_alpha),
                "selection_freq": r(self.selection_freq),
                "per_frame_mean_alpha_pct": [r(100 * row) for row in self.per_frame_mean_alpha]}

    def top_layer_map(self, frame: int) -> torch.Tensor:
        """[rows, cols] int64: the bank position with the highest alpha of the token covering each patch of
        ``frame``; -1 where no token covers the patch (the Qwen crop leaves an odd last row / column out)."""
        if self.token_cells is None or self.topk_idx is None or self.alpha is None:
            raise ValueError("this SampleRouting kept no tensors: record with keep_tensors=True")
        if not 0 <= frame < self.num_frames:
            raise ValueError(f"frame {frame} out of range: the sample has {self.num_frames} frames")
        top = self.topk_idx.gather(1, self.alpha.argmax(dim=1, keepdim=True)).squeeze(1)       # [L]
        cells = self.token_cells.reshape(-1, 3)
        layer = top.repeat_interleave(self.token_cells.shape[1])
        keep = cells[:, 0] == frame
        out = torch.full(self.grid, -1, dtype=torch.int64)
        out[cells[keep, 1], cells[keep, 2]] = layer[keep]
        return out


def summarize(routing: Routing, gather_index: torch.Tensor, num_frames: int, grid: tuple[int, int],
              bank_layers, keep_tensors: bool = False) -> SampleRouting:
    """A SampleRouting from one sample's Routing (topk_idx, alpha [L, K]) and gather_index [L, G] (rows of the
    flattened [S * rows * cols] VGGT layer)."""
    idx, alpha = routing.topk_idx, routing.alpha.float()
    L, M = idx.shape[0], len(bank_layers)
    if gather_index.shape[0] != L:
        raise ValueError(f"routing has {L} tokens but gather_index has {gather_index.shape[0]} rows")
    w = torch.zeros(L, M, dtype=torch.float64, device=idx.device).scatter_add_(1, idx, alpha.double())
    total = w.sum().clamp_min(1e-30)
    mean_alpha = w.sum(0) / total
    chosen = torch.zeros(L, M, dtype=torch.float64, device=idx.device).scatter_(1, idx, 1.0)
    selection = chosen.mean(0) if L else torch.zeros(M, dtype=torch.float64, device=idx.device)
    gi = gather_index.to(device=idx.device, dtype=torch.int64)
    per_frame_rows = grid[0] * grid[1]
    frames = gi // per_frame_rows                                                   # [L, G]
    G = gi.shape[1]
    per_frame = torch.zeros(num_frames, M, dtype=torch.float64, device=idx.device)
    per_frame.index_add_(0, frames.reshape(-1), w.repeat_interleave(G, dim=0))
    per_frame = per_frame / per_frame.sum(1, keepdim=True).clamp_min(1e-30)
    out = SampleRouting(list(int(b) for b in bank_layers), num_frames, tuple(grid), mean_alpha.cpu(),
                        selection.cpu(), per_frame.cpu(), L)
    if keep_tensors:
        rest = gi % per_frame_rows
        out.topk_idx, out.alpha = idx.cpu(), alpha.cpu()
        out.token_cells = torch.stack([frames, rest // grid[1], rest % grid[1]], dim=-1).cpu()
    return out


@dataclass
class RoutingRecorder:
    """Collects a SampleRouting per fused sample (see :meth:`GeoAlignForConditionalGeneration.record_routing`)."""

    keep_tensors: bool = False
    samples: list[SampleRouting] = field(default_factory=list)

    def add(self, routing: Routing, gather_index: torch.Tensor, images: torch.Tensor, bank_layers) -> None:
        """``images``: the sample's VGGT frames [S, 3, H, W] (14-pixel patches)."""
        from .geometry.frames import PATCH_SIZE

        S, _, H, W = images.shape
        self.samples.append(summarize(routing, gather_index, int(S), (H // PATCH_SIZE, W // PATCH_SIZE),
                                      bank_layers, self.keep_tensors))


def routing_by_group(records: list[dict], key: str = "question_type") -> dict[str, dict]:
    """Prediction records carrying ``routing`` (``geoalign eval --save-routing``) grouped by ``record[key]``
    ("all" when absent): {group: {"n": questions, "bank_layers": [M], "mean_alpha_pct": [M]}}, each the mean of its
    questions' per-layer percentages; groups sorted by name."""
    groups: dict[str, list[list[float]]] = {}
    layers = None
    for r in records:
        routing = r.get("routing")
        if not routing:
            continue
        if layers is None:
            layers = list(routing["bank_layers"])
        elif list(routing["bank_layers"]) != layers:
            raise ValueError(f"record {r.get('id')!r} has bank layers {routing['bank_layers']}, others {layers}")
        groups.setdefault(str(r.get(key) or "all"), []).append(list(routing["mean_alpha_pct"]))
    return {g: {"n": len(v), "bank_layers": layers,
                "mean_alpha_pct": [round(sum(col) / len(v), 4) for col in zip(*v)]} for g, v in sorted(groups.items())}


def format_routing_table(groups: dict[str, dict]) -> str:
    """A text table: one row per group, the mean routing weight (%) per bank layer."""
    if not groups:
        return ""
    layers = next(iter(groups.values()))["bank_layers"]
    width = max(len(g) for g in groups) + 2
    head = "routing (mean alpha %)".ljust(width) + "    n " + "".join(f"{'L' + str(v):>7}" for v in layers)
    rows = [g.ljust(width) + f"{d['n']:>5} " + "".join(f"{x:7.1f}" for x in d["mean_alpha_pct"])
            for g, d in groups.items()]
    return "\n".join([head, *rows])


def _save_png(fig, path: str, dpi: int) -> None:
    """Render to memory, then write atomically (geoalign.atomic_files); closes the figure."""
    import io

    import matplotlib.pyplot as plt

    from .atomic_files import write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    write_bytes(path, buf.getvalue())


def _colours(m: int):
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if m <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(m)]


def plot_layer_bars(summaries: list[dict], names: list[str], path: str) -> None:
    """Figure 3 style: per bank layer, the mean routing weight (%) of each input, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if not summaries:
        raise ValueError("no routing to plot")
    layers = summaries[0]["bank_layers"]
    x = np.arange(len(layers))
    width = 0.8 / len(summaries)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(layers) * max(1, len(summaries)) ** 0.5 + 3), 3.8))
    for i, (s, name) in enumerate(zip(summaries, names)):
        ax.bar(x - 0.4 + width * (i + 0.5), s["mean_alpha_pct"], width, label=name)
    ax.set_xticks(x, [str(v) for v in layers])
    ax.set_xlabel("VGGT layer (bank)")
    ax.set_ylabel("mean routing weight α (%)")
    ax.set_title("Routing over the bank layers, whole visual sequence")
    ax.axhline(100 / len(layers), color="grey", lw=0.8, ls="--", label="uniform")
    ax.legend(fontsize=8, ncol=min(4, len(summaries) + 1))
    fig.tight_layout()
    _save_png(fig, path, dpi=120)


def plot_heatmaps(samples: list[SampleRouting], frames: list[torch.Tensor], names: list[str], path: str,
                  max_frames: int = 4) -> None:
    """Per input (rows) and frame (up to ``max_frames``, evenly spaced), the bank layer with the highest alpha at
    each token's patches, over the frame faded beneath. ``frames``: each input's VGGT frames [S, 3, H, W] in [0, 1]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from .geometry.frames import PATCH_SIZE

    if not samples:
        raise ValueError("no routing to plot")
    layers = samples[0].bank_layers
    colours = _colours(len(layers))
    cols = max(min(max_frames, s.num_frames) for s in samples)
    fig, axes = plt.subplots(len(samples), cols, figsize=(3.2 * cols, 2.6 * len(samples) + 0.6), squeeze=False)
    for r, (s, imgs, name) in enumerate(zip(samples, frames, names)):
        chosen = np.unique(np.linspace(0, s.num_frames - 1, min(cols, s.num_frames)).round().astype(int))
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(chosen):
                continue
            f = int(chosen[c])
            img = imgs[f].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
            H, W = img.shape[:2]
            ax.imshow(img, alpha=0.45)
            top = s.top_layer_map(f).numpy()
            shown = np.ma.masked_less(top, 0)
            ax.imshow(shown, cmap=ListedColormap(colours), vmin=-0.5, vmax=len(layers) - 0.5, alpha=0.55,
                      interpolation="nearest", extent=(0, top.shape[1] * PATCH_SIZE, top.shape[0] * PATCH_SIZE, 0))
            ax.set_xlim(0, W)
            ax.set_ylim(H, 0)
            ax.set_title(f"{name} · frame {f}" if c == 0 else f"frame {f}", fontsize=8)
    fig.legend(handles=[Patch(color=colours[i], label=f"layer {v}") for i, v in enumerate(layers)],
               loc="lower center", ncol=min(len(layers), 8), fontsize=8)
    fig.suptitle("Highest-α bank layer per token", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    _save_png(fig, path, dpi=110)
