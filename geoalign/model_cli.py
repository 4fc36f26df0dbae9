"""``geoalign answer`` and ``geoalign convert`` (local files only).

    geoalign answer --model DIR --video clip.mp4 --question "How far is the chair from the door?"
    geoalign answer --qwen QWEN_DIR --vggt VGGT_DIR_OR_FILE [--fusion FUSION_DIR] --images frames/ --question "..."
    geoalign convert OLD_DIR NEW_DIR      # a legacy geoalign directory -> a transformers checkpoint

Register with ``add_answer_parser(subparsers)`` / ``add_convert_parser(subparsers)``; each sets ``func``.
"""
from __future__ import annotations

import argparse
import json
import sys

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
FUSION_BACKENDS = ("reference", "torch", "triton", "cuda")  # geoalign.backends.ALL_BACKENDS (a test checks)


def add_answer_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("answer", help="answer a question about a video or image folder with a GeoAlign model",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    media = p.add_mutually_exclusive_group(required=True)
    media.add_argument("--video", help="video file")
    media.add_argument("--images", help="folder of frames (natural sort order)")
    p.add_argument("--question", required=True)
    p.add_argument("--num-frames", type=int, default=32, help="frames sampled uniformly (default 32)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--backend", default=None, choices=FUSION_BACKENDS, help="fusion backend")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of plain text")
    p.set_defaults(func=run_answer)
    return p


def load_model_and_processor(args: argparse.Namespace):
    """(model in eval mode, processor, device) from --model or --qwen/--vggt (+ --fusion), --device, --dtype,
    --attn and --num-frames. Raises FileNotFoundError / ValueError for missing or wrong checkpoints."""
    import torch

    from .modeling import GeoAlignForConditionalGeneration
    from .processing import GeoAlignProcessor

    if args.model is None and (args.qwen is None or args.vggt is None):
        raise ValueError("give --model DIR, or --qwen and --vggt (and optionally --fusion)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = DTYPES[args.dtype] if args.dtype else ("bfloat16" if device.startswith("cuda") else "float32")
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
    return model.eval(), processor, device


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--model | --qwen/--vggt/--fusion, --device, --dtype, --attn (what load_model_and_processor reads)."""
    src = p.add_argument_group("model (a saved GeoAlign directory, or the base checkpoints)")
    src.add_argument("--model", help="directory written by GeoAlignForConditionalGeneration.save_pretrained")
    src.add_argument("--qwen", help="local Qwen2.5-VL checkpoint directory (with its tokenizer)")
    src.add_argument("--vggt", help="local VGGT checkpoint (directory or model.safetensors / model.pt)")
    src.add_argument("--fusion", help="trained fusion directory (geoalign_config.json + fusion.safetensors)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--attn", default=None, help="attn_implementation, e.g. sdpa or flash_attention_2")


def run_answer(args: argparse.Namespace) -> int:
    try:
        model, processor, device = load_model_and_processor(args)
        inputs = processor(args.video or args.images, args.question)
    except (FileNotFoundError, ValueError) as e:
        print(f"geoalign answer: {e}", file=sys.stderr)
        return 2
    inputs = {k: _to(v, device) for k, v in inputs.items()}
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
    p = subparsers.add_parser("convert", help="rewrite a legacy geoalign model directory (geoalign_model.json) as a "
                              "transformers checkpoint")
    p.add_argument("old", help="legacy directory (geoalign_model.json, qwen/, vggt/, fusion files)")
    p.add_argument("new", help="new directory (must not exist, or be a model directory written by geoalign)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: the checkpoint's")
    p.set_defaults(func=run_convert)
    return p


def run_convert(args: argparse.Namespace) -> int:
    import torch

    from .serialization import convert_legacy_directory, is_legacy_directory

    if not is_legacy_directory(args.old):
        print(f"geoalign convert: {args.old!r} is not a legacy geoalign directory (no geoalign_model.json, or it "
              "already has a transformers config.json)", file=sys.stderr)
        return 2
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    try:
        convert_legacy_directory(args.old, args.new, dtype=dtype)
    except (FileNotFoundError, ValueError, FileExistsError) as e:
        print(f"geoalign convert: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.new}")
    return 0


def _to(v, device):
    import torch

    if isinstance(v, torch.Tensor):
        return v.to(device)
    if isinstance(v, list):
        return [_to(x, device) for x in v]
    return v


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="geoalign")
    add_answer_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
