"""End-to-end runner tests on generated miniature datasets, with the deterministic fake predictor."""
import builtins
import json
import os
import sys
import types

import numpy as np
import pytest

from geoalign import atomic_files
from geoalign.eval import cli, media, runner, scanqa, sqa3d, tasks, vsibench
from geoalign.eval.fake import FakePredictor
from geoalign.eval.predictor import Predictor, load_predictor

from eval_helpers import VSI_DOCS, RecordingPredictor, lines, make_scanqa, make_sqa3d, make_vsibench
from media_helpers import frame_means

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
    from geoalign.geometry.sampling import sample_frame_indices
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


def test_frame_sampling_reaches_frame_loading(vsi_dir, scanqa_dir):
    # 12-frame clip: linspace(0, 11, 4) = [0, 3.67, 7.33, 11] -> floor [0, 3, 7, 11] (VG-LLM), round [0, 4, 7, 11]
    floor = tasks.load_samples("vsibench", vsi_dir, num_frames=4, frame_sampling="linspace-floor")
    assert floor[0].frame_sampling == "linspace-floor"
    assert frame_means(floor[0].load_frames()) == pytest.approx([0, 60, 140, 220], abs=6)
    rounded = tasks.load_samples("vsibench", vsi_dir, num_frames=4)[0]
    assert rounded.frame_sampling == "linspace-round"
    assert frame_means(rounded.load_frames()) == pytest.approx([0, 80, 140, 220], abs=6)
    # a 10-frame folder: linspace(0, 9, 5) = [0, 2.25, 4.5, 6.75, 9] -> floor [0, 2, 4, 6, 9], round [0, 2, 4, 7, 9]
    folder = tasks.load_samples("scanqa", scanqa_dir, num_frames=5, frame_sampling="linspace-floor")[0]
    assert folder.media.kind == "frames"
    assert frame_means(folder.load_frames()) == pytest.approx([0, 40, 80, 120, 180], abs=6)
    with pytest.raises(ValueError, match=r"unknown frame sampling 'nearest'; expected one of "
                                         r"\('linspace-round', 'linspace-floor'\)"):
        tasks.load_samples("vsibench", vsi_dir, frame_sampling="nearest")


def test_cli_frame_sampling_reaches_the_predictor_and_the_meta(scanqa_dir, tmp_path, capsys):
    out = str(tmp_path / "p.jsonl")
    args = ["eval", "scanqa", "--data", scanqa_dir, "--predictor", "eval_helpers:RecordingPredictor", "--model", "x",
            "--out", out, "--no-progress", "--no-score", "--num-frames", "5"]
    RecordingPredictor.seen.clear()
    assert cli.main(args + ["--frame-sampling", "linspace-floor"]) == 0
    assert [s.frame_sampling for s in RecordingPredictor.seen] == ["linspace-floor"] * 3
    assert frame_means(RecordingPredictor.seen[0].load_frames()) == pytest.approx([0, 40, 80, 120, 180], abs=6)
    assert json.load(open(out + ".meta.json"))["frame_sampling"] == "linspace-floor"
    capsys.readouterr()
    assert cli.main(args) == 2  # answers of the other sampling are not mixed in
    assert "'frame_sampling': ('linspace-floor', 'linspace-round')" in capsys.readouterr().err
    # a meta file from before the option existed stands for the default sampling
    meta = json.load(open(out + ".meta.json"))
    del meta["frame_sampling"]
    json.dump(meta, open(out + ".meta.json", "w"))
    assert cli.main(args) == 0 and cli.main(args + ["--frame-sampling", "linspace-floor"]) == 2


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


class SpacedOracle(FakePredictor):
    """Oracle answers with a leading space and a trailing newline, as a decoder may return them."""

    def predict(self, samples):
        return [f" {a}\n" for a in super().predict(samples)]


