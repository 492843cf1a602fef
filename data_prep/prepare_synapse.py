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

import sys

from medseg_dpl.data.protocol import run_protocol

FRACTIONS = (0.1, 0.2, 0.4)


def main(argv=None) -> int:
    return run_protocol("synapse", FRACTIONS, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
