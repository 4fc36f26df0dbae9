"""End-to-end runner tests on generated miniature datasets, with the deterministic fake predictor."""
import json
import os

import numpy as np
import pytest

from geoalign.eval import cli, media, runner, tasks
from geoalign.eval.fake import FakePredictor
from geoalign.eval.predictor import Predictor, load_predictor

from helpers import VSI_DOCS, lines, make_scanqa, make_sqa3d, make_vsibench

FAKE = "geoalign.eval.fake:FakePredictor"


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def vsi_dir(tmp_path_factory):
    return make_vsibench(tmp_path_factory.mktemp("vsibench"))

@pytest.fixture(scope="module")
def scanqa_dir(tmp_path_factory):
    return make_scanqa(tmp_path_factory.mktemp("scanqa"))

@pytest.fixture(scope="module")
def sqa3d_dir(tmp_path_factory):
    return make_sqa3d(tmp_path_factory.mktemp("sqa3d"))


def test_video_frames_follow_geometry_sampling(vsi_dir):
    # decoding and sampling are geoalign.geometry's: round(linspace(0, 11, 4)) = [0, 4, 7, 11]
    from geoalign.geometry.frames import sample_frame_indices
    assert sample_frame_indices(12, 4) == [0, 4, 7, 11]
    frames = media.load_frames(media.MediaRef(os.path.join(vsi_dir, "scannet", "scene0000_00.mp4"), "video"), 4)
    means = [float(np.asarray(f).mean()) for f in frames]
    assert means == pytest.approx([0, 80, 140, 220], abs=6)
    assert frames[0].dtype == np.uint8 and frames[0].shape == (32, 32, 3)
    assert len(media.load_frames(media.MediaRef(os.path.join(vsi_dir, "scannet", "scene0000_00.mp4"), "video"),
                                 32)) == 12  # shorter clip: all frames


def test_frame_folder_prefers_jpg_colour(scanqa_dir):
    folder = os.path.join(scanqa_dir, "scannet", "posed_images", "scene0011_00")
    files = media.list_frame_files(folder)
    assert len(files) == 10 and all(f.endswith(".jpg") for f in files)
    frames = media.load_frames(media.MediaRef(folder, "frames"), 3)
    assert [float(np.asarray(f).mean()) for f in frames] == pytest.approx([0, 80, 180], abs=6)
    assert all(f.mode == "RGB" for f in frames)


def test_missing_scene_media_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="scene0999_00"):
        media.find_scene_media("scene0999_00", [str(tmp_path)])


# ----------------------------------------------------------------------------- VSI-Bench
def test_vsibench_samples_prompts_and_media(vsi_dir):
    samples = tasks.load_samples("vsibench", vsi_dir, num_frames=4)
    assert len(samples) == len(VSI_DOCS)
    s = samples[4]
    assert s.prompt.startswith("These are frames of a video.\nQuestion 4")
    assert "Options:\nA. chair\nB. table" in s.prompt and s.prompt.endswith("choices directly.")
    assert s.media.path.endswith(os.path.join("scannet", "scene0000_00.mp4"))
    assert samples[0].prompt.endswith("single word or phrase.") and samples[0].max_new_tokens == 16
    assert len(tasks.load_samples("vsibench", vsi_dir, limit=3)) == 3


def test_vsibench_oracle_run_scores_100_and_loads_frames(vsi_dir, tmp_path):
    samples = tasks.load_samples("vsibench", vsi_dir, num_frames=4)
    pred = FakePredictor(mode="oracle", load_frames=True, max_batch_size=3)
    out = str(tmp_path / "p.jsonl")
    info = runner.run_eval(samples, pred, out, batch_size=8, progress=False)
    assert info["written"] == len(VSI_DOCS) and info["batch_size"] == 3
    assert pred.batches == [3, 3, 3, 1] and pred.frames_seen == [4] * len(VSI_DOCS)
    recs = lines(out)
    assert [r["id"] for r in recs] == [str(i) for i in range(len(VSI_DOCS))]
    assert {"question_type", "ground_truth", "prediction", "scene_name", "dataset"} <= set(recs[0])
    s = runner.score_file("vsibench", out)
    assert s["overall"] == pytest.approx(100.0) and s["missing_tasks"] == []


