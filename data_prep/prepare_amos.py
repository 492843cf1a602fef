#!/usr/bin/env python
"""AMOS22 (CT + MRI, 360 labeled scans) -> PREP_DIR with the published semi-supervised splits.

    python data_prep/prepare_amos.py --raw /data/amos22 --out /data/prep/amos \\
        [--dhc-lists DHC/amos_data/splits] [--ct-only] [--spacing X Y Z] [--workers N] [--seed 0]

``--raw`` holds AMOS22's ``dataset.json``, ``imagesTr``/``labelsTr`` (240) and
``imagesVa``/``labelsVa`` (120, the test set). Checks the data (every problem listed, nothing
written if any), preprocesses (RAS, default spacing = coarser of 1.5 x 1.5 x 2 mm and the
median, HU [-175, 250] -> [0, 1], body crop) and writes DHC's splits: 216 train / 24 eval /
120 test with 2 %, 5 %, 10 % labeled (4 / 10 / 21 cases); ``--dhc-lists`` uses DHC's published
lists instead of drawing them (DHC's protocol includes the 60 MRI scans; ``--ct-only`` drops
them, which no longer matches those lists).
"""
from __future__ import annotations

import argparse
import sys

from medseg_dpl.data.io import DataError
from medseg_dpl.data.preprocess import DEFAULT_CLIP, preprocess_dataset
from medseg_dpl.data.splits import format_split_table, make_splits

FRACTIONS = (0.02, 0.05, 0.1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--raw", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dhc-lists", default=None, help="folder with DHC's AMOS split lists")
    ap.add_argument("--ct-only", action="store_true", help="drop the MRI scans (ids >= 500)")
    ap.add_argument("--spacing", type=float, nargs=3, default=None)
    ap.add_argument("--clip", type=float, nargs=2, default=DEFAULT_CLIP)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        preprocess_dataset("amos", args.raw, args.out, spacing=args.spacing, clip=args.clip,
                           workers=args.workers, ct_only=args.ct_only)
        splits = make_splits(args.out, labeled=FRACTIONS, seed=args.seed, from_lists=args.dhc_lists)
    except (DataError, ValueError, OSError) as exc:  # CheckError is a DataError
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_split_table(splits))
    return 0


if __name__ == "__main__":
    sys.exit(main())
