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
    # a site takes its own Hopper default where it has one, else its family's
    assert configs.config_for("router_d_hid", 8064, "NVIDIA H100 80GB HBM3", n=512, k=12) == \
        configs.SITE_CONFIGS["H100"][("router_d_hid", "large")]
    assert configs.config_for("out_proj", 8064, "NVIDIA H200", n=2048, k=2048) == \
        configs.CONFIGS["H200"][("gemm", "large")]
    assert configs.config_for("gemm1_train", 16128, "NVIDIA H200") == configs.CONFIGS["H200"][("bank_gemm1", "large")]


def test_every_site_has_its_own_key_with_m_bucketed_and_n_k_exact():
    assert configs.table_key("fc2", torch.bfloat16, 8064, 2048, 4096) == "fc2|bfloat16|M8192|N2048|K4096"
    assert configs.table_key("fc2", torch.bfloat16, 8192, 2048, 4096) == "fc2|bfloat16|M8192|N2048|K4096"
    assert configs.table_key("fc2", torch.bfloat16, 8193, 2048, 4096) == "fc2|bfloat16|M16384|N2048|K4096"
    assert configs.table_key("rows", None, 3) == "rows|any|M16"
    # a weight gradient's K runs over the tokens: bucketed, so one tuned key serves 30 and 32 frames alike
    for tokens in (8064, 7560):
        assert configs.table_key("d_fc2_weight", torch.bfloat16, 2048, 4096, tokens) == \
            "d_fc2_weight|bfloat16|M2048|N4096|K8192"
    assert configs.TOKEN_K_SITES <= set(configs.SITES)
    keys = {configs.table_key(site, torch.bfloat16, 8064, 2048, 2048) for site in configs.SITES}
    assert len(keys) == len(configs.SITES)
    for site, family in configs.SITES.items():
        assert family in ("gemm", "bank_gemm1", "bank_weight_grad", "rows"), site
    with pytest.raises(ValueError, match="unknown GEMM site 'fc3'"):
        configs.config_for("fc3", 10, "NVIDIA H200")
    with pytest.raises(ValueError, match="unknown GEMM site 'fc3'"):
        configs.get_config("fc3", 10, torch.device("cpu"))


def test_every_call_site_names_a_known_site():
    """Each matmul(...) / tune(...) in the kernel package passes a site of configs.SITES (a typo would be a
    ValueError only at run time, on the path that takes it)."""
    import re
    from pathlib import Path

    kernels = Path(configs.__file__).parent
    found = set()
    for path in kernels.glob("*.py"):
        text = path.read_text()
        found |= set(re.findall(r'site="([a-z0-9_]+)"', text))
        found |= set(re.findall(r'tune\("([a-z0-9_]+)"', text))
    assert found, "no call site found: the pattern is stale"
    assert found <= set(configs.SITES), found - set(configs.SITES)
    assert {"fc2", "out_proj", "d_h_bar", "router_d_hid", "router_d_w2"} <= found


def test_tuned_table_then_session_take_precedence(clean):
    tuned = {"BLOCK_SIZE_M": 32, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 128, "num_warps": 2, "num_stages": 5}
    clean.write_text(json.dumps({"NVIDIA H200": {"bank_weight_grad|bfloat16|M4096": {**tuned, "ms": 1.5}}}))
    assert configs.config_for("bank_weight_grad", 4096, "NVIDIA H200", torch.bfloat16) == tuned
    assert configs.config_for("bank_weight_grad", 3000, "NVIDIA H200", torch.bfloat16) == tuned  # same M bucket
    # other dtype, shape class or device: the static default
    assert configs.config_for("bank_weight_grad", 4096, "NVIDIA H200", torch.float16) == \
        configs.CONFIGS["H200"][("bank_weight_grad", "large")]
    assert configs.config_for("bank_weight_grad", 10, "NVIDIA H200", torch.bfloat16) == \
        configs.CONFIGS["H200"][("bank_weight_grad", "small")]
    assert configs.config_for("bank_weight_grad", 4096, "NVIDIA H100", torch.bfloat16) == \
        configs.CONFIGS["H100"][("bank_weight_grad", "large")]
    session = dict(tuned, BLOCK_SIZE_M=256)
    configs._SESSION["NVIDIA H200"] = {"bank_weight_grad|bfloat16|M4096": session}
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
    clean.write_text(json.dumps({"NVIDIA H100": {"gemm|bfloat16|M16": dict(zip(KEYS, (1, 2, 3, 4, 5)))}}))
    configs._SESSION["NVIDIA H200"] = {"gemm|bfloat16|M16": {**dict(zip(KEYS, (64, 128, 64, 4, 4))), "ms": 0.1}}
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


def test_tune_writes_its_table_after_every_key(clean, monkeypatch, tmp_path):
    """TUNE_OUT: the table on disk holds every key timed so far, so a run cut off mid-tune keeps them."""
    monkeypatch.setattr(configs, "AUTOTUNE", True)
    monkeypatch.setattr(configs, "INTERPRET", False)
    monkeypatch.setattr(configs, "device_name", lambda index: "NVIDIA H200")
    out = tmp_path / "tuned_out.json"
    monkeypatch.setattr(configs, "TUNE_OUT", str(out))
    monkeypatch.setattr(configs, "choose", lambda candidates, launch, restore=(), bench=None: (
        candidates[-1], [(c, float(i + 1)) for i, c in enumerate(candidates)]))
    cuda = torch.device("cuda", 0)
    configs.tune("fc2", 8064, cuda, torch.bfloat16, launch=lambda cfg: None, n=2048, k=4096)
    first = json.loads(out.read_text())["NVIDIA H200"]
    assert list(first) == ["fc2|bfloat16|M8192|N2048|K4096"]
    configs.tune("router_d_hid", 8064, cuda, torch.bfloat16, launch=lambda cfg: None, n=512, k=12)
    table = json.loads(out.read_text())["NVIDIA H200"]
    assert set(table) == {"fc2|bfloat16|M8192|N2048|K4096", "router_d_hid|bfloat16|M8192|N512|K12"}
    assert table["fc2|bfloat16|M8192|N2048|K4096"]["BLOCK_SIZE_M"] == configs.CANDIDATES["gemm"][-1]["BLOCK_SIZE_M"]
