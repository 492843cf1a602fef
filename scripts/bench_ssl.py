#!/usr/bin/env python
"""Benchmark: methods side by side on held-out test cases, one split per seed.

For each labeled fraction it runs :func:`medseg_dpl.demo.run_demo` into ``OUT/<P>p/``: the
phantom (or ``--data PREP``, e.g. the CHAOS MR prep of ``scripts/bench_real.py``) -> per-seed
splits (each seed draws its own test, eval and labeled cases and its own initialisation) ->
train every method -> eval on the test split. It writes ``OUT/<P>p/results.csv`` (method, seed,
organ, dice on the test split after post-processing, dice_raw before) and prints, per fraction:

* test Dice per organ (mean ± std over seeds; post-processed headline, raw mean beside it);
* the mean Dice of the five smallest organs where the data set has them;
* per-seed paired differences of every method against FixMatch and supervised;
* the eval-split Dice (what every setting is chosen on) at 25/50/75/100 % of the steps;
* the pseudo-label organ shares (final teacher, whole unlabeled volumes) vs the truth, and
  the crop-level shares, precision and recall of the confident pseudo-labels.

    python scripts/bench_ssl.py --out bench_ssl_out   # 3 seeds, 5 % and 20 %, atlas supervised fixmatch
                                                      # debiaspl dhc cld ga
    python scripts/bench_ssl.py --out X --fractions 0.2 --seeds 0 --methods atlas supervised fixmatch
    python scripts/bench_ssl.py --out X --methods debiaspl -- debias.tau=0.5
    python scripts/bench_ssl.py --out /tmp/b --jobs 2 --record benchmarks/phantom   # keep the results
    python scripts/bench_ssl.py --out benchmarks/phantom --report-only              # tables from them
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from medseg_dpl.data.labels import short_name
from medseg_dpl.demo import ATLAS, METHODS, collect_results, known_rows, run_demo, run_tasks

# The default benchmark: the floor, the baselines, DebiasPL and the field's peers, one recipe.
BENCHMARK_METHODS = (ATLAS, *METHODS, "dhc", "cld", "ga")
# What a finished run keeps in the record (small text files; checkpoints stay in --out).
RECORD_FILES = ("eval/summary.json", "metrics.json", "pseudo_labels.json", "config.yaml")


def record_runs(root: Path, record: Path, runs: dict) -> None:
    """Copy each finished run's results (test and eval, per organ, its merged config) from
    ``root/runs/`` into ``record/runs/`` (same layout, so ``--report-only --out`` on the record's
    parent rebuilds every table), and the fraction's split lists into ``record/splits/``."""
    for run in runs.values():
        for name in RECORD_FILES:
            src = Path(run) / name
            if src.is_file():
                dst = record / "runs" / Path(run).name / name
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
    if (root / "splits").is_dir():
        shutil.copytree(root / "splits", record / "splits", dirs_exist_ok=True)


SMALL_ORGANS = ("gallbladder", "esophagus", "portal_splenic_veins", "right_adrenal_gland",
                "left_adrenal_gland")


def _per_seed_mean(rows, method, key="dice", organs=None) -> dict[int, float]:
    out = {}
    for r in rows:
        if r["method"] == method and (organs is None or r["organ"] in organs):
            out.setdefault(r["seed"], []).append(r[key])
    return {s: float(np.nanmean(v)) for s, v in out.items()}


def _pm(values) -> str:
    v = np.asarray([x for x in values if np.isfinite(x)], float) * 100
    if not v.size:
        return "–"
    return f"{v.mean():.1f}" if v.size == 1 else f"{v.mean():.1f} ± {v.std():.1f}"


