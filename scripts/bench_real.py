#!/usr/bin/env python
"""Real-data benchmark, data side: prep CHAOS MR (15 cases) once and write per-seed split lists.

    python scripts/bench_real.py --out bench_chaos [--raw ../shared/data/chaos_mr] [--seeds 0 1 2]

Writes ``OUT/prep`` (nnU-Net v2 raw -> PREP_DIR at 2.5 x 2.5 x 7.7 mm, MR normalisation from
``channel_names``) and ``OUT/lists/seed<S>/{train,eval,test,labeled_20p,unlabeled_20p}.txt``:
3 test, 2 eval, 10 train of which 2 labeled (20 %), drawn by seed S with the project's split
rule (``make_splits``; for 15 cases its DHC sizes are exactly these). Apply one with
``medseg-dpl split --data OUT/prep --from-lists OUT/lists/seed<S>``, then train with
``configs/chaos_mr.yaml``. ``prepare_chaos`` is the same as a function.
"""
from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Iterable

CHAOS_RAW = Path(__file__).resolve().parents[2] / "shared" / "data" / "chaos_mr"
SPACING = (2.5, 2.5, 7.7)   # mm: in-plane 2x coarser than the source, slices as acquired
FRACTION = 0.2
SIZES = {"test": 3, "eval": 2, "train": 10, "labeled_20p": 2, "unlabeled_20p": 8}


def prep_dir(out_dir) -> Path:
    return Path(out_dir) / "prep"


def prepare_chaos(out_dir, seeds: Iterable[int], raw=CHAOS_RAW, workers: int = 1) -> dict[int, Path]:
    """Prep ``raw`` into ``OUT/prep`` (cases already done are skipped) and write each seed's
    lists into ``OUT/lists/seed<S>/``; returns ``{seed: lists dir}``."""
    from medseg_dpl.data.preprocess import preprocess_dataset
    from medseg_dpl.data.splits import make_splits
    from medseg_dpl.utils import atomic_path

    prep = prep_dir(out_dir)
    preprocess_dataset("nnunet", raw, prep, spacing=SPACING, workers=workers, progress=False,
                       stream=io.StringIO())
    out = {}
    for seed in seeds:
        lists = make_splits(prep, labeled=FRACTION, seed=int(seed), write=False)
        sizes = {k: len(v) for k, v in lists.items()}
        if sizes != SIZES:  # a different raw folder (not 15 labeled cases) would change them
            raise ValueError(f"{raw}: split sizes {sizes}, expected {SIZES} (15 labeled cases)")
        folder = Path(out_dir) / "lists" / f"seed{seed}"
        for name, ids in lists.items():
            with atomic_path(folder / f"{name}.txt") as tmp:
                tmp.write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
        out[int(seed)] = folder
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--raw", default=str(CHAOS_RAW))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    for seed, folder in prepare_chaos(args.out, args.seeds, args.raw, args.workers).items():
        print(f"seed {seed}: medseg-dpl split --data {prep_dir(args.out)} --from-lists {folder}")


if __name__ == "__main__":
    main()
