"""`geoalign eval --model DIR` with the real GeoAlign model: a tiny random model saved with
``save_pretrained(dir, processor=...)``, run over generated miniature VSI-Bench / ScanQA / SQA3D folders.

Answers are garbage (random weights); these tests check the plumbing: frames -> processor -> generate -> decoded
answers -> predictions JSONL -> resumption -> scores. Frames are 32x128 so the 518-wide VGGT frames are only 9
patches high (fast on a 2-core CPU).
"""
from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("transformers")

from geoalign.tiny import make_tokenizer, tiny_model  # noqa: E402
from eval_helpers import lines, make_scanqa, make_sqa3d, make_vsibench  # noqa: E402

from geoalign.eval import cli, runner, tasks  # noqa: E402
from geoalign.eval.predictor import GeoAlignPredictor, Predictor, Sample, load_predictor  # noqa: E402
from geoalign.processing import GeoAlignProcessor  # noqa: E402

H, W = 32, 128  # source frame size: VGGT 126x518 (9x37 patches), Qwen 112x504 (72 tokens per frame)


# ----------------------------------------------------------------------------- fixtures
def save_tiny(directory, group_size=4, seed=0):
    model, tok = tiny_model(group_size, seed=seed)
    model.save_pretrained(directory, processor=GeoAlignProcessor(tok, None, group_size=group_size))
    return str(directory)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("geoalign_tiny"))


@pytest.fixture(scope="module")
def predictor(model_dir):
    return load_predictor(model_dir, device="cpu", max_batch_size=2)


@pytest.fixture(scope="module")
def vsi_small(tmp_path_factory):
    # scannetpp clips have 1 frame: its questions get 1 frame, the others --num-frames
    return make_vsibench(tmp_path_factory.mktemp("vsi_small"), size=H, width=W, frames_per_dataset={"scannetpp": 1})


@pytest.fixture(scope="module")
def scanqa_small(tmp_path_factory):
    return make_scanqa(tmp_path_factory.mktemp("scanqa_small"), size=H, width=W)


@pytest.fixture(scope="module")
def sqa3d_small(tmp_path_factory):
    return make_sqa3d(tmp_path_factory.mktemp("sqa3d_small"), size=H, width=W, folder_frames=1)


