"""The geoalign command. Each sub-command lives beside the code it drives and registers its own parser; parsing
imports nothing heavy (tests/test_cli.py checks that torch, transformers, triton and matplotlib stay unimported), so
--help and argument errors come back at once."""
from __future__ import annotations

import argparse
import sys

DESCRIPTION = """GeoAlign: multi-layer VGGT geometry routed into Qwen2.5-VL's visual tokens, with exact sparse fast
paths. Only local files are read; nothing is downloaded.

new here? `geoalign demo --out demo` writes a tiny model, a video, a scene and a benchmark folder to try every
command on (README, "Try it")."""


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .cli_args import ArgumentParser
    from .demo import add_demo_parser
    from .eval.cli import add_eval_parser, add_score_parser
    from .gap.cli import add_gap_data_parser
    from .model_cli import add_answer_parser, add_convert_parser
    from .routes_cli import add_routes_parser
    from .training.cli import add_train_parser

    parser = ArgumentParser(prog="geoalign", description=DESCRIPTION,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"geoalign {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_demo_parser(sub)
    add_answer_parser(sub)
    add_routes_parser(sub)
    add_eval_parser(sub)
    add_score_parser(sub)
    add_train_parser(sub)
    add_gap_data_parser(sub)
    add_convert_parser(sub)
    from geoalign_bench import cli as bench_cli

    bench_cli.build_parser(sub.add_parser("bench", help="kernel benchmark: time and memory of each fusion backend "
                                                        "against the reference, on this machine",
                                          description=bench_cli.__doc__,
                                          formatter_class=argparse.RawDescriptionHelpFormatter))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code (2 for a usage error, printed as one line on stderr)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:          # --help, --version, or an argument error (argparse already printed it)
        return e.code if isinstance(e.code, int) else 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
