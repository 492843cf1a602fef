"""``medseg-dpl classify --config FILE [--out DIR] [key=value ...]``: train and print top-1."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from medseg_dpl.classification.datasets import DatasetError
from medseg_dpl.classification.defaults import load_classify_config
from medseg_dpl.classification.trainer import train_classifier
from medseg_dpl.config import ConfigError
from medseg_dpl.errors import EXIT_ERROR


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "classify", help="semi-supervised image classification (supervised/FixMatch/DebiasPL)",
        description="Train an image classifier with supervised, FixMatch (EMA teacher) or "
                    "DebiasPL on digits or an ImageFolder folder; prints top-1 on the held-out part.")
    p.add_argument("--config", required=True,
                   help="YAML config (keys of CLASSIFY_DEFAULTS; the deprecated ones translated)")
    p.add_argument("--out", default=None,
                   help="run folder for TensorBoard, checkpoint and results "
                        "(default runs/classify/<config name>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. debias.tau=0.5 train.steps=200")
    p.set_defaults(func=run_classify)


def _fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f} %"


def run_classify(args: argparse.Namespace) -> int:
    try:
        cfg = load_classify_config(args.config, args.overrides)
        out = Path(args.out) if args.out else Path("runs/classify") / Path(args.config).stem
        res = train_classifier(cfg, out, progress=not args.no_progress)
    except (ConfigError, DatasetError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(f"method {res['method']}  seed {res['seed']}  steps {res['steps']}  "
          f"labeled {res['num_labeled']}  unlabeled {res['num_unlabeled']}  test {res['num_test']}")
    print(f"top-1 {_fmt(res['top1'])} (EMA model), {_fmt(res['top1_student'])} (student)")
    if "pl_train" in res:
        pl = res["pl_train"]
        print(f"pseudo-labels during training: mask ratio {_fmt(pl['mask_ratio'])}, "
              f"accuracy {_fmt(pl['accuracy'])}, max/min class share {pl['imbalance']:.2f}")
    print(f"run folder: {out}")
    return 0
