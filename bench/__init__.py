"""geoalign's benchmark suite (import package ``geoalign_bench``; ``python -m bench`` from the repo root)."""