class Spy:
    """Records what the model's generate receives (wraps the real one)."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __enter__(self):
        real = self.model.generate

        def generate(**kw):
            self.calls.append(kw)
            return real(**kw)

        self.model.generate = generate
        return self

    def __exit__(self, *exc):
        del self.model.generate


# ----------------------------------------------------------------------------- the adapter, real model
def test_load_predictor(model_dir, predictor):
    assert isinstance(predictor, Predictor) and isinstance(predictor, GeoAlignPredictor)
    assert predictor.max_batch_size == 2 and not predictor.model.training
    assert predictor.model.dtype == torch.float32 and str(predictor.device) == "cpu"
    assert predictor.processor.group_size == predictor.model.group_size == 4
    with pytest.raises(ValueError, match="dtype"):
        load_predictor(model_dir, device="cpu", dtype="float8")
    with pytest.raises(ValueError, match="fusion backend"):
        load_predictor(model_dir, device="cpu", fusion_backend="bogus")
    p = load_predictor(model_dir, device="cpu", dtype="bf16", attn_implementation="eager", fusion_backend="reference")
    assert p.model.dtype == torch.bfloat16 and p.model.fusion.out_proj.weight.dtype == torch.bfloat16
    assert p.model.config._attn_implementation == "eager" and p.fusion_backend == "reference"


def test_batch_of_two_with_different_frame_counts(vsi_small, predictor):
    samples = tasks.load_samples("vsibench", vsi_small, num_frames=2, max_new_tokens=3)
    a, b = samples[4], samples[5]                        # scannet (2 of 12 frames) and scannetpp (its 1 frame)
    assert (a.meta["dataset"], b.meta["dataset"]) == ("scannet", "scannetpp")
    with Spy(predictor.model) as spy:
        both = predictor.predict([a, b])
        single = predictor.predict([a]) + predictor.predict([b])
    kw = spy.calls[0]
    assert [v.shape[0] for v in kw["vggt_pixel_values"]] == [2, 1]
    assert [tuple(v.shape[-2:]) for v in kw["vggt_pixel_values"]] == [(126, 518)] * 2
    assert [tuple(g.shape) for g in kw["gather_index"]] == [(2 * 72, 4), (1 * 72, 4)]
    assert kw["image_grid_thw"].tolist() == [[1, 8, 36]] * 3
    mask = kw["attention_mask"]
    assert mask[:, -1].all() and not mask[1, 0] and mask.sum(1).tolist()[0] > mask.sum(1).tolist()[1]  # left pad
    assert kw["do_sample"] is False and kw["num_beams"] == 1 and kw["max_new_tokens"] == 3
    assert predictor.model.vggt_calls >= 4
    # batching (left padding, different frame counts) does not change a greedy answer
    assert both == single and all(isinstance(x, str) for x in both)


# ----------------------------------------------------------------------------- end to end (default run)
def test_cli_sqa3d_with_the_model_resume_and_score(sqa3d_small, model_dir, tmp_path, capsys):
    out = str(tmp_path / "sqa3d" / "predictions.jsonl")
    base = ["eval", "sqa3d", "--data", sqa3d_small, "--model", model_dir, "--out", out, "--device", "cpu",
            "--num-frames", "2", "--batch-size", "2", "--max-new-tokens", "2", "--no-progress"]
    # a first run stopped after one batch of 2 (scene0050_00: 2 of 12 video frames each) ...
    assert cli.main(base + ["--limit", "2", "--no-score"]) == 0
    first = lines(out)
    assert [r["id"] for r in first] == ["220602000000", "220602000001"]
    with open(out, "a") as f:
        f.write('{"id": "220602000002", "task": "sq')            # ... with a torn write at the end
    # ... resumes: only the missing question (scene0060_00: a 1-frame folder) is answered
    assert cli.main(base) == 0
    text = capsys.readouterr().out
    assert "1 new predictions (2 already" in text and "Avg. (EM-1)" in text
    recs = lines(out)
    assert recs[:2] == first and [r["id"] for r in recs][2] == "220602000002" and len(recs) == 3
    assert {"prediction", "answers", "question_type", "scene_id", "question"} <= set(recs[2])
    for r in recs:
        assert "<|" not in r["prediction"] and "assistant" not in r["prediction"]
    scores = json.load(open(str(tmp_path / "sqa3d" / "predictions.scores.json")))
    assert scores["num_samples"] == 3 and 0.0 <= scores["EM-1"] <= 100.0
    meta = json.load(open(out + ".meta.json"))
    assert meta["model"] == os.path.abspath(model_dir) and meta["num_frames"] == 2
    assert cli.main(["score", "sqa3d", out]) == 0 and "EM-1-refined" in capsys.readouterr().out


def test_runner_scanqa_interrupted_then_resumed(scanqa_small, predictor, tmp_path):
    samples = tasks.load_samples("scanqa", scanqa_small, num_frames=2, max_new_tokens=2)
    assert [s.media.kind for s in samples] == ["frames", "frames", "video"]

    class Interrupted(Exception):
        pass

    class StopAfterOneBatch:
        max_batch_size = 2

        def __init__(self):
            self.batches = 0

        def predict(self, batch):
            if self.batches:
                raise Interrupted
            self.batches += 1
            return predictor.predict(batch)

    out = str(tmp_path / "scanqa.jsonl")
    with pytest.raises(Interrupted):
        runner.run_eval(samples, StopAfterOneBatch(), out, batch_size=2, progress=False)
    assert [r["id"] for r in lines(out)] == [s.id for s in samples[:2]]
    info = runner.run_eval(samples, predictor, out, batch_size=2, progress=False)
    assert info == {**info, "skipped": 2, "written": 1, "batch_size": 2}
    assert [r["id"] for r in lines(out)] == [s.id for s in samples]
    s = runner.score_file("scanqa", out, use_java=False)
    assert s["num_samples"] == 3 and {"BLEU-4", "ROUGE-L", "CIDEr", "EM@1"} <= set(s)


def test_cli_vsibench_with_the_model(vsi_small, model_dir, tmp_path, capsys):
    out = str(tmp_path / "vsi.jsonl")
    args = ["eval", "vsibench", "--data", vsi_small, "--model", model_dir, "--out", out, "--device", "cpu",
            "--num-frames", "2", "--batch-size", "2", "--max-new-tokens", "2", "--limit", "4", "--no-progress",
            "--fusion-backend", "reference"]
    assert cli.main(args) == 0
    recs = lines(out)
    assert [r["id"] for r in recs] == ["0", "1", "2", "3"]
    assert {"question_type", "ground_truth", "dataset", "scene_name", "options", "prediction"} <= set(recs[0])
    assert "Obj. Count" in capsys.readouterr().out
    scores = json.load(open(str(tmp_path / "vsi.scores.json")))
    assert scores["num_samples"] == 4 and set(scores["missing_tasks"]) == {
        "object_rel_distance", "object_rel_direction", "route_planning", "obj_appearance_order"}
    assert json.load(open(out + ".meta.json"))["fusion_backend"] == "reference"
    assert cli.main(args) == 0 and "0 new predictions (4 already" in capsys.readouterr().out


def test_cli_save_routing_and_routing_by_question_type(vsi_small, model_dir, tmp_path, capsys):
    """--save-routing: each record gets its prefill's mean routing weight per bank layer; eval and score print it by
    question type (the mean over that type's questions), keep it in the scores JSON and plot it."""
    from PIL import Image

    out = str(tmp_path / "vsi.jsonl")
    assert cli.main(["eval", "vsibench", "--data", vsi_small, "--model", model_dir, "--out", out, "--device", "cpu",
                     "--num-frames", "2", "--batch-size", "2", "--max-new-tokens", "2", "--limit", "6",
                     "--no-progress", "--save-routing"]) == 0
    printed = capsys.readouterr().out
    recs = lines(out)
    for r in recs:
        assert r["routing"]["bank_layers"] == [1, 2, 3]
        assert sum(r["routing"]["mean_alpha_pct"]) == pytest.approx(100, abs=1e-3)
    by_type: dict = {}
    for r in recs:
        by_type.setdefault(r["question_type"], []).append(r["routing"]["mean_alpha_pct"])
    scores = json.load(open(str(tmp_path / "vsi.scores.json")))
    assert set(scores["routing_by_type"]) == set(by_type) and len(by_type) >= 2
    for qt, rows in by_type.items():
        want = [sum(col) / len(rows) for col in zip(*rows)]
        assert scores["routing_by_type"][qt]["n"] == len(rows)
        assert scores["routing_by_type"][qt]["mean_alpha_pct"] == pytest.approx(want, abs=1e-3)
    assert "routing (mean alpha %)" in printed and all(qt in printed for qt in by_type)
    with Image.open(str(tmp_path / "vsi.routing.png")) as im:
        assert im.format == "PNG"
    assert cli.main(["score", "vsibench", out]) == 0                     # geoalign score reads it back
    assert "routing (mean alpha %)" in capsys.readouterr().out
    plain = str(tmp_path / "plain.jsonl")                                # without the flag: no routing field
    assert cli.main(["eval", "vsibench", "--data", vsi_small, "--model", model_dir, "--out", plain, "--device", "cpu",
                     "--num-frames", "2", "--max-new-tokens", "2", "--limit", "1", "--no-progress"]) == 0
    assert "routing" not in lines(plain)[0] and "routing (mean" not in capsys.readouterr().out


# ----------------------------------------------------------------------------- slower: every question of each format
@pytest.mark.slow
@pytest.mark.parametrize("task", ["vsibench", "scanqa", "sqa3d"])
def test_cli_every_format_with_the_model(task, vsi_small, scanqa_small, sqa3d_small, model_dir, tmp_path, capsys):
    data = {"vsibench": vsi_small, "scanqa": scanqa_small, "sqa3d": sqa3d_small}[task]
    out = str(tmp_path / "p.jsonl")
    args = ["eval", task, "--data", data, "--model", model_dir, "--out", out, "--device", "cpu",
            "--num-frames", "3", "--batch-size", "2", "--max-new-tokens", "2", "--no-progress", "--no-java"]
    assert cli.main(args) == 0
    n = len(tasks.load_samples(task, data))
    assert len(lines(out)) == n
    scores = json.load(open(str(tmp_path / "p.scores.json")))
    assert scores["num_samples"] == n
    assert cli.main(args) == 0 and f"0 new predictions ({n} already" in capsys.readouterr().out


@pytest.mark.slow
def test_video_path_model_g8_batch(vsi_small, tmp_path):
    """G=8 (Qwen's video path): odd and even frame counts in one batch."""
    pred = load_predictor(save_tiny(tmp_path / "g8", group_size=8), device="cpu", max_batch_size=2)
    samples = tasks.load_samples("vsibench", vsi_small, num_frames=3, max_new_tokens=2)
    with Spy(pred.model) as spy:
        both = pred.predict([samples[4], samples[5]])
    assert spy.calls[0]["video_grid_thw"].tolist() == [[2, 8, 36], [1, 8, 36]]    # 3 frames and 1 frame
    assert both == pred.predict([samples[4]]) + pred.predict([samples[5]])


# ----------------------------------------------------------------------------- decoding (stub model, fast)
class StubModel:
    """Echoes the prompt and appends fixed tokens (answer, <|im_end|>, then padding)."""

    group_size = 4
    device = torch.device("cpu")

    def __init__(self, tok, answers):
        self.tok, self.answers, self.kw = tok, answers, None

    def generate(self, input_ids, **kw):
        self.kw = kw
        rows = [self.tok(a + "<|im_end|>", add_special_tokens=False)["input_ids"] for a in self.answers]
        n = max(len(r) for r in rows) + 1
        pad = self.tok.pad_token_id
        new = torch.tensor([r + [pad] * (n - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)


def test_decoding_drops_prompt_special_tokens_and_respects_budgets(tmp_path):
    tok = make_tokenizer()
    proc = GeoAlignProcessor(tok, None, group_size=4)
    frames = [torch.rand(1, 3, H, W)]
    samples = [Sample("a", "t", "How far?", None, max_new_tokens=8), Sample("b", "t", "Which?", None,
                                                                              max_new_tokens=2)]
    for s in samples:
        s.load_frames = lambda: frames[0]
    model = StubModel(tok, [" 2.5\n", "B. table"])
    pred = GeoAlignPredictor(model, proc, device="cpu", max_batch_size=2, fusion_backend="torch")
    # "b" keeps only its own 2-token budget; answers come back as decoded (scoring strips where the benchmark does)
    assert pred.predict(samples) == [" 2.5\n", "B."]
    kw = model.kw
    assert kw["do_sample"] is False and kw["num_beams"] == 1 and kw["max_new_tokens"] == 8
    assert kw["fusion_backend"] == "torch" and len(kw["vggt_pixel_values"]) == 2
    assert kw["attention_mask"][:, -1].all()


def test_frame_loading_errors_name_the_sample(tmp_path):
    from geoalign.eval.media import MediaRef

    pred = GeoAlignPredictor(StubModel(make_tokenizer(), ["x"]), None, device="cpu")
    bad = Sample("q7", "scanqa", "?", MediaRef(str(tmp_path / "gone.mp4"), "video"))
    with pytest.raises(FileNotFoundError) as e:
        pred.predict([bad])
    if hasattr(e.value, "__notes__"):
        assert "q7" in e.value.__notes__[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_batch(vsi_small, model_dir):
    """CUDA, dtype auto (bf16), both fusion backends that run there (unverified on the CPU-only dev machine)."""
    samples = tasks.load_samples("vsibench", vsi_small, num_frames=2, max_new_tokens=3)
    for backend in ("torch", "triton"):
        pred = load_predictor(model_dir, device="cuda", fusion_backend=backend, max_batch_size=2)
        assert pred.model.dtype == torch.bfloat16
        out = pred.predict([samples[4], samples[5]])
        assert len(out) == 2 and all(isinstance(x, str) for x in out)
