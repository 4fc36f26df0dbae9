"""geoalign train --config FILE.yaml: supervised fine-tuning of GeoAlign (the config keys: README, "Training").

Single process:   geoalign train --config configs/train_paper.yaml
Multi-GPU:        torchrun --nproc_per_node=8 -m geoalign.training.cli --config configs/train_paper.yaml
Overrides:        geoalign train --config c.yaml --set learning_rate=2e-5 --set train_mode=lora
Resume:           geoalign train --config c.yaml --resume latest   (the newest checkpoint in output_dir; with none
                  yet, training starts at step 0 and says so)
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from ..atomic_files import DiskFullError
from ..cli_args import ArgumentParser, fail, local_path, non_negative_int, output_dir, require_module


def _parse_override(item: str):
    import yaml

    if "=" not in item:
        raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
    key, value = item.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ValueError(f"--set {item!r}: the value is not plain YAML data: {str(e).splitlines()[0]}") from None


def _configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", required=True, type=local_path,
                        help="YAML file of training keys (unset keys take the paper's values); see configs/")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key (value parsed as YAML); repeatable")
    parser.add_argument("--output-dir", default=None, type=output_dir, help="override output_dir")
    parser.add_argument("--resume", default=None, metavar="latest|DIR",
                        help="resume from a checkpoint directory, or 'latest': the newest in output_dir (none yet: "
                             "start at step 0, with a warning)")
    parser.add_argument("--max-steps", type=non_negative_int, default=None,
                        help="override max_steps (0: as many as num_train_epochs gives)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.set_defaults(func=run_train)
    return parser


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``train`` on an argparse sub-parsers object (``geoalign/cli.py``)."""
    p = subparsers.add_parser("train", help="train GeoAlign (the fusion and the LLM) from a YAML config",
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
        cfg.check_paths()            # the paths exist: fail before anything loads
        for module, extra, why in cfg.optional_modules():
            require_module(module, extra, why)
        from .trainer import GeoAlignTrainer

        result = GeoAlignTrainer(cfg).train()
    except (ValueError, FileNotFoundError, ImportError, DiskFullError) as e:
        return fail("train", e)
    if rank == 0:
        last = result.losses[max(result.losses)] if result.losses else float("nan")
        print(f"geoalign train: done: {result.global_step} steps, last loss {last:.4f}, "
              f"checkpoint {result.last_checkpoint}, final model {result.final_model_dir}, "
              f"{len(result.skipped_records)} bad records skipped, {result.train_time_s:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m geoalign.training.cli --config FILE`` (for torchrun before ``geoalign train`` is wired)."""
    parser = _configure(ArgumentParser(prog="geoalign train", description=__doc__,
                                       formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