def test_crash_loses_nothing_and_rerun_resumes(vsi_dir, tmp_path):
    samples = tasks.load_samples("vsibench", vsi_dir, num_frames=4)
    out = str(tmp_path / "p.jsonl")
    crashing = FakePredictor(fail_after=5, max_batch_size=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        runner.run_eval(samples, crashing, out, batch_size=2, progress=False)
    assert [r["id"] for r in lines(out)] == ["0", "1", "2", "3"]  # the batch in flight is lost
    with open(out, "a") as f:
        f.write('{"id": "4", "task": "vsib')  # a write torn by the crash
    assert len(runner.read_predictions(out)) == 4
    resumed = FakePredictor(max_batch_size=2)
    info = runner.run_eval(samples, resumed, out, batch_size=2, progress=False)
    assert info["skipped"] == 4 and info["written"] == len(VSI_DOCS) - 4
    assert resumed.answered == len(VSI_DOCS) - 4
    ids = [r["id"] for r in lines(out)]
    assert ids == [str(i) for i in range(len(VSI_DOCS))]
    # a deterministic predictor gives the same file whether or not the run was interrupted
    fresh = str(tmp_path / "fresh.jsonl")
    runner.run_eval(samples, FakePredictor(), fresh, batch_size=2, progress=False)
    assert lines(fresh) == lines(out)
    # nothing left to do: predictor is not called again
    again = FakePredictor()
    assert runner.run_eval(samples, again, out, progress=False)["written"] == 0 and again.batches == []


def test_parquet_annotations(vsi_dir, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    rows = [json.loads(x) for x in open(os.path.join(vsi_dir, "test.jsonl"))]
    d = tmp_path / "vsi_parquet"
    d.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), str(d / "test-00000-of-00001.parquet"))
    samples = tasks.load_samples("vsibench", str(d), media_dir=vsi_dir)
    assert [s.id for s in samples] == [str(r["id"]) for r in rows]
    assert samples[4].meta["options"] == rows[4]["options"]


def test_vsibench_missing_video(vsi_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="scene_name"):
        tasks.load_samples("vsibench", vsi_dir, media_dir=str(tmp_path))


# ----------------------------------------------------------------------------- CLI
def test_cli_eval_resume_and_score(vsi_dir, tmp_path, capsys):
    out = str(tmp_path / "run" / "vsi.jsonl")
    base = ["eval", "vsibench", "--data", vsi_dir, "--predictor", FAKE, "--model", "oracle",
            "--out", out, "--num-frames", "4", "--no-progress", "--batch-size", "4"]
    assert cli.main(base + ["--limit", "3"]) == 0
    assert len(lines(out)) == 3
    assert cli.main(base) == 0
    assert len(lines(out)) == len(VSI_DOCS)
    assert "7 new predictions (3 already" in capsys.readouterr().out
    scores = json.load(open(str(tmp_path / "run" / "vsi.scores.json")))
    assert scores["overall"] == pytest.approx(100.0)
    # other settings on the same file are refused
    other = ["eval", "vsibench", "--data", vsi_dir, "--predictor", FAKE, "--model", "oracle",
             "--out", out, "--num-frames", "8", "--no-progress"]
    assert cli.main(other) == 2
    assert cli.main(other + ["--restart", "--limit", "2"]) == 0  # --restart discards the old file
    assert len(lines(out)) == 2
    assert cli.main(base) == 2  # the file now belongs to the 8-frame settings
    assert cli.main(base + ["--restart"]) == 0 and len(lines(out)) == len(VSI_DOCS)
    capsys.readouterr()
    js = str(tmp_path / "s.json")
    assert cli.main(["score", "vsibench", out, "--json", js]) == 0
    table = capsys.readouterr().out
    assert "Avg." in table and "Appr. Order" in table and "100.0" in table
    assert json.load(open(js))["overall"] == pytest.approx(100.0)
    assert cli.main(["score", "scanqa", out]) == 2  # wrong task for the file


