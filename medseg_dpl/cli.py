"""``medseg-dpl <verb>``: one command line, each verb a thin layer over an importable function.

Each module below exposes ``register(subparsers)``, adding its verbs with
``parser.set_defaults(func=callable_taking_args_returning_exit_code)``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

VERB_MODULES = [
    "medseg_dpl.data.cli",            # phantom, check, prep, split
    "medseg_dpl.engine.cli",          # train
    "medseg_dpl.evaluation.cli",      # predict, eval, postprocess, compare
    "medseg_dpl.demo",                # demo
    "medseg_dpl.classification.cli",  # classify
    "medseg_dpl.deploy.cli",          # export
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medseg-dpl",
        description="Debiased pseudo-labeling for semi-supervised CT organ segmentation.")
    from medseg_dpl import __version__
    parser.add_argument("--version", action="version", version=f"medseg-dpl {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="<verb>")
    for name in VERB_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
