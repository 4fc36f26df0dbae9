"""``geoalign answer`` and ``geoalign convert`` (local files only), and the model arguments ``routes`` shares.

Parsing imports nothing heavy; torch and transformers are imported when a command runs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING

from .backends import ALL_BACKENDS
from .cli_args import (UsageError, check_attn, check_backend, fail, local_path, output_dir, positive_int,
                       resolve_device, use_device)
from .eval.predictor import DTYPES
from .lazy_exports import deprecated_aliases

if TYPE_CHECKING:
    import torch

ANSWER_HELP = """Answer one question about a video or a folder of frames with a GeoAlign model (greedy decoding).

examples:
  geoalign answer --model runs/geoalign-3b --video scene.mp4 --question "How many chairs are in the room?"
  geoalign answer --qwen /models/Qwen2.5-VL-3B-Instruct --vggt /models/VGGT-1B --images frames/ --question "..."
  geoalign demo --out demo && geoalign answer --model demo/model --video demo/scene.mp4 --question "What is here?"

Only local files are read; nothing is downloaded.
"""


def add_answer_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("answer", help="answer a question about a video or a folder of frames",
                              description=ANSWER_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    media = p.add_mutually_exclusive_group(required=True)
    media.add_argument("--video", type=local_path, help="video file (decoded with PyAV)")
    media.add_argument("--images", type=local_path, help="folder of frames, read in natural sort order")
    p.add_argument("--question", required=True, help="the question, in plain text")
    p.add_argument("--num-frames", type=positive_int, default=32, help="frames sampled uniformly (default 32)")
    p.add_argument("--max-new-tokens", type=positive_int, default=128,
                   help="most tokens to generate (default 128)")
    p.add_argument("--backend", default=None, choices=ALL_BACKENDS,
                   help="fusion backend (default: the model's own, i.e. triton on CUDA, torch on CPU)")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of plain text")
    p.set_defaults(func=run_answer)
    return p


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--model | --qwen/--vggt/--fusion, --device, --dtype, --attn (what load_model_and_processor reads)."""
    src = p.add_argument_group("model: a saved GeoAlign directory, or the base checkpoints (local paths)")
    src.add_argument("--model", type=local_path,
                     help="GeoAlign model directory (written by save_pretrained, `geoalign train` or `geoalign demo`)")
    src.add_argument("--qwen", type=local_path, help="Qwen2.5-VL checkpoint directory, with its tokenizer")
    src.add_argument("--vggt", type=local_path, help="VGGT checkpoint: a directory, model.safetensors or model.pt")
    src.add_argument("--fusion", type=local_path,
                     help="trained fusion directory (geoalign_config.json + fusion.safetensors); default: the "
                          "model's own, or a fresh untrained fusion with --qwen/--vggt")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--attn", default=None, help="Qwen attn_implementation: sdpa (default), eager or "
                                                "flash_attention_2 (needs flash-attn)")


def check_model_arguments(args: argparse.Namespace):
    """Run-time checks before anything loads: the model source, the device and the backend. Returns the device.
    Raises UsageError."""
    if args.model is None and (args.qwen is None or args.vggt is None):
        raise UsageError("give --model DIR, or both --qwen DIR and --vggt PATH (and optionally --fusion DIR)")
    if args.model is not None and (args.qwen is not None or args.vggt is not None):
        raise UsageError("give either --model or --qwen/--vggt, not both")
    if args.model is not None and not os.path.isdir(args.model):
        raise UsageError(f"--model {args.model!r} is a file; expected a model directory")
    device = resolve_device(args.device)
    check_backend(getattr(args, "backend", None), device)
    check_attn(args.attn)
    use_device(device)
    return device


