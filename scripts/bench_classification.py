#!/usr/bin/env python
"""Supervised vs FixMatch (EMAN) vs DebiasPL on scikit-learn digits, N labels per class, k seeds.

Runs ``configs/digits_{supervised,fixmatch,debiaspl}.yaml`` unchanged except for the seed, the
labels per class and any ``key=value`` overrides given here (applied to every method), and
prints a Markdown table: mean ± std (over seeds, n-1) of top-1 on the held-out part (the same
539 images for every seed), and how imbalanced the confident pseudo-labels were (max/min class
share) -- the paper's central observation -- both over training (what the student learned from)
and for the final teacher over the whole unlabeled set.

    python scripts/bench_classification.py                      # 2 labels/class, seeds 0 1 2
    python scripts/bench_classification.py --json bench.json train.ema_momentum=0.9
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from medseg_dpl.classification.defaults import load_classify_config
from medseg_dpl.classification.trainer import train_classifier

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
METHODS = ("supervised", "fixmatch", "debiaspl")


def _ms(values, scale: float = 100.0, digits: int = 1) -> str:
    v = np.asarray(values, dtype=np.float64) * scale
    if not np.isfinite(v).all():
        return "inf" if np.isinf(v).any() else "n/a"
    std = v.std(ddof=1) if len(v) > 1 else 0.0
    return f"{v.mean():.{digits}f} ± {std:.{digits}f}"


def run(seeds, labels_per_class: int, overrides, threads: int, methods=METHODS) -> dict:
    results: dict[str, list] = {m: [] for m in methods}
    for m in methods:
        for s in seeds:
            cfg = load_classify_config(CONFIGS / f"digits_{m}.yaml",
                                       [f"train.seed={s}", f"data.labels_per_class={labels_per_class}",
                                        f"train.num_threads={threads}", *overrides])
            t = time.time()
            r = train_classifier(cfg, None, progress=False)
            r["wall_s"] = time.time() - t
            results[m].append(r)
            pl = r.get("pl_train")
            extra = (f"  PL mask {pl['mask_ratio']:.2f} acc {pl['accuracy']:.3f} "
                     f"max/min {pl['imbalance']:.2f}") if pl else ""
            print(f"[{m} seed {s}] top-1 {r['top1']:.4f} (student {r['top1_student']:.4f})"
                  f"{extra}  {r['wall_s']:.0f} s", file=sys.stderr, flush=True)
    return results


def table(results: dict) -> str:
    rows = ["| method | top-1 % (EMA model) | top-1 % (student) | PL mask ratio % | PL accuracy % "
            "| PL max/min class share, training | PL max/min, final teacher | s/run |",
            "|---|---|---|---|---|---|---|---|"]
    for m, rs in results.items():
        pl = [r.get("pl_train") for r in rs]
        fin = [r.get("pl_final") for r in rs]
        has = all(p is not None for p in pl)
        rows.append("| " + " | ".join([
            m, _ms([r["top1"] for r in rs]), _ms([r["top1_student"] for r in rs]),
            _ms([p["mask_ratio"] for p in pl]) if has else "–",
            _ms([p["accuracy"] for p in pl]) if has else "–",
            _ms([p["imbalance"] for p in pl], 1.0, 2) if has else "–",
            _ms([p["imbalance"] for p in fin], 1.0, 2) if has else "–",
            f"{np.mean([r['wall_s'] for r in rs]):.0f}"]) + " |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--labels-per-class", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads per run (1 is fastest for this tiny CNN)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--json", type=Path, default=None, help="also write all results here")
    ap.add_argument("overrides", nargs="*", metavar="key=value",
                    help="config overrides applied to every method")
    args = ap.parse_args(argv)
    t = time.time()
    results = run(args.seeds, args.labels_per_class, args.overrides, args.threads, args.methods)
    print(f"digits, {args.labels_per_class} labels/class ({10 * args.labels_per_class} labeled, "
          f"{results[args.methods[0]][0]['num_unlabeled']} unlabeled, "
          f"{results[args.methods[0]][0]['num_test']} held-out), seeds {args.seeds}"
          + (f", overrides {' '.join(args.overrides)}" if args.overrides else "") + ":\n")
    print(table(results))
    print(f"\n(total {time.time() - t:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
