"""Benchmark evaluation: VSI-Bench, ScanQA and SQA3D with their published metrics.

Modules: ``vsibench`` / ``scanqa`` / ``sqa3d`` (data + metrics), ``textnorm`` (answer
normalisation, EM), ``caption`` (COCO caption metrics), ``media`` (where a question's
frames are; decoding and sampling by ``geoalign.geometry``), ``predictor`` (predictor
protocol + the GeoAlign model/processor adapter), ``runner`` (resumable
JSONL runs, shard files), ``distributed`` (sharded runs over several processes), ``tasks``
(registry), ``cli`` (``geoalign eval`` / ``geoalign score``).
"""
