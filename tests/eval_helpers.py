"""Benchmark folders for the eval tests (VSI-Bench, ScanQA, SQA3D, with synthetic videos and frame folders), a JSONL
reader, and a predictor that records what it was asked."""
from __future__ import annotations

import json

from media_helpers import write_frames, write_video

VSI_DOCS = [
    # (question_type, options, ground_truth, dataset, scene)
    ("object_counting", None, "3", "scannet", "scene0000_00"),
    ("object_abs_distance", None, "2.5", "scannet", "scene0000_00"),
    ("object_size_estimation", None, "80", "arkitscenes", "41069025"),
    ("room_size_estimation", None, "20.4", "arkitscenes", "41069025"),
    ("object_rel_distance", ["A. chair", "B. table", "C. sofa", "D. bed"], "B", "scannet", "scene0000_00"),
    ("object_rel_direction_easy", ["A. left", "B. right"], "A", "scannetpp", "0a5c013435"),
    ("object_rel_direction_medium", ["A. left", "B. right", "C. back"], "C", "scannetpp", "0a5c013435"),
    ("object_rel_direction_hard", ["A. front-left", "B. front-right", "C. back-left", "D. back-right"], "D",
     "scannetpp", "0a5c013435"),
    ("route_planning", ["A. Turn Left", "B. Turn Right", "C. Go Forward"], "A", "scannet", "scene0000_00"),
    ("obj_appearance_order", ["A. a, b, c", "B. b, a, c", "C. c, a, b", "D. a, c, b"], "C", "arkitscenes",
     "41069025"),
]


def make_vsibench(d, size=32, width=None, frames_per_dataset=None):
    """A VSI-Bench folder: test.jsonl + {dataset}/{scene}.mp4 (``frames_per_dataset``: video length per
    dataset, default 12)."""
    rows = []
    for i, (qt, opts, gt, ds, scene) in enumerate(VSI_DOCS):
        rows.append({"id": i, "dataset": ds, "scene_name": scene, "question_type": qt,
                     "question": f"Question {i} about {qt}?", "options": opts, "ground_truth": gt})
        p = d / ds / f"{scene}.mp4"
        if not p.exists():
            write_video(str(p), n=(frames_per_dataset or {}).get(ds, 12), size=size, width=width)
    with open(d / "test.jsonl", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    return str(d)


def make_scanqa(d, size=None, width=None):
    """A ScanQA folder: ScanQA_v1.0_val.json, scene0011_00 as a posed_images frame folder (10 frames),
    scene0015_00 as a 12-frame video. Frames 16x16 (folder) / 32x32 (video) unless ``size``/``width``."""
    docs = [
        {"question_id": "val-scene0011_00-0", "scene_id": "scene0011_00", "question": "What color is the chair?",
         "answers": ["brown", "brown wooden"], "object_ids": [1], "object_names": ["chair"]},
        {"question_id": "val-scene0011_00-1", "scene_id": "scene0011_00", "question": "What is by the door?",
         "answers": ["trash can"], "object_ids": [2], "object_names": ["trash_can"]},
        {"question_id": "val-scene0015_00-0", "scene_id": "scene0015_00", "question": "How many tables?",
         "answers": ["2", "two tables"], "object_ids": [3], "object_names": ["table"]},
    ]
    (d / "ScanQA_v1.0_val.json").write_text(json.dumps(docs))
    write_frames(str(d / "scannet" / "posed_images" / "scene0011_00"), size=size or 16, width=width)
    write_video(str(d / "scannet" / "posed_images" / "scene0015_00.mp4"), size=size or 32, width=width)
    return str(d)


def make_sqa3d(d, size=None, width=None, folder_frames=5):
    """An SQA3D folder: balanced/ question + annotation files, scene0050_00 as a 12-frame video,
    scene0060_00 as a frame folder of ``folder_frames`` frames."""
    b = d / "balanced"
    b.mkdir()
    qs = [{"question_id": 220602000000 + i, "scene_id": s, "situation": sit, "question": q,
           "alternative_situation": []}
          for i, (s, sit, q) in enumerate([
              ("scene0050_00", "I am sitting on the sofa.", "What is in front of me?"),
              ("scene0050_00", "I am facing the window.", "Is the door on my left?"),
              ("scene0060_00", "I just entered the room.", "How many chairs can I see?")])]
    ans = ["table", "yes", "2"]
    anns = [{"question_id": q["question_id"], "scene_id": q["scene_id"],
             "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": 1}]} for q, a in zip(qs, ans)]
    (b / "v1_balanced_questions_test_scannetv2.json").write_text(json.dumps({"questions": qs}))
    (b / "v1_balanced_sqa_annotations_test_scannetv2.json").write_text(json.dumps({"annotations": anns}))
    write_video(str(d / "videos" / "scene0050_00.mp4"), size=size or 32, width=width)
    write_frames(str(d / "videos" / "scene0060_00"), n=folder_frames, size=size or 16, width=width)
    return str(d)


def lines(path):
    with open(path) as f:
        return [json.loads(x) for x in f if x.strip()]


class RecordingPredictor:
    """The fake predictor's hash answers; every sample asked about is kept in ``RecordingPredictor.seen`` (for a
    ``--predictor eval_helpers:RecordingPredictor`` run, whose predictor object the test never sees)."""

    seen: list = []

    def __init__(self, model_dir=None, **kwargs):
        from geoalign.eval.fake import FakePredictor

        self.fake = FakePredictor(model_dir, **kwargs)
        self.max_batch_size = self.fake.max_batch_size

    def predict(self, samples):
        RecordingPredictor.seen.extend(samples)
        return self.fake.predict(samples)
