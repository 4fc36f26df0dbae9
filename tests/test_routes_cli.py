"""Routing analysis: the per-sample summaries by hand, what the model records, and ``geoalign routes`` end to end
(JSON + both PNGs for two inputs; clear errors for bad inputs)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from geoalign.routing import Routing  # noqa: E402
from geoalign.routing_analysis import summarize  # noqa: E402
from figure_helpers import boxes_overlap  # noqa: E402


def test_summaries_by_hand():
    # 2 frames of a 2 x 4 patch grid (8 rows each); 3 tokens of G = 4 patches; M = 3 bank layers, K = 2
    gi = torch.tensor([[0, 1, 4, 5],        # token 0: frame 0, the left 2x2 block
                       [2, 3, 6, 7],        # token 1: frame 0, the right 2x2 block
                       [8, 9, 12, 13]])     # token 2: frame 1, the left block (the right block stays uncovered)
    idx = torch.tensor([[0, 2], [1, 0], [2, 1]])
    alpha = torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.9, 0.1]])
    s = summarize(Routing(idx, alpha), gi, num_frames=2, grid=(2, 4), bank_layers=[4, 11, 17], keep_tensors=True)
    w = torch.tensor([[0.75, 0.0, 0.25], [0.5, 0.5, 0.0], [0.0, 0.1, 0.9]], dtype=torch.float64)  # w[l, m]
    torch.testing.assert_close(s.mean_alpha, w.sum(0) / 3)
    torch.testing.assert_close(s.selection_freq, torch.tensor([2, 2, 2], dtype=torch.float64) / 3)
    torch.testing.assert_close(s.per_frame_mean_alpha,
                               torch.stack([(w[0] + w[1]) / 2, w[2]]))          # frame 0: tokens 0, 1; frame 1: 2
    out = s.summary()
    assert out["mean_alpha_pct"] == [41.6667, 20.0, 38.3333] and out["bank_layers"] == [4, 11, 17]
    assert sum(out["mean_alpha_pct"]) == pytest.approx(100)
    assert s.top_layer_map(0).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]   # token 1: a tie 0.5 / 0.5 -> first slot
    assert s.top_layer_map(1).tolist() == [[2, 2, -1, -1], [2, 2, -1, -1]]
    assert s.token_cells[2].tolist() == [[1, 0, 0], [1, 0, 1], [1, 1, 0], [1, 1, 1]]
    with pytest.raises(ValueError, match="out of range"):
        s.top_layer_map(2)
    light = summarize(Routing(idx, alpha), gi, num_frames=2, grid=(2, 4), bank_layers=[4, 11, 17])
    assert light.topk_idx is None and light.summary() == out
    with pytest.raises(ValueError, match="keep_tensors=True"):
        light.top_layer_map(0)
    with pytest.raises(ValueError, match="3 tokens but gather_index has 2"):
        summarize(Routing(idx, alpha), gi[:2], 2, (2, 4), [4, 11, 17])


def test_the_model_records_the_fusions_own_routes_at_prefill_only():
    from geoalign.processing import GeoAlignProcessor
    from geoalign.tiny import tiny_model

    m, tok = tiny_model(4, seed=0)
    m.eval()
    p = GeoAlignProcessor(tok, None, group_size=4, num_frames=2)
    torch.manual_seed(3)
    inputs = p([torch.rand(2, 3, 60, 80), torch.rand(3, 3, 60, 80)], ["a?", "b?"])
    with torch.no_grad():
        with m.without_fusion():
            q = m.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        q = torch.cat(q)
        out = m(**inputs, return_routing=True)
        with m.record_routing() as rec:
            m.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert len(out.routing) == 2 and len(rec.samples) == 2          # one per sample; decoding steps add nothing
    n0 = out.routing[0].num_tokens
    assert n0 + out.routing[1].num_tokens == q.shape[0] and out.routing[1].num_frames == 3
    want = m.fusion.route(q[:n0])
    assert torch.equal(out.routing[0].topk_idx, want.topk_idx)
    torch.testing.assert_close(out.routing[0].alpha, want.alpha.float())
    assert rec.samples[0].topk_idx is None                          # summaries only unless asked
    torch.testing.assert_close(rec.samples[1].mean_alpha, out.routing[1].mean_alpha)
    with pytest.raises(RuntimeError, match="already active"):
        with m.record_routing(), m.record_routing():
            pass


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model whose router is sharpened (so routes depend on content), a video and an image folder."""
    from PIL import Image

    from geoalign.processing import GeoAlignProcessor
    from geoalign.tiny import tiny_model
    from media_helpers import write_video

    root = tmp_path_factory.mktemp("routes")
    m, tok = tiny_model(4, seed=0)
    with torch.no_grad():
        m.fusion.router.fc1.weight.mul_(3)
        m.fusion.router.fc2.weight.mul_(30)
    m.save_pretrained(root / "model", processor=GeoAlignProcessor(tok, None))
    write_video(str(root / "clip.mp4"), n=8, size=70, width=98)
    (root / "room").mkdir()
    for i in range(3):
        a = np.zeros((84, 112, 3), np.uint8)
        a[:, :56], a[:, 56:] = (200, 40, 40), (30, 30, 220)
        a[20 + 5 * i:50 + 5 * i, 30:80] = (20, 200, 20)
        Image.fromarray(a).save(root / "room" / f"{i}.png")
    return root


