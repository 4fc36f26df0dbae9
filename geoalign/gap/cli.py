"""geoalign gap-data: GAP-MLLM training records from posed RGB-D scenes (ScanNet's exported layout).

    geoalign gap-data --scenes scans/ --out data/gap_pretrain.json [--prompts-per-sample 4 --frames 4
                      --samples-per-scene 8 --seed 0]                            # stage 1: the pre-training task
    geoalign gap-data --task finetune --scenes scans/ --out data/gap_finetune.json [--grounding-per-sample 2
                      --captions-per-sample 2 --scanrefer ScanRefer_filtered_train.json]
                                        # stage 2: detection, grounding (marker + language), dense captioning

Every sub-directory of --scenes holding color/ is a scene. Marked frames go to <out stem>_media/ beside
--out; image paths in the records are relative to the directory of --out (the trainer's media_root).
Finetune: a scene's descriptions come from --scanrefer (ScanRefer's JSON; entries of that scene_id = folder name),
else from the scene's own scanrefer.json (written for procedural scenes); without either, the scene gets detection
and marker grounding records only.
"""
from __future__ import annotations

import argparse
import os

from ..cli_args import fail, local_path, non_negative_int, output_file, positive_int


def add_gap_data_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("gap-data", help="GAP-MLLM pre-training data: numbered visual prompts with their label "
                              "and 3D point, from posed RGB-D scenes", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenes", required=True, type=local_path,
                   help="directory of scenes in ScanNet's exported layout (or written by `geoalign demo`)")
    p.add_argument("--out", required=True, type=output_file, help="output JSON file (LLaVA-style records)")
    p.add_argument("--task", choices=["pretrain", "finetune"], default="pretrain",
                   help="pretrain: visual prompts -> label + 3D point; finetune: 3D detection and grounding")
    p.add_argument("--prompts-per-sample", type=positive_int, default=4,
                   help="pretrain: numbered markers per sample (default 4)")
    p.add_argument("--grounding-per-sample", type=positive_int, default=2,
                   help="finetune: grounding queries per sample (default 2)")
    p.add_argument("--box-source", choices=["annotated", "clip_visible"], default=None,
                   help="finetune: boxes from ScanNet's annotated mesh (the benchmarks' boxes) or of the clip's "
                        "visible depth pixels (default: annotated where the scene has the mesh annotation files)")
    p.add_argument("--captions-per-sample", type=non_negative_int, default=None,
                   help="finetune: dense-captioning records per sample (default: --grounding-per-sample)")
    p.add_argument("--captions-once-per-object", action="store_true",
                   help="finetune: at most one dense-captioning record per object and scene (an evaluation set: "
                        "Scan2Cap scores each object once, as Video-3D LLM's validation records)")
    p.add_argument("--label-map", type=local_path, default=None,
                   help="finetune: ScanNet's scannetv2-labels.combined.tsv, so that ScanRefer's unique / multiple "
                        "split uses its 18 classes, as ScanRefer does (default: the object names themselves)")
    p.add_argument("--scanrefer", type=local_path, default=None,
                   help="finetune: ScanRefer-format JSON of descriptions (default: each scene's scanrefer.json, if "
                        "any)")
    p.add_argument("--frames", type=positive_int, default=4, help="frames per sample (default 4)")
    p.add_argument("--samples-per-scene", type=positive_int, default=8, help="samples per scene (default 8)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_gap_data)
    return p


def scene_dirs(root: str) -> list[str]:
    """Sub-directories of ``root`` that hold a ``color/`` folder, sorted by name."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"scenes directory not found: {root!r}")
    found = sorted(os.path.join(root, d) for d in os.listdir(root) if os.path.isdir(os.path.join(root, d, "color")))
    if not found:
        raise ValueError(f"no scenes in {root!r}: expected sub-directories with color/, depth/, pose/, intrinsic/")
    return found


def run_gap_data(args: argparse.Namespace) -> int:
    from ..atomic_files import write_json
    from .scenes import load_scannet_scene

    if args.task == "pretrain":
        from .pretrain_data import make_pretrain_records

        def make(scene, media, out_dir):
            return make_pretrain_records(scene, media, out_dir, samples=args.samples_per_scene, frames=args.frames,
                                         prompts=args.prompts_per_sample, seed=args.seed)
    else:
        from .finetune_data import make_finetune_records
        from .language import read_scanrefer, read_scannet_label_map
        from .procedural import SCANREFER_NAME

        try:
            shared = read_scanrefer(args.scanrefer) if args.scanrefer else None
            label_map = read_scannet_label_map(args.label_map) if args.label_map else None
        except (FileNotFoundError, ValueError) as e:
            return fail("gap-data", e)

        def make(scene, media, out_dir):
            own = os.path.join(scene.root, SCANREFER_NAME)
            descriptions = shared if shared is not None else read_scanrefer(own) if os.path.isfile(own) else None
            source = args.scanrefer if shared is not None else own
            return make_finetune_records(scene, media, out_dir, samples=args.samples_per_scene, frames=args.frames,
                                         grounding_per_sample=args.grounding_per_sample, seed=args.seed,
                                         box_source=args.box_source, descriptions=descriptions,
                                         captions_per_sample=args.captions_per_sample, descriptions_source=source,
                                         captions_once_per_object=args.captions_once_per_object,
                                         label_map=label_map)

    try:
        scenes = scene_dirs(args.scenes)
    except (FileNotFoundError, ValueError) as e:
        return fail("gap-data", e)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    media = os.path.join(out_dir, os.path.splitext(os.path.basename(args.out))[0] + "_media")
    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(scenes), desc="gap-data", unit="scene")
    records = []
    try:
        for path in scenes:
            try:
                scene = load_scannet_scene(path)
                records += make(scene, media, out_dir)
            except (FileNotFoundError, ValueError) as e:
                return fail("gap-data", e)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    write_json(args.out, records)
    print(f"wrote {len(records)} records from {len(scenes)} scene{'s' if len(scenes) != 1 else ''} to {args.out} "
          f"(media: {media})")
    return 0
