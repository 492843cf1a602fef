"""``medseg-dpl train --config FILE --out RUN_DIR [key=value ...] [--resume]``."""
from __future__ import annotations

import sys

from medseg_dpl.config import ConfigError, load_config
from medseg_dpl.errors import EXIT_ERROR


def run_train(args) -> int:
    from medseg_dpl.engine.defaults import SEG_DEFAULTS
    from medseg_dpl.engine.data import TeacherPredictionError
    from medseg_dpl.engine.trainer import TrainingError, train
    try:
        cfg = load_config(args.config, args.overrides, SEG_DEFAULTS)
        result = train(cfg, args.out, resume=args.resume)
    except (ConfigError, TrainingError, TeacherPredictionError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if "final_dice_mean" in result:
        print(f"best mean Dice {result['best_metric']:.4f} at step {result['best_step']}; "
              f"final {result['final_dice_mean']:.4f}; outputs in {args.out}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a 3D segmentation model (supervised, fixmatch, debiaspl, cps_depl, dhc, cld)",
        description="Train on a PREP_DIR (data.root). Overrides are dotted key=value pairs, e.g. "
                    "data.root=prep method.name=debiaspl train.steps=300. Under torchrun it runs DDP.")
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--out", required=True, help="RUN_DIR: config.yaml, checkpoints/, tb/, train.log")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoints/last.pt")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=run_train)