def _routes(*argv):
    from geoalign.cli import main

    return main(["routes", "--device", "cpu", "--num-frames", "3", "--no-progress", *argv])


def test_routes_writes_json_and_both_pngs_for_two_inputs(saved, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "routes"
    assert _routes("--model", str(saved / "model"), "--video", str(saved / "clip.mp4"), "--images",
                   str(saved / "room"), "--out", str(out)) == 0
    report = json.loads((out / "routing.json").read_text())
    assert [r["name"] for r in report["inputs"]] == ["clip.mp4", "room"]
    for r in report["inputs"]:
        assert r["bank_layers"] == [1, 2, 3] and r["num_frames"] == 3 and r["num_tokens"] > 0
        assert sum(r["mean_alpha_pct"]) == pytest.approx(100, abs=1e-3)
        assert sum(r["selection_freq"]) == pytest.approx(2, abs=1e-3)                    # K = 2
        assert len(r["per_frame_mean_alpha_pct"]) == 3
        assert all(sum(f) == pytest.approx(100, abs=1e-3) for f in r["per_frame_mean_alpha_pct"])
    assert report["inputs"][0]["mean_alpha_pct"] != report["inputs"][1]["mean_alpha_pct"]   # content-aware
    for name, min_size in (("routing_layers.png", (500, 300)), ("routing_heatmap.png", (600, 400))):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] >= min_size[0] and im.size[1] >= min_size[1], im.size
            assert len({tuple(p) for p in np.asarray(im.convert("RGB")).reshape(-1, 3)[::97]}) > 10  # not blank
    assert "most weight on layer" in capsys.readouterr().out


def test_routes_without_matplotlib_writes_the_json_and_says_so(saved, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)          # importlib.util.find_spec then answers None
    out = tmp_path / "o"
    assert _routes("--model", str(saved / "model"), "--images", str(saved / "room"), "--out", str(out)) == 0
    captured = capsys.readouterr()
    assert "matplotlib is not installed, so no PNGs will be drawn (routing.json is written)" in captured.err
    assert "(no PNGs: matplotlib is not installed)" in captured.out
    assert sorted(os.listdir(out)) == ["routing.json"]
    assert json.loads((out / "routing.json").read_text())["inputs"][0]["num_frames"] == 3


def test_routes_bad_inputs_are_clear_errors(saved, tmp_path, capsys):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from geoalign.tiny import make_tokenizer, tiny_qwen_config

    model = str(saved / "model")
    assert _routes("--model", model, "--video", str(tmp_path / "missing.mp4"), "--out", str(tmp_path / "o")) == 2
    assert "missing.mp4' (geoalign reads local files only" in capsys.readouterr().err
    (tmp_path / "bad.mp4").write_bytes(b"not a video at all" * 50)
    assert _routes("--model", model, "--video", str(tmp_path / "bad.mp4"), "--out", str(tmp_path / "o")) == 2
    assert "bad.mp4" in capsys.readouterr().err
    Qwen2_5_VLForConditionalGeneration(tiny_qwen_config(make_tokenizer())).save_pretrained(tmp_path / "qwen")
    assert _routes("--model", str(tmp_path / "qwen"), "--images", str(saved / "room"), "--out",
                   str(tmp_path / "o")) == 2
    assert "not a GeoAlign model" in capsys.readouterr().err
    assert _routes("--model", model, "--out", str(tmp_path / "o")) == 2
    assert "at least one --video" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")


def _fake_sample(num_frames: int, bank_layers, seed: int, grid=(6, 8)):
    """A SampleRouting with tensors: tokens of G = 4 patches (2 x 2 blocks) over every frame, random routes."""
    rows, cols = grid
    g = torch.Generator().manual_seed(seed)
    gi = torch.tensor([[f * rows * cols + (r + dr) * cols + c + dc for dr in (0, 1) for dc in (0, 1)]
                       for f in range(num_frames) for r in range(0, rows, 2) for c in range(0, cols, 2)])
    M, L = len(bank_layers), gi.shape[0]
    idx = torch.stack([torch.randperm(M, generator=g)[:2] for _ in range(L)])
    alpha = torch.rand(L, 2, generator=g).softmax(-1)
    return summarize(Routing(idx, alpha), gi, num_frames, grid, bank_layers, keep_tensors=True)