def test_predictions_are_stored_raw_and_scoring_decides_how_to_parse(vsi_dir, tmp_path, capsys):
    samples = tasks.load_samples("vsibench", vsi_dir, num_frames=4)
    out = str(tmp_path / "p.jsonl")
    runner.run_eval(samples, SpacedOracle(mode="oracle"), out, progress=False)
    assert lines(out)[4]["prediction"] == " B.\n" and lines(out)[0]["prediction"] == " 3\n"
    # official (the default, thinking-in-space = lmms-eval <= 0.7.2) parses the raw answer:
    # " B.".split(" ")[0] == "" and " 3".split(" ")[0] == "": every answer is wrong
    raw = runner.score_file("vsibench", out)
    assert raw["overall"] == 0.0 and raw["parsing"] == "official"
    stripped = runner.score_file("vsibench", out, vsibench_parsing="stripped")
    assert stripped["overall"] == pytest.approx(100.0) and stripped["parsing"] == "stripped"
    js = str(tmp_path / "stripped.json")
    assert cli.main(["score", "vsibench", out, "--vsibench-parsing", "stripped", "--json", js]) == 0
    assert json.load(open(js))["overall"] == pytest.approx(100.0) and json.load(open(js))["parsing"] == "stripped"
    assert "answers stripped before the official parsing" in capsys.readouterr().out
    assert cli.main(["score", "vsibench", out, "--json", js]) == 0
    assert json.load(open(js))["overall"] == 0.0 and json.load(open(js))["parsing"] == "official"


def debiased_copy(vsi_dir, tmp_path, name, content):
    """A VSI-Bench folder with the annotations of ``vsi_dir`` plus ``name`` (a debiased-subset file)."""
    d = tmp_path / "vsi"
    d.mkdir(exist_ok=True)
    (d / "test.jsonl").write_text(open(os.path.join(vsi_dir, "test.jsonl")).read())
    if name.endswith(".parquet"):
        write_parquet(str(d / name), content)
    else:
        (d / name).write_text(content)
    return str(d)


def test_vsibench_debiased_subset(vsi_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--vsibench-subset debiased needs test_debiased\.parquet or "
                                                r"pruned_ids\.txt in ") as e:
        tasks.load_samples("vsibench", vsi_dir, vsibench_subset="debiased")
    assert repr(vsi_dir) in str(e.value) and "nyu-visionx/VSI-Bench" in str(e.value)
    with pytest.raises(ValueError, match=r"unknown VSI-Bench subset 'easy'; expected one of \('full', 'debiased'\)"):
        vsibench.load_docs(vsi_dir, "easy")
    # pruned_ids.txt: the debiased set is every question not listed, in the test set's order
    d = debiased_copy(vsi_dir, tmp_path, "pruned_ids.txt", "1\n4\n\n7\n")
    samples = tasks.load_samples("vsibench", d, media_dir=vsi_dir, vsibench_subset="debiased")
    assert [s.id for s in samples] == ["0", "2", "3", "5", "6", "8", "9"]
    assert len(tasks.load_samples("vsibench", d, media_dir=vsi_dir)) == len(VSI_DOCS)  # full by default
    (tmp_path / "vsi" / "pruned_ids.txt").write_text("1\n99\n")
    with pytest.raises(ValueError, match=r"pruned_ids\.txt lists 1 question id\(s\) that the test set does not "
                                         r"have \(e\.g\. \['99'\]\)"):
        vsibench.load_docs(d, "debiased")


def test_vsibench_debiased_parquet(vsi_dir, tmp_path):
    pytest.importorskip("pyarrow")
    rows = [json.loads(x) for x in open(os.path.join(vsi_dir, "test.jsonl"))]
    d = debiased_copy(vsi_dir, tmp_path, "test_debiased.parquet", [rows[i] for i in (2, 3, 9)])
    assert [x["id"] for x in vsibench.load_docs(d, "debiased")] == [2, 3, 9]
    # without test.jsonl the full set is the other test parquet, never the subset files
    os.remove(os.path.join(d, "test.jsonl"))
    write_parquet(os.path.join(d, "test_pruned.parquet"), [rows[i] for i in (0, 1)])
    with pytest.raises(FileNotFoundError, match="no VSI-Bench annotations"):
        vsibench.load_docs(d)
    write_parquet(os.path.join(d, "test-00000-of-00001.parquet"), rows)
    assert [x["id"] for x in vsibench.load_docs(d)] == list(range(len(VSI_DOCS)))
    assert [x["id"] for x in vsibench.load_docs(d, "debiased")] == [2, 3, 9]


