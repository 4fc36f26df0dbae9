"""geoalign_kernels.configs: the lookup order (autotune choice, tuned table, static default), the autotune
selection (fastest candidate, failures skipped, in-place buffers restored) and the table's round trip. The timing
itself needs CUDA (triton.testing.do_bench); here a deterministic stand-in times the candidates."""
from __future__ import annotations

import json

import pytest
import torch

from geoalign_kernels import configs

KEYS = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "num_warps", "num_stages")


@pytest.fixture
def clean(monkeypatch, tmp_path):
    """An empty autotune session and the tuned table at a temporary path (returned; not created)."""
    monkeypatch.setattr(configs, "_SESSION", {})
    path = tmp_path / "tuned.json"
    monkeypatch.setattr(configs, "TUNED_PATH", path)
    return path


def test_static_defaults_by_device_class_and_shape_class(clean):
    assert configs.config_for("gemm", 100, "NVIDIA H200") == configs.CONFIGS["H200"][("gemm", "small")]
    assert configs.config_for("gemm", 4096, "NVIDIA H100 80GB HBM3") == configs.CONFIGS["H100"][("gemm", "large")]
    assert configs.config_for("bank_gemm1", 1023, "NVIDIA A100") == configs.CONFIGS["default"][("bank_gemm1", "small")]
    fp64 = configs.config_for("gemm", 4096, "NVIDIA H200", torch.float64)
    assert fp64["BLOCK_SIZE_K"] <= 32 and fp64["num_stages"] <= 2


def test_tuned_table_then_session_take_precedence(clean):
    tuned = {"BLOCK_SIZE_M": 32, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 128, "num_warps": 2, "num_stages": 5}
    clean.write_text(json.dumps({"NVIDIA H200": {"bank_weight_grad|bfloat16|large": {**tuned, "ms": 1.5}}}))
    assert configs.config_for("bank_weight_grad", 4096, "NVIDIA H200", torch.bfloat16) == tuned
    # other dtype, shape class or device: the static default
    assert configs.config_for("bank_weight_grad", 4096, "NVIDIA H200", torch.float16) == \
        configs.CONFIGS["H200"][("bank_weight_grad", "large")]
    assert configs.config_for("bank_weight_grad", 10, "NVIDIA H200", torch.bfloat16) == \
        configs.CONFIGS["H200"][("bank_weight_grad", "small")]
    assert configs.config_for("bank_weight_grad", 4096, "NVIDIA H100", torch.bfloat16) == \
        configs.CONFIGS["H100"][("bank_weight_grad", "large")]
    session = dict(tuned, BLOCK_SIZE_M=256)
    configs._SESSION["NVIDIA H200"] = {"bank_weight_grad|bfloat16|large": session}
    assert configs.config_for("bank_weight_grad", 4096, "NVIDIA H200", torch.bfloat16)["BLOCK_SIZE_M"] == 256


def test_a_malformed_table_is_a_clear_error(clean):
    clean.write_text("[1, 2]")
    with pytest.raises(RuntimeError, match="must map device names"):
        configs.config_for("gemm", 10, "NVIDIA H200")


def test_choose_takes_the_fastest_skips_failures_and_restores_buffers():
    h = torch.randn(5, 3)
    h0 = h.clone()
    c = [dict(zip(KEYS, v)) for v in ((64, 64, 32, 4, 3), (128, 128, 64, 8, 3), (16, 16, 16, 1, 1))]
    cost = {64: 2.0, 128: 0.5}
    launched = []

    def launch(cfg):
        launched.append(cfg["BLOCK_SIZE_M"])
        if cfg["BLOCK_SIZE_M"] == 16:
            raise RuntimeError("out of resources: shared memory")
        h.add_(1.0)  # an in-place update, as GEMM1's h_bar read-add-write

    def bench(fn):
        fn()
        fn()
        return cost[launched[-1]]

    best, timings = configs.choose(c, launch, restore=(h,), bench=bench)
    assert best == c[1]
    assert [t for _, t in timings][:2] == [2.0, 0.5] and "out of resources" in timings[2][1]
    assert torch.equal(h, h0), "the timing runs' updates must be undone"
    with pytest.raises(RuntimeError, match="every candidate failed"):
        configs.choose(c[2:], launch, bench=bench)


