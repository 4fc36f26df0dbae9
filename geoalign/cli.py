"""The `geoalign` command: `geoalign bench`, and the sub-commands other parts of the package register."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="geoalign", description="GeoAlign: routed multi-layer geometry fusion")
    sub = parser.add_subparsers(dest="command", required=True)
    from geoalign_bench.cli import build_parser as build_bench

    build_bench(sub.add_parser("bench", help="kernel benchmark: time and memory of each backend vs reference"))
    from geoalign.eval.cli import add_eval_parser, add_score_parser

    add_eval_parser(sub)
    add_score_parser(sub)
    from geoalign.model_cli import add_answer_parser, add_convert_parser

    add_answer_parser(sub)
    add_convert_parser(sub)
    from geoalign.routes_cli import add_routes_parser

    add_routes_parser(sub)
    from geoalign.gap.cli import add_gap_data_parser

    add_gap_data_parser(sub)
    from geoalign.training.cli import add_train_parser

    add_train_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