def test_cli_debiased_subset_reuses_full_answers(vsi_dir, tmp_path, capsys):
    d = debiased_copy(vsi_dir, tmp_path, "pruned_ids.txt", "0\n5\n")
    out = str(tmp_path / "p.jsonl")
    base = ["eval", "vsibench", "--data", d, "--media", vsi_dir, "--predictor", FAKE, "--model", "x", "--out", out,
            "--no-progress"]
    assert cli.main(base) == 0
    full = json.load(open(str(tmp_path / "p.scores.json")))
    assert full["num_samples"] == len(VSI_DOCS) and full["subset"] == "full"
    capsys.readouterr()
    assert cli.main(base + ["--vsibench-subset", "debiased"]) == 0   # same questions and prompts: nothing to redo
    text = capsys.readouterr().out
    assert "0 new predictions (8 already" in text and text.split("\n")[1].startswith("VSI-Bench-Debiased (")
    scores = json.load(open(str(tmp_path / "p.scores.json")))
    assert scores["num_samples"] == 8 and scores["subset"] == "debiased"
    assert scores["counts"] == {qt: 1 for qt, *_ in VSI_DOCS[1:5] + VSI_DOCS[6:]}


# ----------------------------------------------------------------------------- shards (several processes)
def shard_names(out):
    return [os.path.basename(p) for _, _, p in runner.shard_files(out)]


def test_shards_merge_into_the_one_process_file(vsi_dir, tmp_path):
    samples = tasks.load_samples("vsibench", vsi_dir, num_frames=4)
    one = str(tmp_path / "one.jsonl")
    runner.run_eval(samples, FakePredictor(), one, progress=False)
    out = str(tmp_path / "two.jsonl")
    for rank in (1, 0):  # any order
        info = runner.run_eval(samples, FakePredictor(), out, batch_size=2, progress=False, rank=rank, world_size=2)
        assert info["written"] == info["total"] == 5
    assert not os.path.exists(out) and shard_names(out) == ["two.rank0-of-2.jsonl", "two.rank1-of-2.jsonl"]
    assert [r["id"] for r in lines(str(tmp_path / "two.rank1-of-2.jsonl"))] == ["1", "3", "5", "7", "9"]
    runner.write_status(out, 1, 2, {"ok": True})
    assert runner.merge_shards(out, [s.id for s in samples]) == 2
    assert open(out, "rb").read() == open(one, "rb").read()  # same records, same order, same bytes
    assert runner.shard_files(out) == [] and runner.shard_files(out, "status.json") == []
    assert runner.merge_shards(out, [s.id for s in samples]) == 0 and open(out, "rb").read() == open(one, "rb").read()


