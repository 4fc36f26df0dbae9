"""GAP-MLLM (Geometry-Aligned Pre-training for 3D spatial perception in MLLMs): posed RGB-D scenes, the
visual-prompted pre-training task, and procedural scenes whose geometry is known exactly (for tests).

    scenes.py        PosedScene and the ScanNet-layout reader (color/ depth/ pose/ intrinsic/ label-filt/
                     instance-filt/)
    annotations.py   ScanNet's mesh annotations (ply, segments, aggregation, axisAlignment) -> the benchmarks' boxes
    procedural.py    boxes in a room, ray-cast to exact depth, poses, labels and instance masks (numpy only)
    pretrain_data.py numbered visual prompts drawn on frames; targets = label + 3D point in the first frame's camera
                     coordinates; LLaVA-style records for the trainer (``geoalign gap-data``)
    finetune_data.py detection, grounding (marker / language) and dense-captioning records (``--task finetune``)
    language.py      ScanRefer-format descriptions: the reader, and geometry-checked ones for procedural scenes
"""
