"""The pytest marks transformers' own test modules use, registered so that collecting them warns about nothing."""
from __future__ import annotations

TRANSFORMERS_MARKS = ("accelerate_tests", "flash_attn_test", "flash_attn_3_test", "flash_attn_4_test",
                      "torch_compile_test", "generate", "is_pipeline_test", "is_staging_test", "bitsandbytes",
                      "torch_export_test")


def pytest_configure(config):
    for mark in TRANSFORMERS_MARKS:
        config.addinivalue_line("markers", f"{mark}: a transformers test mark (tests/hf_conformance)")
