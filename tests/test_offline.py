"""Nothing touches the network unless asked: building, saving, loading (ours and transformers' Auto classes),
generating and the `geoalign answer` command, in a fresh interpreter whose sockets refuse every connection, with no
HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set and an empty Hugging Face cache. Newer transformers install Hugging Face's
`kernels` package (hub kernels); its kernels must stay off unless a user asks for them.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent('''
    import socket, sys, time
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[:3])[:200])
        raise OSError("network blocked by tests/test_offline.py")

    socket.socket.connect = refuse
    socket.socket.connect_ex = refuse
    socket.create_connection = refuse
    socket.getaddrinfo = refuse

    import numpy as np, torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from geoalign import GeoAlignForConditionalGeneration
    from geoalign.cli import main
    from geoalign.processing import GeoAlignProcessor
    from geoalign.tiny import tiny_model

    out = sys.argv[1]
    model, tok = tiny_model(4, seed=0)
    model.save_pretrained(f"{out}/model", processor=GeoAlignProcessor(tok, None))
    ours = GeoAlignForConditionalGeneration.from_pretrained(f"{out}/model")
    auto = AutoModelForImageTextToText.from_pretrained(f"{out}/model")
    processor = AutoProcessor.from_pretrained(f"{out}/model")
    frames = [np.random.default_rng(i).integers(0, 255, (56, 56, 3), dtype=np.uint8) for i in range(2)]
    inputs = processor(frames, "what?")
    with torch.no_grad():
        auto.generate(**inputs, max_new_tokens=2, do_sample=False)
    import os
    os.makedirs(f"{out}/frames")
    for i, f in enumerate(frames):
        Image.fromarray(f).save(f"{out}/frames/{i}.png")
    assert main(["answer", "--model", f"{out}/model", "--images", f"{out}/frames", "--question", "what?",
                 "--max-new-tokens", "2", "--device", "cpu"]) == 0
    t0 = time.perf_counter()
    try:
        GeoAlignForConditionalGeneration.from_pretrained("Qwen/nosuchmodel")
    except FileNotFoundError as e:
        assert "only local files are read" in str(e), e
    else:
        raise AssertionError("a hub name loaded")
    assert time.perf_counter() - t0 < 5
    kernels = sys.modules.get("kernels")
    print("hub kernels package:", getattr(kernels, "__file__", None))
    print("attempts:", attempts)
''')


def test_no_network_without_being_asked(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HOME=str(tmp_path / "hf_home"), PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "attempts: []" in proc.stdout, proc.stdout[-2000:]
