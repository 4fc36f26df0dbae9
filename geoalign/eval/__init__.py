"""Benchmark evaluation: VSI-Bench, ScanQA and SQA3D with their published metrics.

Modules: ``vsibench`` / ``scanqa`` / ``sqa3d`` (data + metrics), ``textnorm`` (answer
normalisation, EM), ``caption`` (COCO caption metrics), ``media`` (frame loading),
``predictor`` (predictor protocol + GeoAlign adapter seam), ``runner`` (resumable
JSONL runs), ``tasks`` (registry), ``cli`` (``geoalign eval`` / ``geoalign score``).
"""
