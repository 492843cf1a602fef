"""Side-by-side comparison of several evaluated runs (methods, seeds).

Each run is a folder holding a ``summary.json`` written by ``medseg-dpl eval`` (the run folder
itself, or an ``eval*`` sub-folder of it, or any folder below it). Without ``seeds`` every run
is its own row and ± is the std over test cases (from its summary). With ``seeds`` runs of the
same method (``summary["method"]``, or the folder name without a trailing ``_seed<N>`` /
``-s<N>``) are pooled: each entry is the mean over seeds of the per-seed value and ± the std
over seeds, as DHC reports "mean ± std over 3 runs".
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from medseg_dpl.data.labels import short_name
from medseg_dpl.errors import MedsegError
from medseg_dpl.utils import atomic_path, save_figure


class CompareError(MedsegError, RuntimeError):
    """A run folder without a usable summary, or runs scored on different organs."""


_SEED = re.compile(r"[_-](seed|s)\d+$", re.IGNORECASE)


def find_summary(run_dir: str | os.PathLike) -> Path:
    """The ``summary.json`` of a run folder (itself, ``eval*/``, else the shallowest below it)."""
    run = Path(run_dir)
    if run.is_file() and run.name.endswith(".json"):
        return run
    if (run / "summary.json").is_file():
        return run
    cands = sorted(run.glob("eval*/summary.json")) or \
        sorted(run.rglob("summary.json"), key=lambda p: (len(p.parts), str(p)))
    if not cands:
        raise CompareError(f"{run}: no summary.json (run `medseg-dpl eval ... --out {run}/eval` first)")
    return cands[0].parent


def _load(run_dir) -> dict:
    d = find_summary(run_dir)
    p = d if d.is_file() else d / "summary.json"
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CompareError(f"{p}: unreadable summary ({exc})") from exc


def compare_runs(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike | None = None,
                 names: Sequence[str] | None = None, seeds: bool = False) -> dict:
    """Aggregate run summaries into a comparison table.

    Returns ``{"organs": [...], "distance_units": str, "protocol": str, "methods": {name:
    {"runs": [dirs], "n": int, "avg_dice": [mean, std], "avg_asd": [mean, std], "avg_hd95":
    [mean, std], "dice": {organ: [mean, std]}, "asd": {...}, "hd95": {...}}}}`` (None where
    not available). With ``out_dir`` also writes ``compare.json``, ``compare.md`` and
    ``compare_dice.png`` (grouped bars).
    """
    if not run_dirs:
        raise CompareError("no run folders given")
    if names is not None and len(names) != len(run_dirs):
        raise CompareError(f"{len(names)} names for {len(run_dirs)} runs")
    summaries = [_load(r) for r in run_dirs]
    organs = summaries[0]["organs"]
    for r, s in zip(run_dirs, summaries):
        if s["organs"] != organs:
            raise CompareError(f"{r}: organs {s['organs']} differ from {run_dirs[0]}'s {organs}")
    protocols = {s.get("protocol") for s in summaries}
    if len(protocols) > 1:
        raise CompareError(f"runs were scored with different protocols {sorted(map(str, protocols))}")

    def label(i):
        if names is not None:
            return names[i]
        base = summaries[i].get("method") or Path(run_dirs[i]).resolve().name
        if not seeds:  # distinct rows: fall back to the folder name when methods repeat
            same = [j for j, s in enumerate(summaries) if (s.get("method") or "") == base]
            return base if len(same) == 1 else Path(run_dirs[i]).resolve().name
        return _SEED.sub("", base)

    groups: dict[str, list[int]] = {}
    for i in range(len(summaries)):
        groups.setdefault(label(i), []).append(i)

    def stat(values, stds):
        v = [x for x in values if x is not None]
        if not v:
            return None
        if seeds or len(v) > 1:  # spread over runs
            return [float(np.mean(v)), float(np.std(v))]
        return [float(v[0]), None if stds[0] is None else float(stds[0])]

    methods = {}
    for name, idx in groups.items():
        ss = [summaries[i] for i in idx]
        entry = {"runs": [str(run_dirs[i]) for i in idx], "n": len(idx)}
        for m in ("dice", "asd", "hd95"):
            entry[f"avg_{m}"] = stat([s["overall"][m]["mean"] for s in ss],
                                     [s["overall"][m]["std"] for s in ss])
            entry[m] = {o: stat([s["per_organ"][o][m]["mean"] for s in ss],
                                [s["per_organ"][o][m]["std"] for s in ss]) for o in organs}
        methods[name] = entry
    table = {"organs": organs, "protocol": summaries[0].get("protocol"),
             "distance_units": summaries[0].get("distance_units", "mm"), "seeds": seeds,
             "methods": methods}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "compare.json") as tmp:
            tmp.write_text(json.dumps(table, indent=2), encoding="utf-8")
        with atomic_path(out / "compare.md") as tmp:
            tmp.write_text(compare_markdown(table), encoding="utf-8")
        plot_grouped_dice(table, out / "compare_dice.png")
    return table


def _pm(v, scale=1.0, digits=1):
    if v is None:
        return "–"
    return f"{v[0] * scale:.{digits}f}" + ("" if v[1] is None else f" ± {v[1] * scale:.{digits}f}")


def compare_markdown(table: dict) -> str:
    """Papers' layout: Method | Avg. Dice | Avg. ASD | one Dice column per organ (percent)."""
    organs = table["organs"]
    head = ["Method", "Avg. Dice (%)", f"Avg. ASD ({table['distance_units']})"] + [short_name(o) for o in organs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in table["methods"].items():
        lines.append("| " + " | ".join([f"{name}" + (f" (n={e['n']})" if e["n"] > 1 else ""),
                                        _pm(e["avg_dice"], 100), _pm(e["avg_asd"], 1, 2)]
                                       + ["–" if e["dice"][o] is None else
                                          f"{e['dice'][o][0] * 100:.1f}" for o in organs]) + " |")
    spread = "std over seeds (runs)" if table["seeds"] else "std over test cases (or over runs when several share a name)"
    lines += ["", f"± is the {spread}; protocol `{table['protocol']}`."]
    return "\n".join(lines) + "\n"


def plot_grouped_dice(table: dict, path: str | os.PathLike, title: str = "Dice per organ") -> Path:
    """Grouped bar chart: one group per organ, one bar per method (error bars: the table's ±)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    organs, methods = table["organs"], list(table["methods"])
    n = max(len(methods), 1)
    width = 0.8 / n
    x = np.arange(len(organs))
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(organs) * n + 2), 3.5))
    for k, name in enumerate(methods):
        d = table["methods"][name]["dice"]
        means = [d[o][0] if d[o] else 0.0 for o in organs]
        errs = [d[o][1] if d[o] and d[o][1] is not None else 0.0 for o in organs]
        avg = table["methods"][name]["avg_dice"]
        lab = f"{name} ({avg[0] * 100:.1f}%)" if avg else name
        ax.bar(x + (k - (n - 1) / 2) * width, means, width, yerr=errs, capsize=2, label=lab)
    ax.set_xticks(x, [short_name(o) for o in organs])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("Dice")
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=min(n, 4), loc="upper center", bbox_to_anchor=(0.5, -0.12))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)
