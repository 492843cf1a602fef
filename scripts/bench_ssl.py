#!/usr/bin/env python
"""Benchmark: supervised vs FixMatch vs DebiasPL on the phantom, held-out test cases.

For each labeled fraction (default 5 % and 20 %) it runs the demo pipeline (`run_demo`: phantom
-> prep -> split -> train each method per seed -> eval on the test split) into
``OUT/<P>p/`` and prints, per fraction, the per-organ Dice table (methods as rows, mean ± std
over seeds) and the pseudo-label class distribution of the final teachers on the unlabeled
cases (organ shares, mean over seeds) next to the true one.

    python scripts/bench_ssl.py --out bench_ssl_out                    # 3 seeds, 5 % and 20 %
    python scripts/bench_ssl.py --out X --fractions 0.2 --seeds 0 debias.reference=uniform
    python scripts/bench_ssl.py --out X --methods debiaspl -- debias.response=hard
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from medseg_dpl.data.labels import short_name
from medseg_dpl.demo import METHODS, run_demo


def distribution_table(run_root: Path, methods, seeds) -> str:
    """Organ share (%) of the final pseudo-labels per method vs truth, mean over seeds."""
    rows, organs, truth = {}, None, []
    for m in methods:
        shares = []
        for s in seeds:
            p = run_root / "runs" / f"{m}_seed{s}" / "pseudo_labels.json"
            if not p.exists():
                continue
            r = json.loads(p.read_text(encoding="utf-8"))
            organs = r["classes"][1:]
            shares.append(r["organ_share"]["pseudo_label"])
            if r["organ_share"]["true"]:
                truth.append(r["organ_share"]["true"])
        if shares:
            rows[f"{m} pseudo-labels"] = np.mean(shares, axis=0)
    if organs is None:
        return "(no pseudo_labels.json found)\n"
    if truth:
        rows = {"true (unlabeled cases)": np.mean(truth, axis=0), **rows}
    head = ["organ share %"] + [short_name(o) for o in organs] + ["max/min"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, share in rows.items():
        share = np.asarray(share)
        ratio = share.max() / share.min() if share.min() > 0 else float("inf")
        lines.append("| " + " | ".join([name] + [f"{100 * v:.1f}" for v in share] + [f"{ratio:.0f}"]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_ssl_out")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.2])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS),
                    choices=["supervised", "fixmatch", "debiaspl", "cps_depl"],
                    help="end the list with -- before overrides")
    ap.add_argument("--cases", type=int, default=None, help="phantom cases (default: the demo's)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's)")
    ap.add_argument("--quick", action="store_true", help="the demo's quick sizes (a smoke test)")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    args = ap.parse_args()

    t0 = time.perf_counter()
    report = []
    for frac in args.fractions:
        root = Path(args.out) / f"{round(100 * frac)}p"
        res = run_demo(root, quick=args.quick, labeled=frac, seeds=args.seeds, methods=args.methods,
                       cases=args.cases, steps=args.steps, progress=False, extra=args.overrides)
        report.append(f"### {frac:.0%} labeled — Dice (%) on the held-out test cases, "
                      f"mean ± std over seeds {args.seeds}\n\n{res['table']}\n"
                      f"Pseudo-label class distribution (final teacher, unlabeled training cases):\n\n"
                      f"{distribution_table(root, [m for m in args.methods if m != 'supervised'], args.seeds)}")
    text = "\n".join(report) + f"\n_total {time.perf_counter() - t0:.0f} s; overrides: {args.overrides or 'none'}_\n"
    (Path(args.out) / "bench_ssl.md").write_text(text, encoding="utf-8")
    print("\n" + text)


if __name__ == "__main__":
    main()
