"""bench/report.py's plots: a colour per backend, a line style and marker per mode, x ticks at the measured frame
counts, plain numbers, the legend outside the data (checked through matplotlib's objects after drawing)."""
from __future__ import annotations

import pytest

from figure_helpers import boxes_overlap


def _rows(frames=(1, 2, 3)):
    """Benchmark rows as `geoalign bench` makes them: reference without infer-fold, one out-of-memory row."""
    rows = []
    for b, backend in enumerate(("reference", "torch", "compiled-reference")):
        for m, mode in enumerate(("fwd", "bwd", "fwdbwd", "infer", "infer-fold")):
            if backend == "reference" and mode == "infer-fold":
                continue
            for f in frames:
                ms = 25.0 * (1 + m) * (3 - b) * f ** 1.3
                rows.append({"case": "fusion", "backend": backend, "mode": mode, "frames": f, "median_ms": ms,
                             "peak_bytes": int(ms * 2**19)})
    rows.append({"case": "fusion", "backend": "torch", "mode": "fwd", "frames": 99, "status": "out of memory"})
    return rows


@pytest.mark.parametrize("frames", [(1, 2, 3), (1,), (8, 16, 32, 64)])
def test_plots_read_plainly(frames, tmp_path):
    """Colour per backend, line style + marker per mode, x ticks at the measured frame counts with plain labels,
    plain numbers on the log y axes, the legend outside both panels."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.report import plot_rows, write_plots

    fig = plot_rows(_rows(frames), "fusion | test")
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        axes = fig.get_axes()
        assert len(axes) == 2
        for ax in axes:
            assert list(ax.xaxis.get_majorticklocs()) == list(frames)
            assert [t.get_text() for t in ax.get_xticklabels()] == [str(f) for f in frames]
            assert len(ax.xaxis.get_minorticklocs()) == 0
            lo, hi = ax.get_ylim()
            shown = [(loc, t.get_text()) for loc, t in zip(ax.yaxis.get_majorticklocs(), ax.get_yticklabels())
                     if lo <= loc <= hi]
            assert len(shown) >= 2
            for loc, text in shown:                                 # "600", "1.5": no 10^k, no "×", no mathtext
                assert float(text) == pytest.approx(loc, rel=5e-3), text
            assert not any(t.get_text() for t in ax.yaxis.get_minorticklabels())
            lines = ax.get_lines()
            assert len(lines) == 14                                 # 3 backends x 5 modes, reference without one
            colour, look = {}, {}                                  # backend -> colours, mode -> (dashes, marker)
            for line in lines:
                backend, mode = line.get_label().split(" ")
                colour.setdefault(backend, set()).add(matplotlib.colors.to_hex(line.get_color()))
                # the dash pattern as drawn (Line2D has no public getter; get_linestyle() says '--' for any dashes)
                look.setdefault(mode, set()).add((str(line._unscaled_dash_pattern), line.get_marker()))
            assert all(len(c) == 1 for c in colour.values())        # one colour per backend ...
            assert len(set().union(*colour.values())) == 3          # ... a different one for each
            assert all(len(v) == 1 for v in look.values())          # one look per mode ...
            assert len(set().union(*look.values())) == 5            # ... a different one for each
            assert len({m for (_, m), in look.values()}) == 5       # markers alone tell the modes apart
            by_label = {ln.get_label(): ln for ln in lines}
            fwdbwd, fold = by_label["torch fwdbwd"], by_label["torch infer-fold"]
            assert fwdbwd.get_color() == fold.get_color() and fwdbwd.get_linestyle() != fold.get_linestyle()
        (legend,) = fig.legends
        box = legend.get_window_extent(renderer)
        assert not any(boxes_overlap(box, ax.get_window_extent(renderer)) for ax in axes)
        assert box.x0 >= fig.bbox.x0 and box.x1 <= fig.bbox.x1 and box.y0 >= fig.bbox.y0 and box.y1 <= fig.bbox.y1
        texts = [t.get_text() for t in legend.get_texts()]
        assert {"reference", "torch", "compiled-reference", "fwd", "bwd", "fwdbwd", "infer", "infer-fold"} <= set(texts)
    finally:
        plt.close(fig)
    assert write_plots(str(tmp_path / "fusion.png"), _rows(frames), "fusion | test")
    assert (tmp_path / "fusion.png").stat().st_size > 1000


def test_plain_numbers_and_log_ticks():
    from bench.report import log_ticks, plain_number

    assert [plain_number(v) for v in (600, 1500, 1.5, 0.25, 0.3 + 1e-12, 2e6)] == ["600", "1500", "1.5", "0.25", "0.3",
                                                                                  "2000000"]
    assert log_ticks(25, 2500) == [50, 100, 200, 500, 1000, 2000]
    assert log_ticks(160, 600) == [200, 300, 400, 500, 600]                   # 1-2-5 gives too few: finer
    assert log_ticks(55, 160) == [60, 70, 80, 90, 100, 150]
    assert log_ticks(1, 1e9) == [1, 100, 10**4, 10**6, 10**8]                  # too many: powers of ten, thinned


def test_single_mode_plots_name_the_mode(tmp_path):
    """`--case train`: one mode ('step'), two variants; the legend names the backends and the mode."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.report import plot_rows

    rows = [{"case": "train", "backend": b, "mode": "step", "frames": f, "median_ms": 900.0 * f * (1 + i),
             "peak_bytes": int(3e8 * f)} for i, b in enumerate(("streaming_sparse", "all_layers_dense"))
            for f in (1, 2, 4)]
    fig = plot_rows(rows, "train")
    try:
        fig.canvas.draw()
        texts = [t.get_text() for t in fig.legends[0].get_texts()]
        assert "streaming_sparse" in texts and "all_layers_dense" in texts and any("step" in t for t in texts)
        for ax in fig.get_axes():
            assert list(ax.xaxis.get_majorticklocs()) == [1, 2, 4]
            assert len({ln.get_color() for ln in ax.get_lines()}) == 2
    finally:
        plt.close(fig)
