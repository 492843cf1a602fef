"""``medseg-dpl export --checkpoint RUN/checkpoints/best.pt --out BUNDLE``: a MONAI bundle."""
from __future__ import annotations

import logging
import sys

from medseg_dpl.errors import EXIT_ERROR


def run_export(args) -> int:
    """Export; a refused checkpoint prints ``error: <file>: <cause>`` and exits 1."""
    from medseg_dpl.deploy.export import ExportError, export_bundle

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    options = {"modality": args.modality, "tta": {"on": True, "off": False, None: None}[args.tta],
               "data_licence": args.data_licence, "overwrite": args.overwrite}
    try:
        print(run_hint(export_bundle(args.checkpoint, args.out, **options)))
        return 0
    except ExportError as exc:  # nothing was written
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR


def run_hint(bundle) -> str:
    """What was written and the command that runs it."""
    return (f"wrote MONAI bundle {bundle}; run it with:\n  python -m monai.bundle run --config_file "
            f"{bundle}/configs/inference.json --bundle_root {bundle} --dataset_dir IN --output_dir OUT")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="export a segmentation checkpoint as a MONAI bundle (MONAI Label, Deploy)",
        description="Write a MONAI bundle (configs/metadata.json, configs/inference.json, "
                    "models/model.pt and model.ts, docs/) whose inference.json reproduces "
                    "`medseg-dpl predict` with MONAI components.")
    p.add_argument("--checkpoint", required=True, help="RUN/checkpoints/best.pt (or last.pt)")
    p.add_argument("--out", required=True, help="bundle folder to create")
    p.add_argument("--modality", choices=("ct", "mr"), default=None,
                   help="for a model trained on CT and MR (AMOS): the scheme the bundle applies")
    p.add_argument("--tta", choices=("on", "off"), default=None,
                   help="8-flip test-time augmentation in the bundle (default: the run's eval.tta)")
    p.add_argument("--data-licence", default=None,
                   help="licence text of the training data, written to docs/license.txt")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.set_defaults(func=run_export)