def test_resume_across_a_change_of_the_number_of_processes(vsi_dir, tmp_path):
    samples = tasks.load_samples("vsibench", vsi_dir, num_frames=4)
    ids = [s.id for s in samples]
    one = str(tmp_path / "one.jsonl")
    runner.run_eval(samples, FakePredictor(), one, progress=False)
    out = str(tmp_path / "p.jsonl")
    # 2 processes: rank 1 crashes after 1 answer, rank 0 is stopped after 3 (a cut line left behind)
    with pytest.raises(RuntimeError, match="simulated crash"):
        runner.run_eval(samples, FakePredictor(fail_after=1, max_batch_size=1), out, progress=False, rank=1,
                        world_size=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        runner.run_eval(samples, FakePredictor(fail_after=3, max_batch_size=1), out, progress=False, rank=0,
                        world_size=2)
    with open(str(tmp_path / "p.rank0-of-2.jsonl"), "a") as f:
        f.write('{"id": "6", "task": "vsi')
    assert runner.answered_ids(out, 0, 3) == {"0", "2", "4", "1"}
    # 3 processes: only what is missing, each rank its positions i % 3
    answered = []
    for rank in range(3):
        pred = FakePredictor()
        info = runner.run_eval(samples, pred, out, progress=False, rank=rank, world_size=3)
        answered += [s.id for s in samples[rank::3] if s.id not in {"0", "2", "4", "1"}]
        assert pred.answered == info["written"] and info["skipped"] + info["written"] == info["total"]
    assert sorted(answered, key=int) == ["3", "5", "6", "7", "8", "9"]
    assert runner.merge_shards(out, ids) == 5 and open(out, "rb").read() == open(one, "rb").read()
    # a partial 3-process run on top of a merged file, finished by one process
    os.remove(out)
    runner.run_eval(samples[:4], FakePredictor(), out, progress=False)  # answers 0-3 in the predictions file
    runner.run_eval(samples, FakePredictor(), out, progress=False, rank=2, world_size=3)  # 5 and 8
    pred = FakePredictor()
    assert runner.run_eval(samples, pred, out, progress=False)["written"] == 4 and pred.answered == 4
    runner.merge_shards(out, ids)
    assert open(out, "rb").read() == open(one, "rb").read()


def test_merge_keeps_other_records_and_first_occurrences(vsi_dir, tmp_path):
    samples = tasks.load_samples("vsibench", vsi_dir, num_frames=4)
    out = str(tmp_path / "p.jsonl")
    atomic_files.append_jsonl(out, [{"id": "x", "task": "vsibench", "prediction": "extra"},
                                    {"id": "3", "task": "vsibench", "prediction": "first"}])
    atomic_files.append_jsonl(runner.shard_path(out, 1, 2), [{"id": "3", "task": "vsibench", "prediction": "later"},
                                                             {"id": "1", "task": "vsibench", "prediction": "b"}])
    runner.merge_shards(out, [s.id for s in samples])
    assert [(r["id"], r["prediction"]) for r in lines(out)] == [("1", "b"), ("3", "first"), ("x", "extra")]


def test_shard_names_and_discovery(tmp_path):
    out = str(tmp_path / "preds.jsonl")
    assert runner.shard_path(out, 3, 8) == str(tmp_path / "preds.rank3-of-8.jsonl")
    assert runner.status_path(out, 3, 8) == str(tmp_path / "preds.rank3-of-8.status.json")
    assert runner.shard_path(str(tmp_path / "preds"), 0, 2) == str(tmp_path / "preds.rank0-of-2.jsonl")
    for name in ("preds.rank1-of-2.jsonl", "preds.rank0-of-2.jsonl", "preds.rank10-of-12.jsonl",
                 "preds.rank0-of-2.status.json", "preds.rank0-of-2.jsonl.tmp", "preds.rankX-of-2.jsonl",
                 "other.rank0-of-2.jsonl", "preds.jsonl"):
        (tmp_path / name).write_text("")
    assert runner.shard_files(out) == [(2, 0, str(tmp_path / "preds.rank0-of-2.jsonl")),
                                       (2, 1, str(tmp_path / "preds.rank1-of-2.jsonl")),
                                       (12, 10, str(tmp_path / "preds.rank10-of-12.jsonl"))]
    assert shard_names(str(tmp_path / "nowhere" / "p.jsonl")) == []
    runner.remove_shards(out, kinds=("status.json",))
    assert not (tmp_path / "preds.rank0-of-2.status.json").exists() and len(runner.shard_files(out)) == 3


def test_rank0_waits_for_every_rank_and_stops_at_a_failure(tmp_path):
    out = str(tmp_path / "p.jsonl")
    runner.write_status(out, 2, 3, {"ok": True, "written": 1})
    done = []

    def finish_rank1():  # rank 1 finishes while rank 0 waits
        runner.write_status(out, 1, 3, {"ok": True, "written": 2})
        done.append(1)
    import threading
    t = threading.Timer(0.05, finish_rank1)
    t.start()
    assert runner.wait_for_ranks(out, 3, poll_s=0.01) == {1: {"ok": True, "written": 2}, 2: {"ok": True, "written": 1}}
    t.join()
    assert done == [1]
    out2 = str(tmp_path / "q.jsonl")
    runner.write_status(out2, 2, 3, {"ok": False, "error": "RuntimeError: boom"})  # rank 1 still running
    assert runner.wait_for_ranks(out2, 3, poll_s=0.01) == {2: {"ok": False, "error": "RuntimeError: boom"}}


def test_process_info_and_devices():
    from geoalign.eval.distributed import ProcessInfo, process_info

    assert process_info({}) == ProcessInfo(0, 1, 0) and not process_info({}).sharded
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    info = process_info(env)
    assert info == ProcessInfo(3, 4, 1) and info.sharded
    assert info.device(None, cuda_available=True) == "cuda:1" and info.device("cuda") == "cuda:1"
    assert info.device(None, cuda_available=False) == "cpu"
    assert info.device("cuda:0") == "cuda:0" and info.device("cpu") == "cpu"
    assert ProcessInfo().device(None) is None and ProcessInfo().device("cuda") == "cuda"  # one process: as given
    with pytest.raises(ValueError, match=r"RANK must be in \[0, WORLD_SIZE=4\), got RANK=4"):
        process_info(dict(env, RANK="4"))
    with pytest.raises(ValueError, match="environment variable WORLD_SIZE='two' must be an integer"):
        process_info(dict(env, WORLD_SIZE="two"))
    with pytest.raises(ValueError, match="WORLD_SIZE=4 but MASTER_ADDR and MASTER_PORT not set: start the ranks "
                                         "with torchrun or accelerate launch"):
        process_info({"RANK": "0", "WORLD_SIZE": "4"})


def test_cli_settings_check_and_restart_cover_shards(vsi_dir, tmp_path, capsys):
    out = str(tmp_path / "p.jsonl")
    base = ["eval", "vsibench", "--data", vsi_dir, "--predictor", FAKE, "--model", "x", "--out", out, "--no-progress",
            "--num-frames", "4"]
    assert cli.main(base + ["--limit", "2"]) == 0
    os.rename(out, runner.shard_path(out, 0, 2))  # as a stopped 2-process run leaves them
    runner.write_status(out, 1, 2, {"ok": False, "error": "stale"})
    assert cli.main(base[:-1] + ["8"]) == 2  # its answers are of 4 frames
    assert "other settings {'num_frames': (4, 8)}" in capsys.readouterr().err
    assert cli.main(base) == 0 and "8 new predictions (2 already" in capsys.readouterr().out
    assert shard_names(out) == [] and runner.shard_files(out, "status.json") == [] and len(lines(out)) == 10
    os.rename(out, runner.shard_path(out, 1, 3))
    assert cli.main(base[:-1] + ["8", "--restart"]) == 0  # --restart discards the shards too
    assert "10 new predictions (0 already" in capsys.readouterr().out and shard_names(out) == []


def test_cli_without_a_launcher_says_so(vsi_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    out = str(tmp_path / "p.jsonl")
    assert cli.main(["eval", "vsibench", "--data", vsi_dir, "--predictor", FAKE, "--model", "x", "--out", out]) == 2
    assert "WORLD_SIZE=2 but MASTER_ADDR" in capsys.readouterr().err and not os.path.exists(out)


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


# ----------------------------------------------------------------------------- annotation files
@pytest.fixture
def latin1_locale(monkeypatch):
    """``open`` as on a machine whose locale encoding is Latin-1: a text file opened without an explicit
    encoding is decoded as Latin-1 (so UTF-8 annotations would come out garbled)."""
    def open_latin1(file, mode="r", *args, encoding=None, **kwargs):
        if "b" not in mode and encoding is None:
            encoding = "latin-1"
        return builtins.open(file, mode, *args, encoding=encoding, **kwargs)
    for module in (vsibench, scanqa, sqa3d):
        monkeypatch.setattr(module, "open", open_latin1, raising=False)


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def vsi_rows(split, n, start=0):
    return [{"id": start + i, "dataset": "scannet", "scene_name": "scene0000_00", "question_type": "route_planning",
             "question": f"{split} question {start + i}?", "options": ["A. left", "B. right"], "ground_truth": "A"}
            for i in range(n)]


def test_vsibench_alternative_jsonl_name_and_utf8(tmp_path, latin1_locale):
    rows = [{"id": 0, "question_type": "object_counting", "question": "How many caf\u00e9 chairs?",
             "ground_truth": "3", "dataset": "scannet", "scene_name": "scene0000_00"}]
    (tmp_path / "test_vsibench.jsonl").write_text(json.dumps(rows[0], ensure_ascii=False) + "\n\n", encoding="utf-8")
    docs = vsibench.load_docs(str(tmp_path))
    assert [d["question"] for d in docs] == ["How many caf\u00e9 chairs?"] and docs[0]["options"] is None


def test_vsibench_parquet_only_the_test_split(tmp_path):
    pytest.importorskip("pyarrow")
    # the HF dataset repo layout: data/{split}-*.parquet; every test shard is read, in order, and no other split
    hf = tmp_path / "hf"
    write_parquet(str(hf / "data" / "test-00001-of-00002.parquet"), vsi_rows("test", 2, start=2))
    write_parquet(str(hf / "data" / "test-00000-of-00002.parquet"), vsi_rows("test", 2))
    write_parquet(str(hf / "data" / "train-00000-of-00001.parquet"), vsi_rows("train", 3, start=10))
    docs = vsibench.load_docs(str(hf))
    assert [d["id"] for d in docs] == [0, 1, 2, 3] and all(d["question"].startswith("test") for d in docs)
    # the same with the shards at the top level
    top = tmp_path / "top"
    write_parquet(str(top / "test-00000-of-00001.parquet"), vsi_rows("test", 2))
    write_parquet(str(top / "train-00000-of-00001.parquet"), vsi_rows("train", 3, start=10))
    assert [d["id"] for d in vsibench.load_docs(str(top))] == [0, 1]
    # shards not named by split: all of them
    plain = tmp_path / "plain"
    write_parquet(str(plain / "data" / "vsibench.parquet"), vsi_rows("test", 3))
    assert [d["id"] for d in vsibench.load_docs(str(plain))] == [0, 1, 2]


def test_vsibench_missing_annotations_say_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"test\.jsonl or \*\.parquet") as e:
        vsibench.load_docs(str(tmp_path))
    assert repr(str(tmp_path)) in str(e.value) and "nyu-visionx/VSI-Bench" in str(e.value)


def fake_pandas(pq):
    """A stand-in for pandas (not a dependency) with pandas' behaviour for what VSI-Bench loading uses:
    ``read_parquet(path)``, ``DataFrame.to_dict(orient)`` (orient case-insensitive, default "dict"); list
    columns come back as numpy arrays, as pandas returns them."""
    class DataFrame:
        def __init__(self, rows):
            self.rows = rows

        def to_dict(self, orient="dict"):
            orient = orient.lower()
            if orient == "records":
                return [{k: np.array(v) if isinstance(v, list) else v for k, v in r.items()} for r in self.rows]
            if orient == "dict":
                return {k: {i: r[k] for i, r in enumerate(self.rows)} for k in self.rows[0]}
            raise ValueError(f"orient '{orient}' not understood")

    module = types.ModuleType("pandas")
    module.read_parquet = lambda path: DataFrame(pq.read_table(path).to_pylist())
    return module


def test_vsibench_parquet_through_pandas(tmp_path, monkeypatch):
    pq = pytest.importorskip("pyarrow.parquet")
    rows = vsi_rows("test", 2) + [dict(vsi_rows("test", 1, start=2)[0], question_type="object_counting",
                                       options=None, ground_truth="3")]
    write_parquet(str(tmp_path / "test-00000-of-00002.parquet"), rows[:2])
    write_parquet(str(tmp_path / "test-00001-of-00002.parquet"), rows[2:])
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # no pyarrow: pandas reads the shards
    monkeypatch.setitem(sys.modules, "pandas", fake_pandas(pq))
    docs = vsibench.load_docs(str(tmp_path))
    assert [d["id"] for d in docs] == [0, 1, 2]
    assert type(docs[0]["options"]) is list and docs[0]["options"] == ["A. left", "B. right"]
    assert docs[2]["options"] is None
    assert vsibench.build_prompt(docs[0]).endswith("Options:\nA. left\nB. right\n"
                                                   "Answer with the option's letter from the given choices directly.")


def test_vsibench_parquet_without_a_reader_says_what_to_install(tmp_path, monkeypatch):
    pytest.importorskip("pyarrow")
    path = str(tmp_path / "test-00000-of-00001.parquet")
    write_parquet(path, vsi_rows("test", 1))
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match="`pip install pyarrow`, or provide test.jsonl") as e:
        vsibench.load_docs(str(tmp_path))
    assert f"reading {path} needs 'pyarrow'" in str(e.value)


