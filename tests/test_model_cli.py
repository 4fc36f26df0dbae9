"""`geoalign answer` (model_cli): parser registration, clear errors, and a full run on a tiny saved model (slow)."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

pytest.importorskip("transformers")

from geoalign.cli import main  # noqa: E402
from geoalign.model_cli import add_answer_parser  # noqa: E402


@pytest.fixture
def paths(tmp_path):
    """An (empty) model directory and a video file that exist: what argument parsing checks."""
    (tmp_path / "m").mkdir()
    (tmp_path / "v.mp4").write_bytes(b"")
    return str(tmp_path / "m"), str(tmp_path / "v.mp4")


def test_parser_registers_answer(paths):
    m, v = paths
    parser = argparse.ArgumentParser(prog="geoalign")
    add_answer_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["answer", "--model", m, "--video", v, "--question", "q?"])
    assert args.func.__name__ == "run_answer" and args.num_frames == 32
    with pytest.raises(SystemExit):
        parser.parse_args(["answer", "--model", m, "--video", v, "--images", m, "--question", "q"])


def test_backend_choices_are_every_fusion_backend(paths):
    from geoalign.backends import ALL_BACKENDS

    m, v = paths
    parser = argparse.ArgumentParser(prog="geoalign")
    add_answer_parser(parser.add_subparsers(dest="command", required=True))
    for name in ALL_BACKENDS:
        assert parser.parse_args(["answer", "--model", m, "--video", v, "--question", "q",
                                  "--backend", name]).backend == name


def test_missing_model_is_a_clear_error(tmp_path, paths, capsys):
    rc = main(["answer", "--model", str(tmp_path / "nowhere"), "--video", paths[1], "--question", "q"])
    assert rc == 2
    assert "nowhere" in capsys.readouterr().err
    rc = main(["answer", "--video", paths[1], "--question", "q"])
    assert rc == 2
    assert "give --model DIR, or both --qwen DIR and --vggt PATH" in capsys.readouterr().err


@pytest.mark.slow
def test_answer_runs_on_a_saved_tiny_model(tmp_path, capsys):
    from PIL import Image
    from geoalign.tiny import tiny_model

    from geoalign.processing import GeoAlignProcessor

    m, tok = tiny_model(4, seed=0)
    m.save_pretrained(tmp_path / "model", processor=GeoAlignProcessor(tok, None))
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(3):
        Image.fromarray(np.random.randint(0, 255, (60, 80, 3), dtype=np.uint8)).save(frames / f"{i}.jpg")
    rc = main(["answer", "--model", str(tmp_path / "model"), "--images", str(frames), "--question", "what?",
               "--num-frames", "2", "--max-new-tokens", "2", "--json", "--device", "cpu"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["question"] == "what?" and isinstance(out["answer"], str)
