#!/usr/bin/env python
"""The small-organ ablation (#18) from the committed benchmark records, eval and test side by side.

For each row (a registered method or a ``medseg_dpl.demo.ALIASES`` row) and labeled fraction:
mean organ Dice on the eval split (the last validation: what settings are chosen on) and on the
test split (post-processed), the five smallest organs' test Dice, and the per-seed paired
difference of test Dice against the row's base method (``fixmatch_soft`` vs ``fixmatch``, ...),
so an addition's effect on DebiasPL can be read next to the same addition on FixMatch.
The last column is #18's pseudo-label check: how many organs get a confident pseudo-label share
below half their true share in the training crops (the last quarter of training), and the worst
organ's ratio.

    python scripts/ablation_table.py                      # -> benchmarks/phantom/ablation.md
    python scripts/readme_tables.py                       # copies it into the README
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_ssl import SMALL_ORGANS  # noqa: E402

ROWS = ("supervised", "supervised_la",
        "fixmatch", "fixmatch_la", "fixmatch_balanced", "fixmatch_classthr", "fixmatch_soft",
        "fixmatch_la_soft", "fixmatch_rare",
        "debiaspl", "debiaspl_la", "debiaspl_balanced", "debiaspl_classthr", "debiaspl_soft",
        "debiaspl_la_soft", "debiaspl_rare",
        "dhc", "cld", "ga")


def base_of(row: str) -> str:
    from medseg_dpl.demo import ALIASES
    return ALIASES.get(row, (row, []))[0]


def run_numbers(run: Path) -> dict | None:
    """``{"eval", "test", "small"}`` mean Dice (%) of one finished run, or None."""
    summary, metrics = run / "eval" / "summary.json", run / "metrics.json"
    if not (summary.is_file() and metrics.is_file()):
        return None
    s = json.loads(summary.read_text(encoding="utf-8"))
    per = {o: s["per_organ"][o]["dice"]["mean"] for o in s["organs"]}
    per = {o: np.nan if v is None else float(v) for o, v in per.items()}
    small = [per[o] for o in SMALL_ORGANS if o in per]
    hist = json.loads(metrics.read_text(encoding="utf-8"))["val_history"]
    return {"eval": 100 * hist[-1]["dice_mean"], "test": 100 * np.nanmean(list(per.values())),
            "small": 100 * np.nanmean(small), "share": share_ratio(run / "pseudo_labels.json")}


def share_ratio(path: Path) -> np.ndarray | None:
    """Per-organ ``(C-1,)`` ratio of confident pseudo-label share to true share in the training
    crops, pooled over the last quarter of ``crop_history``; None without crop statistics."""
    if not path.is_file():
        return None
    hist = json.loads(path.read_text(encoding="utf-8")).get("crop_history") or []
    hist = [h for h in hist if "true_share" in h]
    if not hist:
        return None
    tail = hist[len(hist) - max(1, len(hist) // 4):]
    pl = np.mean([h["pl_share"] for h in tail], axis=0)
    true = np.mean([h["true_share"] for h in tail], axis=0)
    with np.errstate(all="ignore"):
        return np.where(true > 0, pl / true, np.nan)


def share_cell(ratios: list[np.ndarray]) -> str:
    """``"n below 0.5× (min ratio)"`` averaged over seeds, e.g. ``"4.0 (0.02)"``."""
    if not ratios:
        return "–"
    below = np.mean([np.sum(r < 0.5) for r in ratios])
    return f"{below:.1f} ({np.nanmin(np.stack(ratios)):.2f})"


def fmt(values: list[float]) -> str:
    if not values:
        return "–"
    v = np.asarray(values)
    return f"{v.mean():.1f}" if v.size == 1 else f"{v.mean():.1f} ± {v.std():.1f}"


def table(record: Path, fraction: str, rows, seeds) -> str:
    nums = {(r, s): run_numbers(record / fraction / "runs" / f"{r}_seed{s}") for r in rows for s in seeds}
    lines = [f"#### {fraction.rstrip('p')} % labeled: eval (last validation) and test (post-processed) mean "
             f"Dice (%), mean ± std over the seeds run",
             "", "| row | seeds | eval | test | 5 smallest (test) | test − base, per seed | "
             "organs PL < 0.5× truth (min ratio) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        done = [s for s in seeds if nums[(r, s)]]
        if not done:
            continue
        col = lambda k: fmt([nums[(r, s)][k] for s in done])  # noqa: E731
        base = base_of(r)
        diffs = [f"{nums[(r, s)]['test'] - nums[(base, s)]['test']:+.1f}" for s in done
                 if base != r and nums.get((base, s))]
        ratios = [nums[(r, s)]["share"] for s in done if nums[(r, s)]["share"] is not None]
        lines.append(f"| {r} | {len(done)} | {col('eval')} | {col('test')} | {col('small')} | "
                     f"{' / '.join(diffs) if diffs else '–'} | {share_cell(ratios)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--record", default=str(ROOT / "benchmarks" / "phantom"))
    ap.add_argument("--rows", nargs="+", default=list(ROWS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    record = Path(args.record)
    fractions = sorted((p.name for p in record.glob("*p") if (p / "runs").is_dir()), key=lambda f: int(f[:-1]))
    text = "\n".join(table(record, f, args.rows, args.seeds) for f in fractions)
    (record / "ablation.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