def scanqa_doc(qid, answer="caf\u00e9 table"):
    return {"question_id": qid, "scene_id": "scene0011_00", "question": "What is it?", "answers": [answer]}


def test_scanqa_annotation_files(tmp_path, latin1_locale):
    (tmp_path / "qa").mkdir()
    (tmp_path / "qa" / "ScanQA_v1.0_val.json").write_text(json.dumps([scanqa_doc("val-0")], ensure_ascii=False),
                                                          encoding="utf-8")
    (tmp_path / "qa" / "ScanQA_v1.0_test_w_obj.json").write_text("[]")
    (tmp_path / "ScanQA_v1.0_train.json").write_text(json.dumps([scanqa_doc("train-0", "two")]))
    d = str(tmp_path)
    assert scanqa.annotation_file(d) == os.path.join(d, "qa", "ScanQA_v1.0_val.json")  # val by default
    assert scanqa.load_docs(d) == [scanqa_doc("val-0")]  # read as UTF-8 whatever the locale
    assert [x["question_id"] for x in scanqa.load_docs(d, "train")] == ["train-0"]
    with pytest.raises(FileNotFoundError, match="ScanQA_v1.0_test.json") as e:
        scanqa.load_docs(d, "test")
    assert repr(d) in str(e.value)


def test_scanqa_split_without_answers_names_the_question(tmp_path):
    docs = [scanqa_doc("test-0"), {"question_id": "test-1", "scene_id": "scene0011_00", "question": "What?"}]
    (tmp_path / "ScanQA_v1.0_test.json").write_text(json.dumps(docs))
    with pytest.raises(ValueError, match="test-1: no 'answers'"):
        scanqa.load_docs(str(tmp_path), "test")


