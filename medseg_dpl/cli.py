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
    from medseg_dpl.errors import EXIT_CODES_HELP

    parser = argparse.ArgumentParser(
        prog="medseg-dpl", epilog=EXIT_CODES_HELP,
        description="Debiased pseudo-labeling for semi-supervised CT organ segmentation.")
    from medseg_dpl import __version__
    parser.add_argument("--version", action="version", version=f"medseg-dpl {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="<verb>")
    for name in VERB_MODULES:
        importlib.import_module(name).register(sub)
    for verb in sub.choices.values():   # the one convention, in every verb's --help
        verb.epilog = f"{verb.epilog}\n\n{EXIT_CODES_HELP}" if verb.epilog else EXIT_CODES_HELP
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a verb; a :class:`~medseg_dpl.errors.MedsegError` a verb did not handle itself is
    printed as ``error: <message>`` with its exit code (see ``EXIT_CODES_HELP``)."""
    from medseg_dpl.errors import EXIT_USAGE, MedsegError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except MedsegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