def load_model_and_processor(args: argparse.Namespace, device):
    """(model in eval mode, processor) from --model or --qwen/--vggt (+ --fusion), --dtype, --attn and
    --num-frames, on ``device``. Raises FileNotFoundError / ValueError for missing or wrong checkpoints."""
    import torch

    from .modeling import GeoAlignForConditionalGeneration
    from .processing import GeoAlignProcessor

    dtype_name = DTYPES[args.dtype] if args.dtype else ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    if args.model is not None:
        model = GeoAlignForConditionalGeneration.from_pretrained(
            args.model, geoalign=args.fusion, dtype=dtype, device=device, attn_implementation=args.attn)
        processor_dir = args.model
    else:
        model = GeoAlignForConditionalGeneration.from_pretrained(
            qwen=args.qwen, vggt=args.vggt, geoalign=args.fusion, dtype=dtype, device=device,
            attn_implementation=args.attn)
        processor_dir = args.qwen
    processor = GeoAlignProcessor.from_pretrained(processor_dir, group_size=model.group_size,
                                                  num_frames=args.num_frames)
    return model.eval(), processor


def run_answer(args: argparse.Namespace) -> int:
    try:
        device = check_model_arguments(args)
        model, processor = load_model_and_processor(args, device)
        inputs = processor(args.video or args.images, args.question)
    except (FileNotFoundError, ValueError) as e:
        return fail("answer", e)
    inputs = move_to(inputs, device)
    out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                         fusion_backend=args.backend)
    answer = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:])[0].strip()
    if args.json:
        print(json.dumps({"question": args.question, "answer": answer,
                          "source": args.video or args.images, "num_frames": args.num_frames}))
    else:
        print(answer)
    return 0


def add_convert_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "convert", help="rewrite a model directory of an earlier geoalign (geoalign_model.json) as a transformers "
        "checkpoint", description="Rewrite a model directory written by an earlier geoalign (geoalign_model.json, "
        "qwen/, vggt/, fusion files) as one transformers checkpoint, which from_pretrained and every command read.")
    p.add_argument("old", type=local_path, help="the earlier directory")
    p.add_argument("new", type=output_dir, help="new directory (must not exist, or be a model directory written by "
                                                "geoalign)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: the checkpoint's")
    p.set_defaults(func=run_convert)
    return p


def run_convert(args: argparse.Namespace) -> int:
    import torch

    from .serialization import is_legacy_directory

    if not is_legacy_directory(args.old):
        return fail("convert", f"{args.old!r} is not a legacy geoalign directory (it has no geoalign_model.json, "
                               "or it already has a transformers config.json)")
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    try:
        convert_legacy_directory(args.old, args.new, dtype=dtype)
    except (FileNotFoundError, ValueError, FileExistsError) as e:
        return fail("convert", e)
    print(f"wrote {args.new}")
    return 0


def convert_legacy_directory(old: str | os.PathLike, new: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """Rewrite a legacy GeoAlign directory as a transformers checkpoint (with its tokenizer/processor files)."""
    from .modeling import GeoAlignForConditionalGeneration
    from .processing import GeoAlignProcessor
    from .serialization import legacy_parts

    qwen_dir, _vggt, _fusion = legacy_parts(old)
    model = GeoAlignForConditionalGeneration.from_pretrained(old, dtype=dtype)
    processor = None
    if os.path.isfile(os.path.join(qwen_dir, "tokenizer_config.json")):
        processor = GeoAlignProcessor.from_pretrained(qwen_dir, group_size=model.group_size)
    model.save_pretrained(new, processor=processor)


def move_to(value, device):
    """Tensors (also inside lists and dicts) moved to ``device``; everything else as it is."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, list):
        return [move_to(x, device) for x in value]
    if isinstance(value, dict):
        return {k: move_to(v, device) for k, v in value.items()}
    return value


def main(argv: list[str] | None = None) -> int:
    """Deprecated (one release): ``python -m geoalign.model_cli answer ...`` is ``geoalign answer ...``."""
    import warnings

    from .cli_args import ArgumentParser

    warnings.warn("geoalign.model_cli.main is deprecated; use the geoalign command (geoalign.cli.main)",
                  DeprecationWarning, stacklevel=2)
    parser = ArgumentParser(prog="geoalign")
    add_answer_parser(parser.add_subparsers(dest="command", required=True))
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    return int(args.func(args) or 0)


__getattr__ = deprecated_aliases(__name__, {"FUSION_BACKENDS": "geoalign.backends.registry:ALL_BACKENDS"})

if __name__ == "__main__":
    sys.exit(main())