def write_sqa3d(folder, split, answers, question="Where is the caf\u00e9 table?"):
    """SQA3D question + annotation files of ``split`` in ``folder``; ``answers``: per question, its answers
    as stored (dicts as in the official release, or plain strings); None leaves the question unannotated."""
    os.makedirs(folder, exist_ok=True)
    qs = [{"question_id": 100 + i, "scene_id": "scene0050_00", "situation": "I sit.", "question": question}
          for i in range(len(answers))]
    anns = [{"question_id": q["question_id"], "scene_id": q["scene_id"], "answers": a}
            for q, a in zip(qs, answers) if a is not None]
    with open(os.path.join(folder, f"v1_balanced_questions_{split}_scannetv2.json"), "w", encoding="utf-8") as f:
        json.dump({"questions": qs}, f, ensure_ascii=False)
    with open(os.path.join(folder, f"v1_balanced_sqa_annotations_{split}_scannetv2.json"), "w",
              encoding="utf-8") as f:
        json.dump({"annotations": anns}, f, ensure_ascii=False)


def test_sqa3d_annotation_layouts_and_answer_formats(tmp_path, latin1_locale):
    official = [[{"answer": "caf\u00e9 table", "answer_confidence": "yes", "answer_id": 1}]]
    write_sqa3d(str(tmp_path / "flat"), "test", official)
    write_sqa3d(str(tmp_path / "flat"), "val", [["sofa"]])
    docs = sqa3d.load_docs(str(tmp_path / "flat"))  # test split by default, files directly in the folder
    assert [(d["question_id"], d["answers"], d["question"]) for d in docs] == [
        (100, ["caf\u00e9 table"], "Where is the caf\u00e9 table?")]
    assert docs[0]["question_type"] == "others"
    assert sqa3d.load_docs(str(tmp_path / "flat"), "val")[0]["answers"] == ["sofa"]  # plain-string answers
    write_sqa3d(str(tmp_path / "release" / "sqa_task" / "balanced"), "test", [["left", "left side"]])
    assert sqa3d.load_docs(str(tmp_path / "release"))[0]["answers"] == ["left", "left side"]