def test_cli_parsers_register_func():
    import argparse
    p = argparse.ArgumentParser()
    sub = p.add_subparsers()
    cli.add_eval_parser(sub)
    cli.add_score_parser(sub)
    a = p.parse_args(["eval", "sqa3d", "--data", "d", "--model", "m"])
    assert a.func is cli.run_eval_command and a.num_frames == 32 and a.batch_size == 1
    assert a.dtype == "auto" and a.attn is None and a.fusion_backend is None
    a = p.parse_args(["eval", "vsibench", "--data", "d", "--model", "m", "--attn", "eager", "--fusion-backend",
                      "triton", "--dtype", "bf16"])
    assert (a.attn, a.fusion_backend, a.dtype) == ("eager", "triton", "bf16")
    assert p.parse_args(["score", "scanqa", "x.jsonl"]).func is cli.run_score_command


def test_model_adapter_reports_missing_model_dir(vsi_dir, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_predictor(str(tmp_path / "nowhere"), device="cpu")
    rc = cli.main(["eval", "vsibench", "--data", vsi_dir, "--model", str(tmp_path / "nowhere"),
                   "--out", str(tmp_path / "p.jsonl"), "--no-progress", "--device", "cpu"])
    assert rc == 2 and "nowhere" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "p.jsonl")


def test_fake_predictor_satisfies_protocol():
    assert isinstance(FakePredictor(), Predictor)


# ----------------------------------------------------------------------------- ScanQA / SQA3D
def test_scanqa_end_to_end(scanqa_dir, tmp_path, capsys):
    samples = tasks.load_samples("scanqa", scanqa_dir, num_frames=3)
    assert [s.media.kind for s in samples] == ["frames", "frames", "video"]
    assert samples[0].prompt == "What color is the chair? Answer the question using a single word or phrase."
    pred = FakePredictor(mode="oracle", load_frames=True)
    out = str(tmp_path / "scanqa.jsonl")
    runner.run_eval(samples, pred, out, batch_size=2, progress=False)
    assert pred.frames_seen == [3, 3, 3]
    s = runner.score_file("scanqa", out, use_java=False)
    assert s["EM@1"] == 100.0 and s["BLEU-1"] == pytest.approx(100.0)
    assert "METEOR" not in s and "meteor_missing_reason" in s
    # CLI with hash answers, Java disabled for speed
    out2 = str(tmp_path / "scanqa2.jsonl")
    assert cli.main(["eval", "scanqa", "--data", scanqa_dir, "--predictor", FAKE, "--model", "x",
                     "--out", out2, "--no-progress", "--no-java"]) == 0
    text = capsys.readouterr().out
    assert "ScanQA" in text and "CIDEr" in text and "METEOR not computed" in text
    assert {"answers", "scene_id", "question", "prediction"} <= set(lines(out2)[0])


def test_sqa3d_end_to_end(sqa3d_dir, tmp_path, capsys):
    samples = tasks.load_samples("sqa3d", sqa3d_dir, num_frames=4)
    assert samples[0].prompt == ("I am sitting on the sofa. What is in front of me? "
                                 "Answer the question using a single word or phrase.")
    assert [s.media.kind for s in samples] == ["video", "video", "frames"]
    assert [s.meta["question_type"] for s in samples] == ["what", "is", "how"]
    out = str(tmp_path / "sqa.jsonl")
    assert cli.main(["eval", "sqa3d", "--data", sqa3d_dir, "--predictor", FAKE, "--model", "oracle",
                     "--out", out, "--no-progress"]) == 0
    assert "Avg. (EM-1)" in capsys.readouterr().out
    s = json.load(open(str(tmp_path / "sqa.scores.json")))
    assert s["EM-1"] == 100.0 and s["EM-1-refined"] == 100.0 and s["num_samples"] == 3
    assert cli.main(["score", "sqa3d", out]) == 0
    assert "EM-1-refined" in capsys.readouterr().out
