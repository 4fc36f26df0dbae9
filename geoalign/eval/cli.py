"""``geoalign eval`` and ``geoalign score`` sub-commands.

The package's top-level CLI registers them with :func:`add_eval_parser` and
:func:`add_score_parser`; ``python -m geoalign.eval.cli`` runs them stand-alone.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..atomic_files import write_json
from ..geometry.frames import FRAME_SAMPLING
from .predictor import FUSION_BACKENDS
from . import sqa3d, vsibench
from .tasks import DEFAULT_SPLIT, TASKS

_META_KEYS = ("task", "split", "num_frames", "frame_sampling", "max_new_tokens", "prompt_suffix", "sqa3d_style",
              "model", "predictor")
#: the value of a setting that a meta file written before the setting existed implies
_META_DEFAULTS = {"frame_sampling": FRAME_SAMPLING[0], "sqa3d_style": "default"}


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``eval TASK --data DIR --model DIR ...``."""
    p = subparsers.add_parser(
        "eval", help="run a model on VSI-Bench / ScanQA / SQA3D and score it",
        description="Answer every question of a benchmark read from local files (greedy decoding), "
                    "appending predictions to a JSONL as they come (reruns resume), then score them.")
    p.add_argument("task", choices=TASKS)
    p.add_argument("--data", required=True, help="benchmark folder (annotation files; see docs)")
    p.add_argument("--model", help="GeoAlign checkpoint folder (loaded by geoalign.eval.predictor.load_predictor)")
    p.add_argument("--predictor", help="use 'package.module:factory' instead of the GeoAlign adapter; "
                                        "the factory receives --model and keyword options")
    p.add_argument("--media", help="video/frame root (default: --data for VSI-Bench; for ScanQA/SQA3D the "
                                   "first of DATA/{scannet/posed_images,posed_images,scannet/videos,videos,"
                                   "scannet/frames,frames,scannet,.} holding {scene_id}.mp4 or {scene_id}/)")
    p.add_argument("--split", help="dataset split (default: vsibench test, scanqa val, sqa3d test)")
    p.add_argument("--out", help="predictions JSONL (default: eval_results/TASK/predictions.jsonl)")
    p.add_argument("--num-frames", type=int, default=32, help="frames uniformly sampled per question (32)")
    p.add_argument("--frame-sampling", choices=FRAME_SAMPLING, default=FRAME_SAMPLING[0],
                   help="indices round(linspace(0, n-1, N)) (linspace-round, default) or truncated as VG-LLM's "
                        "np.linspace(...).astype(int) (linspace-floor)")
    p.add_argument("--batch-size", type=int, default=1, help="questions per predict() call (capped by the predictor)")
    p.add_argument("--max-new-tokens", type=int, help="generation budget (default: vsibench 16, others 32)")
    p.add_argument("--prompt-suffix", help="override the ScanQA/SQA3D answer instruction")
    p.add_argument("--limit", type=int, help="only the first N questions (quick run)")
    p.add_argument("--device", help="torch device for the model (default: cuda if available)")
    p.add_argument("--dtype", default="auto",
                   help="model dtype: auto (bfloat16 on CUDA, float32 on CPU), bfloat16, float16, float32")
    p.add_argument("--attn", help="Qwen attn_implementation, e.g. sdpa (default), flash_attention_2, eager")
    p.add_argument("--fusion-backend", choices=FUSION_BACKENDS,
                   help="GeoAlign fusion backend (default: the one in the model's geoalign_config.json)")
    p.add_argument("--vsibench-subset", choices=vsibench.SUBSETS, default="full",
                   help="VSI-Bench: every test question (full) or VSI-Bench-Debiased (debiased; needs "
                        "test_debiased.parquet or pruned_ids.txt of the dataset repo in --data)")
    p.add_argument("--restart", action="store_true", help="discard an existing predictions file instead of resuming")
    p.add_argument("--no-score", action="store_true", help="only write predictions")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_scoring_options(p)
    p.set_defaults(func=run_eval_command)
    return p


def _add_scoring_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-java", action="store_true", help="ScanQA: do not use Java (no METEOR, Python tokenizer)")
    p.add_argument("--vsibench-no-strip", action="store_true",
                   help="VSI-Bench: parse each answer unstripped, as lmms-eval's task code does (default: stripped)")
    p.add_argument("--sqa3d-style", choices=sqa3d.STYLES, default="default",
                   help="SQA3D: prompt (eval) and answer parsing: default, or vg-llm (VG-LLM's prompt, first line "
                        "of the answer, 16 new tokens)")


def _scoring_options(args) -> dict:
    return {"use_java": False if args.no_java else None, "vsibench_strip": not args.vsibench_no_strip,
            "sqa3d_style": args.sqa3d_style}