def test_sqa3d_missing_files_and_annotations_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="v1_balanced_questions_test_scannetv2.json") as e:
        sqa3d.load_docs(str(tmp_path))
    assert repr(str(tmp_path)) in str(e.value)
    write_sqa3d(str(tmp_path / "balanced"), "test", [["yes"], None])
    with pytest.raises(ValueError, match="question 101 has no annotation"):
        sqa3d.load_docs(str(tmp_path))


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


def test_cli_parsers_register_func(tmp_path):
    import argparse
    d = str(tmp_path)                           # --data must exist (local files only); --model is checked later
    p = argparse.ArgumentParser()
    sub = p.add_subparsers()
    cli.add_eval_parser(sub)
    cli.add_score_parser(sub)
    a = p.parse_args(["eval", "sqa3d", "--data", d, "--model", "m"])
    # --batch-size unset: 1 for the transformers engine, 64 for vLLM (decided when the engine is known)
    assert a.func is cli.run_eval_command and a.num_frames == 32 and a.batch_size is None
    assert a.engine == "transformers" and a.tensor_parallel_size is None and a.vllm_kwargs is None
    assert a.dtype == "auto" and a.attn is None and a.fusion_backend is None
    a = p.parse_args(["eval", "vsibench", "--data", d, "--model", "m", "--attn", "eager", "--fusion-backend",
                      "triton", "--dtype", "bf16"])
    assert (a.attn, a.fusion_backend, a.dtype) == ("eager", "triton", "bf16")
    from geoalign.backends import ALL_BACKENDS
    for name in ALL_BACKENDS:  # cuda included
        assert p.parse_args(["eval", "vsibench", "--data", d, "--model", "m", "--fusion-backend",
                             name]).fusion_backend == name
    assert p.parse_args(["score", "scanqa", d]).func is cli.run_score_command


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


