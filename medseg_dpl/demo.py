"""``medseg-dpl demo``: the whole pipeline on the synthetic abdomen phantom, in one command.

phantom (raw Synapse/AMOS layout) -> check + prep -> split -> train supervised / FixMatch /
DebiasPL (per seed) -> eval on the held-out test cases -> per-organ Dice table, grouped bar
chart and the pseudo-label class-distribution figure (the paper's central observation, for
organs). ``--quick`` is the small version the test suite runs.

Each seed draws its own split (test, eval and labeled cases) and initialisation; networks are
evaluated after the run's connected-component post-processing (chosen on the eval split).

Outputs in ``--out``: ``results.csv`` (method, seed, organ, dice, and dice_raw before
post-processing, hd95 and hd95_raw in mm), ``results.md`` (the printed
table), ``dice_per_organ.png``, ``pseudo_label_distribution.png``, and below ``runs/`` each
run's folder (checkpoints, TensorBoard ``tb/``, ``eval/`` with per-case CSVs and overlays).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from medseg_dpl.errors import EXIT_ERROR

METHODS = ("supervised", "fixmatch", "debiaspl")
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
# Benchmark rows that are a registered method with fixed overrides (the paper-exact DebiasPL is
# kept as a row next to the default variant), and "atlas", the no-learning floor.
ALIASES = {
    "debiaspl_paper": ("debiaspl", ["debias.variant=paper", "debias.reference=uniform"]),
    "debiaspl_classthr": ("debiaspl", ["method.class_thresholds=true"]),
    "fixmatch_classthr": ("fixmatch", ["method.class_thresholds=true"]),
    # the peers' class weights without their co-training (a gain of dhc/cld over these is theirs)
    "supervised_cldw": ("supervised", ["loss.class_weight=cld"]),
    "supervised_distdw": ("supervised", ["loss.class_weight=distdw"]),
    "supervised_ga": ("supervised", ["loss.name=ga"]),    # GA's loss without its co-training
    # each small-organ addition alone (τ_l = 0.5: τ_l = 1 over-predicted the rare organs on
    # eval), on the method and its control
    "supervised_la": ("supervised", ["loss.logit_adjust=0.5"]),
    "fixmatch_la": ("fixmatch", ["loss.logit_adjust=0.5"]),
    "debiaspl_la": ("debiaspl", ["loss.logit_adjust=0.5"]),
    "fixmatch_balanced": ("fixmatch", ["method.unsup_loss=balanced_ce"]),
    "debiaspl_balanced": ("debiaspl", ["method.unsup_loss=balanced_ce"]),
    # soft (debiased) teacher targets on the voxels below the threshold, a quarter of a hard voxel
    "fixmatch_soft": ("fixmatch", ["method.soft_weight=0.25"]),
    "debiaspl_soft": ("debiaspl", ["method.soft_weight=0.25"]),
    # the additions that helped alone on eval, together (logit adjustment + soft targets)
    "fixmatch_la_soft": ("fixmatch", ["loss.logit_adjust=0.5", "method.soft_weight=0.25"]),
    "debiaspl_la_soft": ("debiaspl", ["loss.logit_adjust=0.5", "method.soft_weight=0.25"]),
    # the small-organ additions together (labeled logit adjustment τ_l = 1, class-balanced
    # unsupervised CE, per-class thresholds with background fixed), on DebiasPL and on FixMatch
    # (a gain counts for debiasing only if FixMatch with the same additions does not have it)
    "debiaspl_rare": ("debiaspl", ["loss.logit_adjust=1.0", "method.unsup_loss=balanced_ce",
                                   "method.class_thresholds=true"]),
    "fixmatch_rare": ("fixmatch", ["loss.logit_adjust=1.0", "method.unsup_loss=balanced_ce",
                                   "method.class_thresholds=true"]),
}
ATLAS = "atlas"

# Sizes: the default is the benchmark's (steps and patch from the config), --quick the small
# version the tests run. steps None: the config's train.steps / train.val_every.
# The demo verb trains DEMO_STEPS (half the phantom config's converged 1600) unless --steps or
# --quick says otherwise: the config's 1600 would double the demo's time (its target: 10 min).
DEMO_STEPS = 800
SETTINGS = {
    "default": {"cases": 30, "shape": (80, 80, 64), "steps": None, "val_every": None},
    "quick": {"cases": 10, "shape": (40, 40, 32), "steps": 40, "val_every": 20,
              "extra": ["data.patch_size=[24,24,24]"]},
}


def known_rows() -> list[str]:
    """Every name ``methods=`` accepts: registered methods, aliases, ``atlas``."""
    from medseg_dpl.methods import METHODS as REGISTRY
    return [*REGISTRY, *ALIASES, ATLAS]


def _config(row: str, prep: Path, splits: Path, tag: str, seed: int, steps: int | None,
            val_every: int | None, device: str, progress: bool, extra: Sequence[str],
            config: Path | None = None) -> dict:
    from medseg_dpl.config import load_config
    from medseg_dpl.engine.defaults import SEG_DEFAULTS

    method, fixed = ALIASES.get(row, (row, []))
    overrides = [f"method.name={method}", *fixed, f"data.root={prep}",
                 f"data.labeled_split={splits / f'labeled_{tag}.txt'}",
                 f"data.unlabeled_split={splits / f'unlabeled_{tag}.txt'}",
                 f"data.eval_split={splits / 'eval.txt'}", f"train.seed={seed}",
                 *([f"train.steps={steps}", f"train.val_every={val_every}",
                    f"train.checkpoint_every={val_every}"] if steps else []), f"train.device={device}",
                 f"train.progress={str(progress).lower()}", *extra]
    return load_config(config or CONFIG_DIR / "phantom.yaml", overrides, SEG_DEFAULTS)


def pseudo_label_figure(reports: dict[str, list[dict]], path: Path) -> Path:
    """Organ share of the pseudo-labels per method (mean over seeds) vs the true share.

    ``reports``: method -> list of ``pseudo_labels.json`` dicts (one per seed).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medseg_dpl.data.labels import short_name
    from medseg_dpl.utils import save_figure

    any_report = next(r for rs in reports.values() for r in rs)
    organs = any_report["classes"][1:]
    bars: dict[str, np.ndarray] = {}
    truth = [r["organ_share"]["true"] for rs in reports.values() for r in rs if r["organ_share"]["true"]]
    if truth:
        bars["true (unlabeled cases)"] = np.mean(truth, axis=0)
    bars["labeled data"] = np.mean([r["organ_share"]["labeled"] for rs in reports.values() for r in rs],
                                   axis=0)
    for method, rs in reports.items():
        bars[f"{method} pseudo-labels"] = np.mean([r["organ_share"]["pseudo_label"] for r in rs], axis=0)
    x = np.arange(len(organs))
    width = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(organs) + 2), 3.8))
    for k, (name, share) in enumerate(bars.items()):
        ax.bar(x + (k - (len(bars) - 1) / 2) * width, share * 100, width, label=name)
    ax.set_yscale("log")
    ax.set_xticks(x, [short_name(o) for o in organs])
    ax.set_ylabel("share of organ voxels (%)")
    ax.set_title("Pseudo-label class distribution on the unlabeled cases (organs only)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def results_markdown(rows: list[dict], organs: Sequence[str], methods: Sequence[str]) -> str:
    """Methods as rows, organs as columns: Dice (%) mean ± std over seeds; first columns the
    mean over organs (per seed, then over seeds) after post-processing and raw."""
    from medseg_dpl.data.labels import short_name

    def pm(values):
        v = np.asarray([x for x in values if np.isfinite(x)], float) * 100
        if v.size == 0:
            return "–"
        return f"{v.mean():.1f}" if v.size == 1 else f"{v.mean():.1f} ± {v.std():.1f}"

    head = ["Method", "Mean", "Mean (raw)"] + [short_name(o) for o in organs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        seeds = sorted({r["seed"] for r in rows if r["method"] == m})
        means = {k: [np.nanmean([r.get(k, r["dice"]) for r in rows if r["method"] == m and r["seed"] == s])
                     for s in seeds] for k in ("dice", "dice_raw")}
        cells = [pm([r["dice"] for r in rows if r["method"] == m and r["organ"] == o]) for o in organs]
        lines.append("| " + " | ".join([m, pm(means["dice"]), pm(means["dice_raw"])] + cells) + " |")
    return "\n".join(lines) + "\n"


def run_demo(out: str | Path, quick: bool = False, labeled: float = 0.2,
             seeds: Sequence[int] = (0,), layout: str = "synapse", methods: Sequence[str] = METHODS,
             cases: int | None = None, steps: int | None = None, device: str = "auto",
             progress: bool = True, extra: Sequence[str] = (), data: str | Path | None = None,
             config: str | Path | None = None, split_lists: dict | None = None,
             keep_done: bool = False, jobs: int = 1, plan_only: bool = False) -> dict:
    """Run the demo (or one fraction of the benchmark) into ``out``.

    ``data``: an existing PREP_DIR instead of the phantom; ``config``: the base config (default
    ``configs/phantom.yaml``); ``split_lists``: seed -> folder of split lists to import;
    ``keep_done``: a run whose ``eval/summary.json`` exists is kept, not redone (an interrupted
    benchmark continues; delete a run's folder when its settings changed); ``jobs``: trainings
    run at a time, each in its own process with one thread (see :func:`run_tasks`);
    ``plan_only``: prepare data and splits and return ``{"tasks", "runs", "splits", "stage"}``
    without training (the benchmark pools the tasks of several fractions).
    Each seed draws its own split (``out/splits/seed<S>/``: test, eval and labeled cases) as
    well as its own initialisation. Returns ``{"rows": [...], "table": markdown, "paths": {...},
    "runs": {(row, seed): run dir}, "splits": {seed: folder}}`` (see :func:`collect_results`);
    rows hold method, seed, organ, dice (test split, after the run's post-processing), dice_raw
    (before).
    """
    from medseg_dpl.data import make_splits, preprocess_dataset
    from medseg_dpl.data.phantom import make_phantom
    from medseg_dpl.data.splits import fraction_tag

    unknown = [m for m in methods if m not in known_rows()]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(known_rows())}")
    s = dict(SETTINGS["quick" if quick else "default"])
    if cases is not None:
        s["cases"] = cases
    if steps is not None:
        s["steps"], s["val_every"] = steps, max(1, steps // 4)
    extra = [*s.get("extra", []), *extra]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # progress bars only on a terminal; redirected output gets the trainer's periodic lines
    bars = progress and sys.stderr.isatty() and jobs <= 1

    def stage(msg):
        print(f"[demo {time.perf_counter() - t0:6.0f}s] {msg}", flush=True)

    if data is None:
        raw, prep = out / "raw", out / "prep"
        stage(f"1/5 phantom: {s['cases']} cases of {s['shape']} voxels, {layout} layout -> {raw}")
        make_phantom(raw, layout=layout, cases=s["cases"], seed=0, shape=s["shape"], progress=bars)
        stage(f"2/5 check + preprocess -> {prep}")
        preprocess_dataset(layout, raw, prep, progress=bars)
    else:
        prep = Path(data)
        stage(f"1-2/5 data: {prep}")
    tag = fraction_tag(labeled)
    split_dirs = {}
    for seed in seeds:
        split_dirs[seed] = out / "splits" / f"seed{seed}"
        lists = (split_lists or {}).get(seed)
        sp = make_splits(prep, labeled=labeled, seed=seed, from_lists=lists, out_dir=split_dirs[seed])
        stage(f"    seed {seed} split: {len(sp['train'])} train ({len(sp[f'labeled_{tag}'])} labeled: "
              f"{', '.join(sp[f'labeled_{tag}'])}), {len(sp['eval'])} eval, {len(sp['test'])} test")

    runs: dict = {}
    tasks = []
    for method in methods:
        for seed in seeds:
            run, sd = out / "runs" / f"{method}_seed{seed}", split_dirs[seed]
            runs[(method, seed)] = run
            if keep_done and (run / "eval" / "summary.json").is_file():
                stage(f"    {method} (seed {seed}): done before, kept ({run})")
                continue
            task = {"row": method, "seed": seed, "run": str(run), "prep": str(prep), "splits": str(sd),
                    "tag": tag, "bars": bars}
            if method != ATLAS:
                task["cfg"] = _config(method, prep, sd, tag, seed, s["steps"], s["val_every"], device,
                                      progress and jobs <= 1, extra, Path(config) if config else None)
            tasks.append(task)
    if plan_only:
        return {"tasks": tasks, "runs": runs, "splits": split_dirs, "stage": stage, "prep": prep}
    run_tasks(tasks, jobs, stage)
    stage("5/5 tables and figures")
    where = "phantom" if data is None else Path(data).name
    res = collect_results(out, methods, seeds, title=f"{where} test cases, {labeled:.0%} labeled")
    print(res["table"])
    stage(f"done; outputs in {out}")
    return {**res, "splits": split_dirs}


# Longest first, so that N workers finish together (two-network methods cost ~1.5x FixMatch).
_COST = {"dhc": 4, "cld": 4, "cps_depl": 4, "ga": 4, "supervised": 1, ATLAS: 0}


def run_task(task: dict) -> str:
    """One benchmark cell: train ``task["cfg"]`` into ``task["run"]`` and score it on the test
    split, or the atlas baseline. Returns a line for the log."""
    from medseg_dpl.evaluation.atlas import evaluate_atlas
    from medseg_dpl.evaluation.evaluate import evaluate_checkpoint

    t0 = time.perf_counter()
    run, sd, tag = Path(task["run"]), Path(task["splits"]), task["tag"]
    if task["row"] == ATLAS:
        evaluate_atlas(task["prep"], str(sd / f"labeled_{tag}.txt"), str(sd / "eval.txt"),
                       str(sd / "test.txt"), run / "eval", method=ATLAS)
    else:
        from medseg_dpl.engine.trainer import train
        train(task["cfg"], run)
        evaluate_checkpoint(run / "checkpoints" / "best.pt", task["prep"], run / "eval",
                            split=str(sd / "test.txt"), method=task["row"], progress=task["bars"],
                            num_overlays=1)
    return f"{task['row']} (seed {task['seed']}) done in {time.perf_counter() - t0:.0f} s -> {run}"


def _one_thread() -> None:
    import torch
    torch.set_num_threads(1)


def run_tasks(tasks: Sequence[dict], jobs: int = 1, stage=print, order: str = "longest") -> None:
    """Run benchmark cells one after the other (``jobs`` 1) or ``jobs`` at a time, each in a
    fresh process with one thread (OMP_NUM_THREADS=1): oversubscribed cores made every step
    2-3x slower. Seed by seed; within a seed ``order`` ``longest`` first (the workers finish
    together) or ``listed`` (the methods' order: the rows wanted first finish first). A failing
    cell raises after the others have finished."""
    if order not in ("longest", "listed"):
        raise ValueError(f"order: expected longest or listed, got {order!r}")
    rows = list(dict.fromkeys(t["row"] for t in tasks))
    key = (lambda t: -_COST.get(t["row"], 2)) if order == "longest" else (lambda t: rows.index(t["row"]))
    queue = sorted(tasks, key=lambda t: (t["seed"], key(t)))
    if jobs <= 1:
        for t in queue:
            stage(f"3-4/5 {t['row']} (seed {t['seed']}) -> {t['run']}")
            stage("    " + run_task(t))
        return
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor, as_completed

    os.environ["OMP_NUM_THREADS"] = "1"   # inherited by the spawned workers before torch loads
    errors = []
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"),
                             initializer=_one_thread) as pool:
        stage(f"3-4/5 {len(queue)} runs, {jobs} at a time (one thread each)")
        futures = {pool.submit(run_task, t): t for t in queue}
        for f in as_completed(futures):
            t = futures[f]
            try:
                stage("    " + f.result())
            except Exception as exc:  # noqa: BLE001 - reported below, the other runs go on
                errors.append(f"{t['row']} (seed {t['seed']}): {type(exc).__name__}: {exc}")
                stage(f"    FAILED {errors[-1]}")
    if errors:
        raise RuntimeError("benchmark runs failed:\n" + "\n".join(errors))


def collect_results(out: str | Path, methods: Sequence[str], seeds: Sequence[int],
                    title: str = "test cases") -> dict:
    """Tables and figures from the runs in ``out/runs/<method>_seed<S>/`` (their
    ``eval/summary.json`` and ``pseudo_labels.json``); runs that have not finished are left out,
    so a report can be rebuilt from whatever is done. Writes ``results.csv``, ``results.md``,
    ``dice_per_organ.png``, ``pseudo_label_distribution.png``; returns ``{"rows", "table",
    "paths", "runs"}``."""
    from medseg_dpl.evaluation.compare import plot_grouped_dice

    out = Path(out)
    rows: list[dict] = []
    reports: dict[str, list[dict]] = {}
    runs: dict = {}
    organs: list[str] = []
    for method in methods:
        for seed in seeds:
            run = out / "runs" / f"{method}_seed{seed}"
            path = run / "eval" / "summary.json"
            if not path.is_file():
                continue
            runs[(method, seed)] = run
            summary = json.loads(path.read_text(encoding="utf-8"))
            organs = list(summary["organs"])
            raw = summary.get("raw", summary)
            for organ in organs:
                # None: absent in every test case
                value = {k: (raw if k.endswith("_raw") else summary)["per_organ"][organ][k.split("_")[0]]["mean"]
                         for k in ("dice", "dice_raw", "hd95", "hd95_raw")}
                rows.append({"method": method, "seed": seed, "organ": organ,
                             **{k: float("nan") if v is None else v for k, v in value.items()}})
            pl = run / "pseudo_labels.json"
            if method not in ("supervised", ATLAS) and pl.exists():
                reports.setdefault(method, []).append(json.loads(pl.read_text(encoding="utf-8")))
    methods = [m for m in methods if any(r["method"] == m for r in rows)]

    with open(out / "results.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["method", "seed", "organ", "dice", "dice_raw", "hd95", "hd95_raw"])
        w.writeheader()
        w.writerows(rows)
    table = results_markdown(rows, organs, methods)
    (out / "results.md").write_text(table, encoding="utf-8")
    grouped = {"organs": organs, "methods": {}}
    for m in methods:
        dice = {}
        for o in organs:
            v = np.asarray([r["dice"] for r in rows if r["method"] == m and r["organ"] == o
                            and np.isfinite(r["dice"])], float)
            dice[o] = [float(v.mean()), float(v.std())] if v.size else None
        means = [np.nanmean([r["dice"] for r in rows if r["method"] == m and r["seed"] == sd])
                 for sd in sorted({r["seed"] for r in rows if r["method"] == m})]
        grouped["methods"][m] = {"dice": dice, "avg_dice": [float(np.mean(means)), float(np.std(means))]}
    plot_grouped_dice(grouped, out / "dice_per_organ.png", title=f"Dice per organ, {title}")
    paths = {"results_csv": out / "results.csv", "results_md": out / "results.md",
             "dice_per_organ": out / "dice_per_organ.png"}
    if reports:
        paths["pseudo_label_distribution"] = pseudo_label_figure(reports, out / "pseudo_label_distribution.png")
    return {"rows": rows, "table": table, "paths": paths, "runs": runs}


def default_jobs(device: str = "auto") -> int:
    """Trainings at a time for the demo: 2 on a CPU machine with ≥ 2 cores (one thread each),
    1 on a GPU (one device, one run)."""
    import os

    import torch
    on_gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return 1 if on_gpu else max(1, min(2, os.cpu_count() or 1))


def _cmd_demo(args) -> int:
    try:
        steps = args.steps if args.steps is not None or args.quick else DEMO_STEPS
        run_demo(args.out, quick=args.quick, labeled=args.labeled, seeds=args.seeds,
                 layout=args.layout, cases=args.cases, steps=steps, device=args.device,
                 progress=not args.no_progress, extra=args.overrides,
                 jobs=args.jobs or default_jobs(args.device))
    except Exception as exc:  # the verb reports, the library raises
        from medseg_dpl.config import ConfigError
        if isinstance(exc, (ConfigError, FileNotFoundError, ValueError)):
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_ERROR
        raise
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="end-to-end demo on the synthetic phantom (prep, split, train 3 methods, eval, plots)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--quick", action="store_true", help="small and fast (~3 min on 2 CPU cores)")
    p.add_argument("--labeled", type=float, default=0.2, help="labeled fraction of the train cases")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="seeds; each draws its own split and initialisation (default: 0)")
    p.add_argument("--layout", choices=["synapse", "amos"], default="synapse")
    p.add_argument("--cases", type=int, default=None, help="phantom cases (default: 30, quick: 10)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps per run (default: {DEMO_STEPS}, half the config's "
                        "converged schedule; --quick: 40; the benchmark: the config's train.steps)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--jobs", type=int, default=0,
                   help="trainings at a time (default: 2 on a CPU with >= 2 cores, 1 on a GPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides applied to every run (e.g. debias.tau=0.5)")
    p.set_defaults(func=_cmd_demo)