def add_score_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``score TASK predictions.jsonl``."""
    p = subparsers.add_parser("score", help="metrics of a predictions JSONL, in the paper's layout")
    p.add_argument("task", choices=TASKS)
    p.add_argument("predictions", help="JSONL written by `geoalign eval` (or in the same record format)")
    p.add_argument("--json", dest="json_out", help="also write the scores as JSON to this path")
    _add_scoring_options(p)
    p.set_defaults(func=run_score_command)
    return p


def _meta_path(out: str) -> str:
    return out + ".meta.json"


def _scores_path(out: str) -> str:
    return (out[:-6] if out.endswith(".jsonl") else out) + ".scores.json"


def _print_scores(task: str, scores: dict) -> None:
    from .tasks import format_scores
    print(format_scores(task, scores))


def run_eval_command(args) -> int:
    """Body of ``geoalign eval``."""
    from .predictor import load_predictor, load_predictor_from_spec
    from .runner import run_eval, score_file
    from .tasks import load_samples

    if not args.model and not args.predictor:
        print("error: give --model DIR (or --predictor module:factory)", file=sys.stderr)
        return 2
    out = args.out or os.path.join("eval_results", args.task, "predictions.jsonl")
    meta = {"task": args.task, "split": args.split or DEFAULT_SPLIT[args.task], "num_frames": args.num_frames,
            "frame_sampling": args.frame_sampling, "sqa3d_style": args.sqa3d_style,
            "max_new_tokens": args.max_new_tokens, "prompt_suffix": args.prompt_suffix,
            "model": os.path.abspath(args.model) if args.model and os.path.exists(args.model) else args.model,
            "predictor": args.predictor, "dtype": args.dtype, "attn": args.attn,
            "fusion_backend": args.fusion_backend}
    if args.restart:
        for p in (out, _meta_path(out), _scores_path(out)):
            if os.path.exists(p):
                os.remove(p)
    if os.path.exists(out) and os.path.exists(_meta_path(out)):
        with open(_meta_path(out)) as f:
            old = json.load(f)
        diff = {k: (old.get(k, _META_DEFAULTS.get(k)), meta[k]) for k in _META_KEYS
                if old.get(k, _META_DEFAULTS.get(k)) != meta[k]}
        if diff:
            print(f"error: {out} was written with other settings {diff}; use --restart or another --out",
                  file=sys.stderr)
            return 2
    try:
        samples = load_samples(args.task, args.data, media_dir=args.media, split=args.split,
                               num_frames=args.num_frames, max_new_tokens=args.max_new_tokens,
                               prompt_suffix=args.prompt_suffix, limit=args.limit,
                               frame_sampling=args.frame_sampling, vsibench_subset=args.vsibench_subset,
                               sqa3d_style=args.sqa3d_style)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    opts = {"device": args.device, "dtype": args.dtype, "max_batch_size": args.batch_size}
    # newer options go to --predictor factories only when given (older factories may not take them)
    opts.update({k: v for k, v in (("attn_implementation", args.attn), ("fusion_backend", args.fusion_backend))
                 if v is not None})
    try:
        predictor = (load_predictor_from_spec(args.predictor, args.model, **opts) if args.predictor
                     else load_predictor(args.model, **opts))
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (FileNotFoundError, ValueError) as e:
        print(f"error: cannot load the model: {e}", file=sys.stderr)
        return 2
    write_json(_meta_path(out), meta)
    info = run_eval(samples, predictor, out, batch_size=args.batch_size, progress=not args.no_progress)
    print(f"{info['written']} new predictions ({info['skipped']} already in {out}) in {info['seconds']:.1f}s")
    if args.no_score:
        return 0
    scores = score_file(args.task, out, ids=[s.id for s in samples], **_scoring_options(args))
    if args.task == "vsibench":
        scores["subset"] = args.vsibench_subset
    write_json(_scores_path(out), scores)
    _print_scores(args.task, scores)
    print(f"scores written to {_scores_path(out)}")
    return 0


def run_score_command(args) -> int:
    """Body of ``geoalign score``."""
    from .runner import score_file

    if not os.path.isfile(args.predictions):
        print(f"error: no such file {args.predictions}", file=sys.stderr)
        return 2
    try:
        scores = score_file(args.task, args.predictions, **_scoring_options(args))
    except (ValueError, KeyError) as e:
        print(f"error: cannot score {args.predictions} as {args.task}: {e!r}", file=sys.stderr)
        return 2
    _print_scores(args.task, scores)
    if args.json_out:
        write_json(args.json_out, scores)
    return 0


def main(argv=None) -> int:
    """Stand-alone entry point (``python -m geoalign.eval.cli eval|score ...``)."""
    parser = argparse.ArgumentParser(prog="geoalign")
    sub = parser.add_subparsers(dest="command", required=True)
    add_eval_parser(sub)
    add_score_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
