"""The published semi-supervised protocols in one call: check + prep + split (``data_prep/``)."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from medseg_dpl.data.io import DataError
from medseg_dpl.data.preprocess import DEFAULT_CLIP, preprocess_dataset
from medseg_dpl.data.splits import format_split_table, make_splits


def run_protocol(dataset: str, fractions: Sequence[float], argv=None, description: str = "") -> int:
    """Parse ``argv``, preprocess ``--raw`` into ``--out`` and write the splits at ``fractions``.

    Returns the exit code; bad input prints ``error: ...`` (naming file and cause) and returns 1.
    """
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--raw", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dhc-lists", default=None, help="folder with DHC's split lists")
    if dataset == "amos":
        ap.add_argument("--ct-only", action="store_true", help="drop the MRI scans (ids >= 500)")
    ap.add_argument("--spacing", type=float, nargs=3, default=None)
    ap.add_argument("--clip", type=float, nargs=2, default=DEFAULT_CLIP)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        preprocess_dataset(dataset, args.raw, args.out, spacing=args.spacing, clip=args.clip,
                           workers=args.workers, ct_only=getattr(args, "ct_only", False))
        splits = make_splits(args.out, labeled=list(fractions), seed=args.seed,
                             from_lists=args.dhc_lists)
    except (DataError, ValueError, OSError) as exc:  # CheckError is a DataError
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_split_table(splits))
    return 0
