"""Bad inputs raise ValueError/TypeError naming what was expected and what was received, in every backend."""
from __future__ import annotations

import pytest
import torch

from geoalign import GeoAlignConfig
from helpers import backend_params, Shape, fast_backends, make_fusion, make_inputs, spy_on

SHAPE = Shape(L=6, M=3, K=2, G=4)
BACKENDS = ["reference"] + fast_backends()


@pytest.fixture
def case():
    fusion = make_fusion(SHAPE, torch.float32)
    q, layers, gather_index = make_inputs(SHAPE, torch.float32)
    return fusion, q, layers, gather_index


@pytest.mark.parametrize("kwargs, match", [
    (dict(top_k=5, bank_layers=range(3)), "top_k must be <= the number of bank layers M=3, got K=5"),
    (dict(top_k=0), "top_k must be a positive int"),
    (dict(hidden_size=-1), "hidden_size must be a positive int"),
    (dict(group_size=2.5), "group_size must be a positive int"),
    (dict(bank_layers=[]), "at least one layer"),
    (dict(bank_layers=[3, 3]), "repeated"),
    (dict(layer_norm_eps=0), "layer_norm_eps"),
    (dict(backend="cuda-magic"), "backend must be one of"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GeoAlignConfig(**kwargs)


def test_config_round_trip(tmp_path):
    cfg = GeoAlignConfig(bank_layers=[3, 7, 9], top_k=3, router_hidden=64)
    cfg.save_pretrained(tmp_path)
    assert GeoAlignConfig.from_pretrained(tmp_path) == cfg
    with pytest.raises(ValueError, match="unknown GeoAlignConfig keys"):
        GeoAlignConfig.from_dict({"hidden_size": 8, "nonsense": 1})
    with pytest.raises(FileNotFoundError):
        GeoAlignConfig.from_pretrained(tmp_path / "missing")


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
def test_bad_query(case, backend):
    fusion, q, layers, gi = case
    with pytest.raises(ValueError, match=r"q must have shape \[L, 24\], got \(6, 23\)"):
        fusion(q[:, :23], layers, gi, backend=backend)
    with pytest.raises(ValueError, match=r"q must have shape \[L, 24\], got \(6, 24, 1\)"):
        fusion(q[..., None], layers, gi, backend=backend)
    with pytest.raises(TypeError, match="q must have the fusion's parameter dtype torch.float32, got torch.float64"):
        fusion(q.double(), layers, gi, backend=backend)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        fusion(q.tolist(), layers, gi, backend=backend)
    with pytest.raises(ValueError, match=r"^q is empty \(L=0\): expected at least one visual token$"):
        fusion(q[:0], layers, gi[:0], backend=backend)
    bad = q.detach().clone()
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="^q contains NaN or inf$"):
        fusion(bad, layers, gi, backend=backend)
    bad[2, 3] = float("inf")
    with pytest.raises(ValueError, match="^q contains NaN or inf$"):
        fusion.route(bad, backend=backend)


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
def test_bad_gather_index(case, backend):
    fusion, q, layers, gi = case
    N = layers[0].shape[0]
    with pytest.raises(TypeError, match="gather_index must be int64 .*got torch.float32"):
        fusion(q, layers, gi.float(), backend=backend)
    with pytest.raises(ValueError, match=r"gather_index must have shape \[L, G\]=\[6, 4\], got \(6, 8\)"):
        fusion(q, layers, torch.cat([gi, gi], 1), backend=backend)
    with pytest.raises(ValueError, match=r"gather_index must have shape \[L, G\]=\[6, 4\], got \(5, 4\)"):
        fusion(q, layers, gi[:5], backend=backend)
    high = gi.clone()
    high[3, 1] = N
    with pytest.raises(ValueError, match=f"points at row {N}, but bank layer 0 has {N} rows"):
        fusion(q, layers, high, backend=backend)
    low = gi.clone()
    low[0, 0] = -1
    with pytest.raises(ValueError, match="expected rows >= 0, got -1"):
        fusion(q, layers, low, backend=backend)
    with pytest.raises(TypeError, match=r"^gather_index must be a torch.Tensor \[L, G\]=\[6, 4\], got list$"):
        fusion(q, layers, gi.tolist(), backend=backend)
    # int32 indices are accepted
    fusion(q, layers, gi.int(), backend=backend)


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
def test_bad_layers(case, backend):
    fusion, q, layers, gi = case
    with pytest.raises(ValueError, match="expected 3 bank layers, got 2; missing bank positions \\[2\\]"):
        fusion(q, layers[:2], gi, backend=backend)
    with pytest.raises(ValueError, match="expected 3 bank layers, got more"):
        fusion(q, layers + layers[:1], gi, backend=backend)
    with pytest.raises(ValueError, match=r"bank layer 1 must have shape \[N, 20\], got \(48, 19\)"):
        fusion(q, [layers[0], layers[1][:, :19], layers[2]], gi, backend=backend)
    with pytest.raises(TypeError, match="bank layer 2 must be a floating-point tensor, got torch.int64"):
        fusion(q, [layers[0], layers[1], layers[2].long()], gi, backend=backend)
    with pytest.raises(TypeError, match="bank layer 0 must be a torch.Tensor"):
        fusion(q, [None, layers[1], layers[2]], gi, backend=backend)
    with pytest.raises(TypeError, match=r"^bank layer 1 must be a torch.Tensor \[N, 20\], got list$"):
        fusion(q, [layers[0], layers[1].tolist(), layers[2]], gi, backend=backend)
    with pytest.raises(ValueError, match=r"^bank layer 0 requires grad, but the geometry encoder is frozen and the "
                                         r"fusion computes no gradient into it; pass layer\.detach\(\)$"):
        fusion(q, [layers[0].requires_grad_(True), layers[1], layers[2]], gi, backend=backend)


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
def test_stream_misuse(case, backend):
    fusion, q, layers, gi = case
    stream = fusion.begin(q, gi, backend=backend)
    stream.add(0, layers[0])
    with pytest.raises(ValueError, match="bank layer 0 was already added"):
        stream.add(0, layers[0])
    with pytest.raises(ValueError, match=r"bank position must be an int in \[0, 3\), got 3"):
        stream.add(3, layers[0])
    for position in (True, 1.0, "1"):  # a bool is an int to Python, but not a bank position
        with pytest.raises(ValueError, match=rf"bank position must be an int in \[0, 3\), got {position!r}"):
            stream.add(position, layers[1])
    with pytest.raises(ValueError, match=r"missing bank positions \[1, 2\]"):
        stream.finish()
    stream.add(1, layers[1])
    stream.add(2, layers[2])
    stream.finish()
    with pytest.raises(RuntimeError, match=r"^this FusionStream has finished; call fusion\.begin\(\.\.\.\) for a new "
                                           r"forward$"):
        stream.add(0, layers[0])
    with pytest.raises(RuntimeError, match=r"^this FusionStream has already finished$"):
        stream.finish()


def test_unknown_backend(case):
    fusion, q, layers, gi = case
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        fusion(q, layers, gi, backend="fast")


def test_wrong_device_is_clear(case):
    fusion, q, layers, gi = case
    meta_layer = torch.empty(layers[0].shape, device="meta")
    with pytest.raises(ValueError, match="bank layer 0 must be on q's device cpu, got meta"):
        fusion(q, [meta_layer, layers[1], layers[2]], gi, backend="torch")
    with pytest.raises(ValueError, match="gather_index must be on q's device cpu, got meta"):
        fusion(q, layers, gi.to("meta"), backend="torch")
    with pytest.raises(ValueError, match="q must be on the fusion's device cpu, got meta"):
        fusion(q.to("meta"), layers, gi, backend="torch")


def test_default_backend_is_auto(case):
    """With no backend argument the config's default ("auto") is used: the torch backend on a CPU tensor."""
    fusion, q, layers, gi = case
    assert fusion.config.backend == "auto"
    q = q.detach()
    routing, torch_routing = fusion.route(q), fusion.route(q, backend="torch")
    assert torch.equal(routing.topk_idx, torch_routing.topk_idx) and torch.equal(routing.alpha, torch_routing.alpha)
    with torch.no_grad():
        assert torch.equal(fusion(q, layers, gi), fusion(q, layers, gi, backend="torch"))


def test_auto_backend_resolved_for_the_query_device(case, monkeypatch):
    """begin() resolves backend=None/"auto" for q's device (triton on CUDA, torch elsewhere), not for the CPU: the
    device it asks about is q's (meta here; check_inputs off, since meta tensors hold no values)."""
    import geoalign.fusion as fusion_module

    seen = spy_on(monkeypatch, fusion_module, "resolve_backend_name", lambda name, default, device: device)
    fusion, q, _layers, gi = case
    fusion.to("meta")
    fusion.check_inputs = False
    stream = fusion.begin(q.detach().to("meta"), gi.to("meta"))
    assert seen == [torch.device("meta")] and stream.backend_name == "torch"


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_check_inputs_off_reads_no_values(case, backend):
    """check_inputs=False (for CUDA graphs and torch.compile): begin() reads no tensor value (no device->host sync),
    shown on the meta device, where any read fails; with the checks on, the same begin() does read."""
    fusion, q, _layers, gi = case
    fusion.to("meta")
    q, gi = q.detach().to("meta"), gi.to("meta")
    with pytest.raises((RuntimeError, NotImplementedError)):
        fusion.begin(q, gi, backend=backend)
    fusion.check_inputs = False
    fusion.begin(q, gi, backend=backend)
