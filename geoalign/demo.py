"""``geoalign demo --out DIR``: everything a newcomer needs to try every command without weights or data sets.

Writes, from one procedural room (geoalign.gap.procedural: labelled boxes, ray-cast, so every ground truth is
exact):

  DIR/model/        a tiny random GeoAlign model (Qwen2.5-VL with 2 layers, a 4-layer VGGT, the fusion) and its
                    byte-level tokenizer; it answers gibberish, fast, through the real code paths
  DIR/scene.mp4     the room's frames as a video;  DIR/frames/  the same frames as an image folder
  DIR/scenes/room0  the room in ScanNet's exported layout (color/ depth/ pose/ intrinsic/ labels): gap-data's input
  DIR/vsibench/     a VSI-Bench folder (test.jsonl + arkitscenes/room0.mp4) with questions whose answers are known
                    from the room's geometry: object counts, object sizes and distances between objects

Nothing is downloaded. The README's "Try it" section runs every command on these files.
"""
from __future__ import annotations

import argparse
import json
import os

from .cli_args import fail, non_negative_int, output_dir

DEMO_HELP = __doc__.split("\n\n", 1)[1].rsplit("\n\n", 1)[0] + """

then, for example:
  geoalign answer --model DIR/model --video DIR/scene.mp4 --question "How many chairs are there?"
  geoalign routes --model DIR/model --video DIR/scene.mp4 --images DIR/frames --out DIR/routes
  geoalign gap-data --scenes DIR/scenes --out DIR/gap/pretrain.json
  geoalign eval vsibench --data DIR/vsibench --model DIR/model --out DIR/eval/predictions.jsonl
  geoalign score vsibench DIR/eval/predictions.jsonl
"""
NUM_FRAMES = 8
HEIGHT, WIDTH = 96, 128        # even sides (MPEG-4); the processor resizes to VGGT's width 518


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help="write a tiny random model, a video, a frame folder, a scene and a "
                                           "VSI-Bench folder to try every command on",
                              description=DEMO_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=output_dir, help="directory to write into (must be empty or new)")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="seed of the room and of the model's weights (default 0)")
    p.set_defaults(func=run_demo)
    return p


def run_demo(args: argparse.Namespace) -> int:
    if os.path.isdir(args.out) and os.listdir(args.out):
        return fail("demo", f"{args.out!r} is not empty; give a new or empty directory")
    paths = write_demo(args.out, seed=args.seed)
    width = max(len(k) for k in paths)
    for name, path in paths.items():
        print(f"{name:<{width}}  {path}")
    print(f"try: geoalign answer --model {paths['model']} --video {paths['video']} "
          "--question \"How many chairs are there?\"")
    return 0


def write_demo(out: str | os.PathLike, seed: int = 0) -> dict[str, str]:
    """Write the demo files under ``out`` (see the module docstring); returns {what: path}."""
    from .gap.procedural import make_box_room, write_scannet_layout
    from .training.synthetic import write_image_folder, write_video

    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    room = make_box_room(seed=seed, num_frames=NUM_FRAMES, height=HEIGHT, width=WIDTH, num_boxes=4)
    frames = list(room.color)
    paths = {"model": os.path.join(out, "model"), "video": os.path.join(out, "scene.mp4"),
             "frames": os.path.join(out, "frames"), "scenes": os.path.join(out, "scenes"),
             "vsibench": os.path.join(out, "vsibench")}
    write_video(paths["video"], frames)
    write_image_folder(paths["frames"], frames)
    write_scannet_layout(room, os.path.join(paths["scenes"], "room0"))
    write_vsibench([room], paths["vsibench"])
    write_tiny_model(paths["model"], seed=seed)
    return paths


def write_tiny_model(path: str, seed: int = 0) -> None:
    """A tiny random GeoAlign model directory with its tokenizer (geoalign.tiny), loadable by every command."""
    from .processing import GeoAlignProcessor
    from .tiny import tiny_model

    model, tokenizer = tiny_model(group_size=4, seed=seed)
    model.save_pretrained(path, processor=GeoAlignProcessor(tokenizer, None))


def vsibench_questions(room) -> list[dict]:
    """VSI-Bench questions about ``room`` with exact answers (the benchmark's wording and answer formats):
    how many objects of each label, each object's longest side in cm, and the distance between the closest points
    of two objects in metres (VSI-Bench's absolute distance)."""
    import numpy as np

    from .gap.procedural import OBJECTS

    names = [OBJECTS[label] for label, _, _ in room.boxes]
    rows = []
    for name in sorted(set(names)):
        rows.append(("object_counting", f"How many {name}(s) are in this room?", str(names.count(name))))
    for (label, lo, hi), name in zip(room.boxes, names):
        if names.count(name) == 1:
            side = float(np.max(hi - lo)) * 100
            rows.append(("object_size_estimation", f"What is the length of the longest dimension (length, width, "
                         f"or height) of the {name}, measured in centimeters?", f"{side:.0f}"))
    unique = [(lo, hi, n) for (_, lo, hi), n in zip(room.boxes, names) if names.count(n) == 1]
    for (lo_a, hi_a, a), (lo_b, hi_b, b) in zip(unique, unique[1:]):
        gap = np.maximum(0.0, np.maximum(lo_a - hi_b, lo_b - hi_a))   # per axis, 0 where the boxes overlap
        rows.append(("object_abs_distance", f"Measuring from the closest point of each object, what is the "
                     f"direct distance between the {a} and the {b} (in meters)?", f"{float(np.linalg.norm(gap)):.1f}"))
    return [{"id": i, "dataset": "arkitscenes", "scene_name": "room0", "question_type": qt, "question": q,
             "options": None, "ground_truth": gt} for i, (qt, q, gt) in enumerate(rows)]


def write_vsibench(rooms, root: str) -> int:
    """A VSI-Bench folder of procedural ``rooms``: room k's video ``arkitscenes/room{k}.mp4`` and its questions
    (:func:`vsibench_questions`, scene ``room{k}``, ids counting across rooms) in test.jsonl; returns their number."""
    from .atomic_files import write_text
    from .training.synthetic import write_video

    os.makedirs(os.path.join(root, "arkitscenes"), exist_ok=True)
    rows = []
    for k, room in enumerate(rooms):
        write_video(os.path.join(root, "arkitscenes", f"room{k}.mp4"), list(room.color))
        rows += [{**r, "id": len(rows) + i, "scene_name": f"room{k}"} for i, r in enumerate(vsibench_questions(room))]
    write_text(os.path.join(root, "test.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)