"""pytest-benchmark entry points for small cases: `pytest bench/ --benchmark-only`. Nothing here asserts a time;
the comparison lives in the benchmark tables (`geoalign bench`)."""
from __future__ import annotations

import pytest
import torch

from geoalign.backends import available_backends

from .encoder_case import BANK, encoder_setup
from .fusion_case import make_case
from .shapes import FusionShape

SMALL = FusionShape("small", hidden_size=128, geo_dim=128, projector_hidden=256, router_hidden=32)
CPU_BACKENDS = [b for b in available_backends(torch.device("cpu")) if b != "triton"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fusion_fwdbwd(benchmark, backend):
    fusion, q, layers, gather_index = make_case(SMALL, 1, torch.float32, torch.device("cpu"))

    def step():
        q.grad = None
        fusion.zero_grad(set_to_none=True)
        fusion(q, layers, gather_index, backend=backend).sum().backward()

    benchmark(step)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fusion_infer(benchmark, backend):
    fusion, q, layers, gather_index = make_case(SMALL, 1, torch.float32, torch.device("cpu"))

    def infer():
        with torch.no_grad():
            return fusion(q, layers, gather_index, backend=backend)

    benchmark(infer)


def test_encoder_stream_layers(benchmark):
    from geoalign.geometry import VGGTAggregator

    cfg, (H, W), _ = encoder_setup(torch.device("cpu"), torch.float32)
    aggregator = VGGTAggregator(cfg)
    images = torch.rand(1, 1, 3, H, W)

    def stream():
        for _ in aggregator.iter_layers(images, BANK):
            pass

    benchmark(stream)