def test_write_tuned_merges_into_the_table(clean):
    clean.write_text(json.dumps({"NVIDIA H100": {"gemm|bfloat16|large": dict(zip(KEYS, (1, 2, 3, 4, 5)))}}))
    configs._SESSION["NVIDIA H200"] = {"gemm|bfloat16|small": {**dict(zip(KEYS, (64, 128, 64, 4, 4))), "ms": 0.1}}
    table = configs.write_tuned(clean)
    assert set(table) == {"NVIDIA H100", "NVIDIA H200"}
    assert json.loads(clean.read_text()) == table
    assert configs.config_for("gemm", 10, "NVIDIA H200", torch.bfloat16)["BLOCK_SIZE_N"] == 128


def test_autotune_is_off_under_the_interpreter_and_on_cpu(monkeypatch):
    monkeypatch.setattr(configs, "AUTOTUNE", True)

    def launch(cfg):
        raise AssertionError("no timing runs off CUDA")
    cfg = configs.tune("gemm", 10, torch.device("cpu"), torch.float32, launch)
    assert cfg == configs.get_config("gemm", 10, torch.device("cpu"), torch.float32)


def test_every_candidate_is_a_complete_config():
    for op, cands in configs.CANDIDATES.items():
        assert cands and all(set(c) == set(KEYS) for c in cands), op
        assert len({tuple(sorted(c.items())) for c in cands}) == len(cands), f"{op}: repeated candidates"



def test_a_tuned_table_written_before_the_op_rename_still_applies(tmp_path, monkeypatch):
    """bank_fwd / bank_dw1 are bank_gemm1 / bank_weight_grad now; a tuned_configs.json with the old keys (and a
    caller using the old names) keeps working for one release, with a DeprecationWarning."""
    tuned = {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 16, "num_warps": 2, "num_stages": 2}
    old = tmp_path / "tuned_configs.json"
    old.write_text(json.dumps({"NVIDIA H200": {"bank_dw1|bfloat16|large": tuned, "bank_fwd|bfloat16|small": tuned}}))
    monkeypatch.setattr(configs, "TUNED_PATH", old)
    configs._TABLE_CACHE.clear()
    with pytest.warns(DeprecationWarning, match="'bank_dw1' is now 'bank_weight_grad'"):
        assert configs.config_for("bank_weight_grad", 4096, "NVIDIA H200", torch.bfloat16) == tuned
    assert configs.config_for("bank_gemm1", 10, "NVIDIA H200", torch.bfloat16) == tuned
    with pytest.warns(DeprecationWarning, match="kernel op 'bank_fwd' is now 'bank_gemm1'"):
        assert configs.config_for("bank_fwd", 10, "NVIDIA H200", torch.bfloat16) == tuned
    configs._TABLE_CACHE.clear()
    # tune() maps an old name before it looks for autotune candidates (it used to skip autotuning silently)
    monkeypatch.setattr(configs, "AUTOTUNE", True)
    monkeypatch.setattr(configs, "INTERPRET", False)
    monkeypatch.setattr(configs, "device_name", lambda index: "NVIDIA H200")
    monkeypatch.setattr(configs, "_SESSION", {})
    timed = []

    def choose(candidates, launch, restore=(), bench=None):
        timed.append(len(candidates))
        return candidates[0], [(candidates[0], 1.0)]

    monkeypatch.setattr(configs, "choose", choose)
    with pytest.warns(DeprecationWarning, match="kernel op 'bank_dw1' is now 'bank_weight_grad'"):
        configs.tune("bank_dw1", 4096, torch.device("cuda", 0), torch.bfloat16, launch=lambda cfg: None)
    assert timed, "the old name skipped autotuning"
