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

import sys

from medseg_dpl.data.protocol import run_protocol

FRACTIONS = (0.02, 0.05, 0.1)


def main(argv=None) -> int:
    return run_protocol("amos", FRACTIONS, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
