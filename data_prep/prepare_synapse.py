#!/usr/bin/env python
"""Synapse/BTCV (30 labeled abdominal CTs) -> PREP_DIR with the published semi-supervised splits.

    python data_prep/prepare_synapse.py --raw /data/Abdomen --out /data/prep/synapse \\
        [--dhc-lists DHC/synapse_data/splits] [--spacing X Y Z] [--workers N] [--seed 0]

``--raw`` holds ``RawData/Training/{img,label}`` (the Synapse download) or ``imagesTr`` +
``labelsTr``. Checks the data (every problem listed, nothing written if any), preprocesses
(RAS, default spacing = coarser of 1.5 x 1.5 x 2 mm and the median, HU [-175, 250] -> [0, 1],
body crop) and writes DHC's splits: 20 train / 4 eval / 6 test with 10 %, 20 %, 40 % labeled
(2 / 4 / 8 cases). With ``--dhc-lists`` (DHC publishes only ``test.txt`` for Synapse) that test
set is used and the rest drawn with ``--seed``. Same as ``medseg-dpl prep`` + ``medseg-dpl split``.
"""
from __future__ import annotations

import argparse
import sys

from medseg_dpl.data.io import DataError
from medseg_dpl.data.preprocess import DEFAULT_CLIP, preprocess_dataset
from medseg_dpl.data.splits import format_split_table, make_splits

FRACTIONS = (0.1, 0.2, 0.4)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--raw", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dhc-lists", default=None, help="folder with DHC's split lists (test.txt)")
    ap.add_argument("--spacing", type=float, nargs=3, default=None)
    ap.add_argument("--clip", type=float, nargs=2, default=DEFAULT_CLIP)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        preprocess_dataset("synapse", args.raw, args.out, spacing=args.spacing, clip=args.clip,
                           workers=args.workers)
        splits = make_splits(args.out, labeled=FRACTIONS, seed=args.seed, from_lists=args.dhc_lists)
    except (DataError, ValueError, OSError) as exc:  # CheckError is a DataError
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_split_table(splits))
    return 0


if __name__ == "__main__":
    sys.exit(main())