def test_cli_sqa3d_vg_llm_style(sqa3d_dir, tmp_path, capsys):
    out = str(tmp_path / "sqa.jsonl")
    args = ["eval", "sqa3d", "--data", sqa3d_dir, "--predictor", "eval_helpers:RecordingPredictor", "--model", "oracle",
            "--out", out, "--no-progress", "--sqa3d-style", "vg-llm"]
    RecordingPredictor.seen.clear()
    assert cli.main(args) == 0
    first = RecordingPredictor.seen[0]
    assert first.prompt == ("Carefully watch the video and answer the question.\nI am sitting on the sofa. What is in "
                            "front of me?\nPlease answer the question using a single word or phrase.")
    assert [s.max_new_tokens for s in RecordingPredictor.seen] == [16] * 3  # VG-LLM's sqa3d.yaml budget
    assert json.load(open(out + ".meta.json"))["sqa3d_style"] == "vg-llm"
    s = json.load(open(str(tmp_path / "sqa.scores.json")))
    assert s["style"] == "vg-llm" and s["EM-1"] == 100.0
    assert "VG-LLM parsing" in capsys.readouterr().out
    assert cli.main(args[:-2]) == 2  # the default style's prompts differ: not mixed into this file
    assert "'sqa3d_style': ('vg-llm', 'default')" in capsys.readouterr().err
    RecordingPredictor.seen.clear()
    assert cli.main(args + ["--max-new-tokens", "8", "--restart", "--no-score"]) == 0
    assert [s.max_new_tokens for s in RecordingPredictor.seen] == [8] * 3


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
