"""geoalign/local_paths.py: a relative path from a data file stays inside the folder it is relative to."""
from __future__ import annotations

import json
import os

import pytest

from geoalign.local_paths import resolve_inside


def test_inside_outside_and_absolute(tmp_path):
    root = str(tmp_path / "media")
    assert resolve_inside(root, "a/b.mp4", "video") == os.path.join(root, "a", "b.mp4")
    assert resolve_inside(root + os.sep, "a/../b.mp4", "video") == os.path.join(root, "b.mp4")   # stays inside
    assert resolve_inside(root, "/data/x.mp4", "video") == "/data/x.mp4"                          # named on purpose
    for escape in ("../x.mp4", "a/../../x.mp4", "../media2/x.mp4", ".."):
        with pytest.raises(ValueError, match=f"video {escape!r} lies outside"):
            resolve_inside(root, escape, "video")


def test_a_training_record_cannot_climb_out_of_media_root(tmp_path):
    from geoalign.training.data import RecordError, load_records

    (tmp_path / "media").mkdir()
    (tmp_path / "secret.mp4").write_bytes(b"x")
    rec = {"id": "r1", "video": "../secret.mp4",
           "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    data = tmp_path / "data.json"
    data.write_text(json.dumps([rec]))
    with pytest.raises(RecordError, match=r"record 'r1': video '../secret.mp4' lies outside"):
        load_records([str(data)], media_root=str(tmp_path / "media"))


def test_benchmark_annotations_cannot_climb_out_of_the_data_folder(tmp_path):
    from geoalign.eval import tasks, vsibench
    from geoalign.eval.media import find_scene_media

    with pytest.raises(ValueError, match="VSI-Bench video '../outside/s.mp4' lies outside"):
        vsibench.video_path(str(tmp_path), {"dataset": "../outside", "scene_name": "s"})
    with pytest.raises(ValueError, match="scene '../../etc/passwd.mp4' lies outside"):
        find_scene_media("../../etc/passwd", [str(tmp_path)])
    (tmp_path / "gap_test.json").write_text(json.dumps([{
        "id": "g1", "images": "../elsewhere", "metadata": {"task": "gap_grounding", "target": {}},
        "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]))
    with pytest.raises(ValueError, match="GAP record images '../elsewhere' lies outside"):
        tasks.load_samples("gap", str(tmp_path))