def _inside(a, b) -> bool:
    return a.x0 >= b.x0 and a.x1 <= b.x1 and a.y0 >= b.y0 and a.y1 <= b.y1


@pytest.mark.parametrize("inputs,frames,max_frames", [(1, 1, 4), (2, 3, 4), (3, 6, 6), (5, 2, 4), (2, 9, 8)])
def test_heatmap_titles_never_overlap_images_and_colours_name_the_layers(inputs, frames, max_frames):
    import matplotlib

    matplotlib.use("Agg")
    import colorsys

    import matplotlib.pyplot as plt

    from geoalign.routing_analysis import heatmaps_figure

    layers = [12, 15, 18, 21, 23]
    samples = [_fake_sample(max(1, frames - i), layers, seed=i) for i in range(inputs)]
    g = torch.Generator().manual_seed(0)
    imgs = [torch.rand(s.num_frames, 3, 84, 112, generator=g) for s in samples]      # saturated noise frames
    names = [f"input number {i} with a long file name.mp4" for i in range(inputs)]
    fig = heatmaps_figure(samples, imgs, names, max_frames=max_frames)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        image_axes = [ax for ax in fig.get_axes() if ax.get_images()]
        assert len(image_axes) == sum(min(max_frames, s.num_frames) for s in samples)
        titles = [ax.title for ax in fig.get_axes() if ax.get_title()]
        titles += [f._suptitle for f in [fig, *fig.subfigs] if getattr(f, "_suptitle", None) is not None]
        assert len(titles) >= len(image_axes) + inputs + 1
        for t in titles:
            box = t.get_window_extent(renderer)
            for ax in image_axes:
                assert not boxes_overlap(box, ax.get_window_extent(renderer)), (t.get_text(), ax.get_title())
        legend = fig.subfigs[-1].legends[0]
        reading = sorted(legend.get_texts(), key=lambda t: (-round(t.get_window_extent(renderer).y0),
                                                            t.get_window_extent(renderer).x0))
        assert [t.get_text() for t in reading] == [f"layer {v}" for v in layers] + ["no token"]   # row by row
        assert all(_inside(t.get_window_extent(renderer), fig.bbox) for t in legend.get_texts())
        assert not any(boxes_overlap(legend.get_window_extent(renderer), ax.get_window_extent(renderer))
                       for ax in image_axes)
        by_label = {t.get_text(): h.get_facecolor()[:3] for t, h in zip(legend.get_texts(), legend.legend_handles)}
        colours = [by_label[f"layer {v}"] for v in layers]
        hues = [colorsys.rgb_to_hsv(*c)[0] for c in colours]
        assert all(colorsys.rgb_to_hsv(*c)[1] > 0.3 for c in colours)           # no grey layer over the grey frame
        # the rendered colour at each covered patch reads as its layer's colour: nearest hue = the true layer
        pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3] / 255.0
        height = pixels.shape[0]
        for sf, s in zip(fig.subfigs, samples):
            ax = [a for a in sf.get_axes() if a.get_images()][-1]
            f = int(ax.get_title().split()[-1])
            top = s.top_layer_map(f)
            for r, c in np.ndindex(*top.shape):
                x, y = ax.transData.transform(((c + 0.5) * 14, (r + 0.5) * 14))
                rgb = pixels[int(round(height - y)), int(round(x))]
                h = colorsys.rgb_to_hsv(*rgb)[0]
                dist = [min(abs(h - q), 1 - abs(h - q)) for q in hues]
                assert int(np.argmin(dist)) == int(top[r, c]), (f, r, c, rgb)
    finally:
        plt.close(fig)


@pytest.mark.parametrize("groups", [1, 2, 7, 15])
def test_layer_bars_legend_sits_outside_the_bars(groups, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from geoalign.routing_analysis import layer_bars_figure, plot_layer_bars

    rng = np.random.default_rng(groups)
    layers = list(range(12, 24))
    summaries = [{"bank_layers": layers, "mean_alpha_pct": list(rng.dirichlet(np.ones(12)) * 100)}
                 for _ in range(groups)]
    names = [f"question_type_{i}_with_a_long_name (n={10 * i + 3})" for i in range(groups)]
    fig = layer_bars_figure(summaries, names)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        (ax,) = fig.get_axes()
        (legend,) = fig.legends
        assert [t.get_text() for t in legend.get_texts()][:groups] == names
        assert not boxes_overlap(legend.get_window_extent(renderer), ax.get_window_extent(renderer))
        assert _inside(legend.get_window_extent(renderer), fig.bbox)
        looks = {(tuple(c.patches[0].get_facecolor()), c.patches[0].get_hatch()) for c in ax.containers}
        assert len(looks) == groups                                              # every group its own look
        assert fig.get_size_inches()[0] <= 24
    finally:
        plt.close(fig)
    plot_layer_bars(summaries, names, str(tmp_path / "bars.png"))
    assert (tmp_path / "bars.png").stat().st_size > 1000
