"""`geoalign demo` (geoalign/demo.py) and the README's "Try it" path that runs every command on its files."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from geoalign.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    return out


def test_demo_writes_what_every_command_reads(demo):
    from geoalign.eval import tasks
    from geoalign.gap.scenes import load_scannet_scene
    from geoalign.geometry.frames import load_frames
    from geoalign.modeling import GeoAlignForConditionalGeneration

    model = GeoAlignForConditionalGeneration.from_pretrained(str(demo / "model"))
    assert model.config.model_type == "geoalign_qwen2_5_vl" and model.fusion.config.top_k == 2
    (video, _, _), (folder, _, _) = load_frames(str(demo / "scene.mp4"), None), load_frames(str(demo / "frames"), None)
    assert len(video) == len(folder) == 8
    assert np.asarray(folder[0]).shape == (96, 128, 3)
    scene = load_scannet_scene(str(demo / "scenes" / "room0"))
    assert len(scene.frame_ids) == 8 and scene.pose.shape == (8, 4, 4) and scene.has_labels
    samples = tasks.load_samples("vsibench", str(demo / "vsibench"), num_frames=8)
    kinds = {s.meta["question_type"] for s in samples}
    assert kinds == {"object_counting", "object_size_estimation", "object_abs_distance"} and len(samples) >= 6


def test_the_questions_answers_are_the_rooms_geometry():
    """Each VSI-Bench answer, recomputed by hand from the room's boxes: counts per label, a lone object's longest
    side in cm, the gap between two lone objects' boxes (closest points) in m."""
    from geoalign.demo import NUM_FRAMES, vsibench_questions
    from geoalign.gap.procedural import OBJECTS, make_box_room

    room = make_box_room(seed=3, num_frames=NUM_FRAMES, height=96, width=128, num_boxes=4)
    names = [OBJECTS[label] for label, _, _ in room.boxes]
    rows = vsibench_questions(room)
    for r in rows:
        if r["question_type"] == "object_counting":
            name = re.search(r"How many (\w+)\(s\)", r["question"]).group(1)
            assert int(r["ground_truth"]) == names.count(name)
        elif r["question_type"] == "object_size_estimation":
            name = re.search(r"of the (\w+), measured", r["question"]).group(1)
            (lo, hi), = [(lo, hi) for (label, lo, hi), n in zip(room.boxes, names) if n == name]
            assert float(r["ground_truth"]) == pytest.approx(max(hi - lo) * 100, abs=0.5)
        else:
            a, b = re.search(r"between the (\w+) and the (\w+) \(in meters\)", r["question"]).groups()
            (la, ha), = [(lo, hi) for (_, lo, hi), n in zip(room.boxes, names) if n == a]
            (lb, hb), = [(lo, hi) for (_, lo, hi), n in zip(room.boxes, names) if n == b]
            gap = [max(0.0, la[i] - hb[i], lb[i] - ha[i]) for i in range(3)]
            assert float(r["ground_truth"]) == pytest.approx(sum(g * g for g in gap) ** 0.5, abs=0.05)
    assert [r["id"] for r in rows] == list(range(len(rows)))


def readme_try_it() -> list[str]:
    """The commands of the README's "Try it" block, in order (comments dropped)."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Try it .*?```bash\n(.*?)```", text, re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


@pytest.mark.slow
def test_the_readme_try_it_commands_run_as_written(tmp_path):
    """Every command of the README's "Try it" block, run as written (a fresh `geoalign` process each, in an empty
    folder), exits 0 and leaves what the next one reads."""
    commands = readme_try_it()
    assert [shlex.split(c)[1] for c in commands] == ["demo", "answer", "routes", "gap-data", "eval", "score"]
    for command in commands:
        argv = shlex.split(command)
        r = subprocess.run([sys.executable, "-m", "geoalign.cli", *argv[1:]], cwd=tmp_path, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, f"{command}\n{r.stderr[-3000:]}"
    assert (tmp_path / "demo" / "routes" / "routing_heatmap.png").is_file()
    assert json.loads((tmp_path / "demo" / "gap" / "pretrain.json").read_text())
    scores = json.loads((tmp_path / "demo" / "eval" / "predictions.scores.json").read_text())
    assert scores["parsing"] == "official"


def test_demo_refuses_a_folder_that_is_not_empty(tmp_path, capsys):
    (tmp_path / "x").write_text("mine")
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert "is not empty" in capsys.readouterr().err and (tmp_path / "x").read_text() == "mine"
