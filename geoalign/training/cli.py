"""``geoalign train --config FILE.yaml``: supervised fine-tuning of GeoAlign (see :class:`TrainConfig` for the keys).

Single process:   geoalign train --config configs/train_paper.yaml
Multi-GPU:        torchrun --nproc_per_node=8 -m geoalign.training.cli --config configs/train_paper.yaml
Overrides:        geoalign train --config c.yaml --set learning_rate=2e-5 --set train_mode=lora
"""
from __future__ import annotations

import argparse
import logging
import os
import sys


def _parse_override(item: str):
    import yaml

    if "=" not in item:
        raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
    key, value = item.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def _configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", required=True, help="YAML file of TrainConfig keys (defaults = the paper's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key (value parsed as YAML); repeatable")
    parser.add_argument("--output-dir", default=None, help="override output_dir")
    parser.add_argument("--resume", default=None, metavar="latest|DIR", help="override resume_from_checkpoint")
    parser.add_argument("--max-steps", type=int, default=None, help="override max_steps")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.set_defaults(func=run_train)
    return parser


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``train`` on an argparse sub-parsers object (``geoalign/cli.py``)."""
    p = subparsers.add_parser("train", help="train GeoAlign (fusion + LLM) from a YAML config",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return _configure(p)


def run_train(args: argparse.Namespace) -> int:
    from .config import TrainConfig

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        overrides = dict(_parse_override(s) for s in args.set)
        if args.output_dir is not None:
            overrides["output_dir"] = args.output_dir
        if args.resume is not None:
            overrides["resume_from_checkpoint"] = args.resume
        if args.max_steps is not None:
            overrides["max_steps"] = args.max_steps
        cfg = TrainConfig.from_yaml(args.config, overrides)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(cfg.to_dict(), sort_keys=True))
            return 0
        from .trainer import GeoAlignTrainer

        result = GeoAlignTrainer(cfg).train()
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"geoalign train: error: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        last = result.losses[max(result.losses)] if result.losses else float("nan")
        print(f"geoalign train: done: {result.global_step} steps, last loss {last:.4f}, "
              f"checkpoint {result.last_checkpoint}, final model {result.final_model_dir}, "
              f"{len(result.skipped_records)} bad records skipped, {result.train_time_s:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m geoalign.training.cli --config FILE`` (for torchrun before ``geoalign train`` is wired)."""
    parser = _configure(argparse.ArgumentParser(prog="geoalign train", description=__doc__,
                                                formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
