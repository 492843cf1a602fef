#!/usr/bin/env python
"""Which DebiasPL reference is better on a PREP_DIR: ``uniform`` (the paper) or ``labeled_prior``?

Trains debiaspl with each ``debias.reference`` (plus fixmatch and supervised for context) for
each seed from one config, then scores the final model on a held-out split (default ``test``,
never used for model selection) with per-organ Dice, and reports the pseudo-label bias on the
unlabeled cases (liver share of organ voxels: pseudo-labels vs truth) from pseudo_labels.json.

    python scripts/compare_reference.py --prep PREP --out runs/ref --config configs/phantom_debiaspl.yaml \
        --seeds 0 1 data.labeled_split=labeled_15p data.unlabeled_split=unlabeled_15p train.steps=250
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from medseg_dpl.config import load_config
from medseg_dpl.data import load_manifest, read_split
from medseg_dpl.data.pipelines import build_dataset
from medseg_dpl.engine.defaults import SEG_DEFAULTS
from medseg_dpl.engine.trainer import train, validate
from medseg_dpl.models import build_model

VARIANTS = {"supervised": ["method.name=supervised"], "fixmatch": ["method.name=fixmatch"],
            "debiaspl-uniform": ["method.name=debiaspl", "debias.reference=uniform"],
            "debiaspl-labeled_prior": ["method.name=debiaspl", "debias.reference=labeled_prior"]}


def held_out_dice(run: Path, prep: Path, split: str) -> np.ndarray:
    ck = torch.load(run / "checkpoints/last.pt", map_location="cpu", weights_only=True)
    cfg = ck["config"]
    C = len(ck["dataset"]["classes"])
    net = build_model(cfg["model"], 1, C)
    net.load_state_dict(ck["model"])
    ds = build_dataset(prep, read_split(prep, split), "eval", cfg["data"]["patch_size"], C, 1, False)
    return validate(net, ds, cfg, C, torch.device("cpu"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prep", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", default="configs/phantom_debiaspl.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--held-out", default="test")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    prep, out = Path(args.prep), Path(args.out)
    classes = load_manifest(prep)["classes"]
    rows = []
    for seed in args.seeds:
        for v in args.variants:
            run = out / f"{v}_s{seed}"
            if not (run / "metrics.json").is_file():
                cfg = load_config(args.config, [f"data.root={prep}", f"train.seed={seed}",
                                                 *args.overrides, *VARIANTS[v]], SEG_DEFAULTS)
                train(cfg, run)
            dice = held_out_dice(run, prep, args.held_out)
            rep = json.loads((run / "pseudo_labels.json").read_text())
            li = classes.index("liver") - 1
            row = {"variant": v, "seed": seed, "dice": float(np.nanmean(dice)),
                   "per_organ": [float(x) for x in dice],
                   "liver_share_pl": rep["organ_share"]["pseudo_label"][li],
                   "liver_share_true": rep["organ_share"]["true"][li] if rep["organ_share"]["true"] else None,
                   "pl_acc": rep["pseudo_label_accuracy"], "confident": rep["confident_fraction"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    print(f"\nheld-out split {args.held_out!r}, final weights, mean organ Dice (per seed)")
    print("| variant | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean | liver share of organ "
          "pseudo-labels (truth) | pseudo-label acc |")
    print("|---|" + "---|" * len(args.seeds) + "---|---|---|")
    for v in args.variants:
        r = [x for x in rows if x["variant"] == v]
        ls = np.mean([x["liver_share_pl"] for x in r])
        lt = r[0]["liver_share_true"]
        print(f"| {v} | " + " | ".join(f"{x['dice']:.3f}" for x in r) + f" | {np.mean([x['dice'] for x in r]):.3f} | "
              f"{ls:.2f} ({lt:.2f}) | {np.mean([x['pl_acc'] for x in r]):.3f} |")


if __name__ == "__main__":
    main()