def summary_table(rows, methods) -> str:
    """Mean, raw mean and five-smallest-organ mean per method; mean ± std over seeds."""
    organs = {r["organ"] for r in rows}
    small = [o for o in SMALL_ORGANS if o in organs]
    head = ["method", "mean Dice", "raw mean", *(["5 smallest organs"] if small else []),
            "HD95 mm", "raw HD95 mm", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        mean = _per_seed_mean(rows, m)
        cells = [m, _pm(mean.values()), _pm(_per_seed_mean(rows, m, "dice_raw").values())]
        if small:
            cells.append(_pm(_per_seed_mean(rows, m, organs=small).values()))
        for key in ("hd95", "hd95_raw"):  # mm, mean over organs; not a percentage
            v = [x for x in _per_seed_mean(rows, m, key).values() if np.isfinite(x)]
            cells.append(f"{np.mean(v):.1f} ± {np.std(v):.1f}" if v else "–")
        lines.append("| " + " | ".join(cells + [str(len(mean))]) + " |")
    return "\n".join(lines) + "\n"


def paired_table(rows, methods) -> str:
    """Per-seed differences (Dice points) of each method against fixmatch, supervised and
    debiaspl (the last for #18's "DebiasPL ≥ every peer"; a pair already listed the other way
    round is not repeated)."""
    refs = [r for r in ("fixmatch", "supervised", "debiaspl") if r in methods]
    if not refs:
        return ""
    seeds = sorted({r["seed"] for r in rows})
    head = ["method", "vs"] + [f"seed {s}" for s in seeds] + ["mean", "wins"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, ref in enumerate(refs):
        base = _per_seed_mean(rows, ref)
        for m in methods:
            if m == ref or m in refs[:i]:
                continue
            mine = _per_seed_mean(rows, m)
            d = [100 * (mine[s] - base[s]) if s in mine and s in base else float("nan") for s in seeds]
            ok = [x for x in d if np.isfinite(x)]
            lines.append("| " + " | ".join([m, ref] + [f"{x:+.1f}" if np.isfinite(x) else "–" for x in d]
                                           + [f"{np.mean(ok):+.1f}" if ok else "–",
                                              f"{sum(x > 0 for x in ok)}/{len(ok)}"]) + " |")
    return "\n".join(lines) + "\n"


def eval_curve_table(runs: dict, methods, seeds) -> str:
    """Eval-split mean Dice (raw, preprocessed grid) at each validation, mean ± std over seeds."""
    curves: dict[str, dict[int, list]] = {}
    steps = []
    for m in methods:
        for s in seeds:
            p = runs.get((m, s), Path("-")) / "metrics.json"
            if not p.exists():
                continue
            hist = json.loads(p.read_text(encoding="utf-8")).get("val_history", [])
            for h in hist:
                curves.setdefault(m, {}).setdefault(h["step"], []).append(h["dice_mean"])
                steps.append(h["step"])
    if not curves:
        return ""
    steps = sorted(set(steps))
    head = ["eval Dice at step"] + [str(s) for s in steps] + ["best"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, by_step in curves.items():
        best = [max(v) for v in zip(*[by_step[s] for s in steps if s in by_step])] if by_step else []
        lines.append("| " + " | ".join([m] + [_pm(by_step.get(s, [])) for s in steps] + [_pm(best)]) + " |")
    return "\n".join(lines) + "\n"


def distribution_table(runs: dict, methods, seeds) -> str:
    """Organ share (%) of the pseudo-labels per method vs truth, mean over seeds: the final
    teacher on whole unlabeled volumes, and the confident pseudo-labels of the last training
    crops (with their precision and recall) where the crops' truth is known."""
    rows, organs, truth, crop = {}, None, [], {}
    for m in methods:
        shares = []
        for s in seeds:
            p = runs.get((m, s), Path("-")) / "pseudo_labels.json"
            if m in ("supervised", ATLAS) or not p.exists():
                continue
            r = json.loads(p.read_text(encoding="utf-8"))
            organs = r["classes"][1:]
            shares.append(r["organ_share"]["pseudo_label"])
            if r["organ_share"]["true"]:
                truth.append(r["organ_share"]["true"])
            hist = [h for h in r.get("crop_history", []) if "precision" in h]
            if hist:  # the last quarter of training
                tail = hist[-max(1, len(hist) // 4):]
                crop.setdefault(m, []).append({k: np.nanmean([h[k] for h in tail], axis=0)
                                               for k in ("pl_share", "true_share", "precision", "recall")})
        if shares:
            rows[f"{m}, volumes"] = np.mean(shares, axis=0)
    if organs is None:
        return "(no pseudo_labels.json found)\n"
    if truth:
        rows = {"true (unlabeled cases)": np.mean(truth, axis=0), **rows}
    for m, stats in crop.items():
        rows[f"{m}, crops: share"] = np.mean([x["pl_share"] for x in stats], axis=0)
        rows[f"{m}, crops: true share"] = np.mean([x["true_share"] for x in stats], axis=0)
        rows[f"{m}, crops: precision"] = np.nanmean([x["precision"][1:] for x in stats], axis=0)
        rows[f"{m}, crops: recall"] = np.nanmean([x["recall"][1:] for x in stats], axis=0)
    head = ["organ share / PL quality (%)"] + [short_name(o) for o in organs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, share in rows.items():
        lines.append("| " + " | ".join([name] + [f"{100 * v:.1f}" if np.isfinite(v) else "–"
                                                 for v in np.asarray(share, float)]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    warnings.simplefilter("ignore", RuntimeWarning)  # nan-means over organs no run predicted
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_ssl_out")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.2])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(BENCHMARK_METHODS), metavar="M",
                    help=f"any of {', '.join(known_rows())}; end the list with -- before overrides")
    ap.add_argument("--data", default=None, help="an existing PREP_DIR instead of the phantom")
    ap.add_argument("--config", default=None, help="base config (default: configs/phantom.yaml)")
    ap.add_argument("--cases", type=int, default=None, help="phantom cases (default: the demo's)")
    ap.add_argument("--steps", type=int, default=None, help="training steps, eval every quarter "
                    "(default: the config's train.steps / train.val_every)")
    ap.add_argument("--quick", action="store_true", help="the demo's quick sizes (a smoke test)")
    ap.add_argument("--keep-done", action="store_true",
                    help="keep runs that already have eval/summary.json (continue an interrupted run)")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: rebuild the report from the finished runs in --out")
    ap.add_argument("--jobs", type=int, default=1,
                    help="trainings at a time, each in its own process with one thread (2 on 2 cores)")
    ap.add_argument("--order", default="longest", choices=["longest", "listed"],
                    help="within a seed: longest runs first (default) or in --methods order")
    ap.add_argument("--record", default=None, metavar="DIR",
                    help="copy each finished run's results (test/eval per organ, config) into "
                         "DIR/<P>p/runs/ and append the command to DIR/commands.txt (e.g. "
                         "benchmarks/phantom); rebuild tables with --report-only --out DIR")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    args = ap.parse_args()
    bad = [m for m in args.methods if m not in known_rows()]
    if bad:
        ap.error(f"unknown method(s) {bad}; known: {', '.join(known_rows())}")

    t0 = time.perf_counter()
    roots = {frac: Path(args.out) / f"{round(100 * frac)}p" for frac in args.fractions}
    if not args.report_only:
        # prepare every fraction (the phantom once), then train all their runs in one pool
        tasks, data, stage = [], args.data, print
        for frac, root in roots.items():
            plan = run_demo(root, quick=args.quick, labeled=frac, seeds=args.seeds, methods=args.methods,
                            cases=args.cases, steps=args.steps, progress=True, extra=args.overrides,
                            data=data, config=args.config, keep_done=args.keep_done, jobs=args.jobs,
                            plan_only=True)
            tasks += plan["tasks"]
            data, stage = plan["prep"], plan["stage"]
        run_tasks(tasks, args.jobs, stage, order=args.order)
    report = []
    for frac, root in roots.items():
        res = collect_results(root, args.methods, args.seeds, title=f"test cases, {frac:.0%} labeled")
        if args.record and not args.report_only:
            record_runs(root, Path(args.record) / root.name, res["runs"])
        rows = res["rows"]
        report.append(
            f"### {frac:.0%} labeled — test split, Dice (%), mean ± std over seeds {args.seeds} "
            f"(each seed its own split)\n\n{summary_table(rows, args.methods)}\n{res['table']}\n"
            f"Paired per-seed differences of mean Dice (points, test split):\n\n"
            f"{paired_table(rows, args.methods)}\n"
            f"Eval split (the one settings are chosen on), mean Dice (%) during training:\n\n"
            f"{eval_curve_table(res['runs'], args.methods, args.seeds)}\n"
            f"Pseudo-labels: organ shares (final teacher, whole unlabeled volumes; training crops, "
            f"last quarter) and crop-level precision/recall:\n\n"
            f"{distribution_table(res['runs'], args.methods, args.seeds)}")
    text = "\n".join(report) + f"\n_total {time.perf_counter() - t0:.0f} s; overrides: {args.overrides or 'none'}_\n"
    (Path(args.out) / "bench_ssl.md").write_text(text, encoding="utf-8")
    if args.record and not args.report_only:
        with open(Path(args.record) / "commands.txt", "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M')}  {' '.join(map(shlex.quote, sys.argv))}"
                    f"  ({time.perf_counter() - t0:.0f} s)\n")
    print("\n" + text)


if __name__ == "__main__":
    main()
