"""Verbs ``phantom``, ``check``, ``prep``, ``split``: thin layers over ``medseg_dpl.data``."""
from __future__ import annotations

import argparse
import sys

from medseg_dpl.data.readers import DATASETS
from medseg_dpl.errors import EXIT_ERROR


def _error(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return EXIT_ERROR


def _data_errors():
    from medseg_dpl.data.io import DataError

    errors = (DataError, ValueError, OSError)
    try:
        from medseg_dpl.data.phantom import PhantomError

        errors += (PhantomError,)
    except ImportError:
        pass
    return errors


# ----------------------------------------------------------------------------- phantom
def cmd_phantom(args) -> int:
    from medseg_dpl.data.phantom import make_phantom

    try:
        extra = {} if args.shape is None else {"shape": tuple(args.shape)}
        written = make_phantom(args.out, layout=args.layout, cases=args.cases, seed=args.seed,
                               spacing=args.spacing, progress=True, **extra)
    except _data_errors() as exc:
        return _error(str(exc))
    print(f"wrote a phantom of {args.cases} case(s) in the {args.layout} layout to {args.out} "
          f"({len(written)} files; seed {args.seed})")
    return 0


# ----------------------------------------------------------------------------- check
def cmd_check(args) -> int:
    from medseg_dpl.data.check import run_check
    from medseg_dpl.data.preprocess import resolve_classes

    try:
        n_classes = len(resolve_classes(args.dataset, args.classes, None)) if args.classes else None
        cases, problems, _ = run_check(args.dataset, args.raw, args.labels, args.ct_only,
                                       n_classes, args.workers)
    except _data_errors() as exc:
        return _error(str(exc))
    if not cases and not problems:
        problems = [f"{args.raw}: no cases found"]
    if problems:
        print(f"error: {len(problems)} problem(s) in {args.raw}:", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return EXIT_ERROR
    n_lab = sum(c.label is not None for c in cases)
    print(f"ok: {len(cases)} case(s) in {args.raw} ({n_lab} with labels), no problems found")
    return 0


# ----------------------------------------------------------------------------- prep
def cmd_prep(args) -> int:
    from medseg_dpl.data.check import CheckError
    from medseg_dpl.data.preprocess import preprocess_dataset

    try:
        preprocess_dataset(args.dataset, args.raw, args.out, spacing=args.spacing,
                           clip=args.clip, workers=args.workers, ct_only=args.ct_only,
                           labels=args.labels, classes=args.classes, modality=args.modality)
    except CheckError as exc:
        print(f"error: {len(exc.problems)} problem(s) in {args.raw}; nothing written:",
              file=sys.stderr)
        for p in exc.problems:
            print(f"  {p}", file=sys.stderr)
        return EXIT_ERROR
    except _data_errors() as exc:
        return _error(str(exc))
    return 0


# ----------------------------------------------------------------------------- split
def cmd_split(args) -> int:
    from medseg_dpl.data.splits import format_split_table, make_splits

    try:
        splits = make_splits(args.data, labeled=args.labeled, seed=args.seed,
                             from_lists=args.from_lists)
    except _data_errors() as exc:
        return _error(str(exc))
    print(f"wrote {len(splits)} split list(s) to {args.data}/splits/ (seed {args.seed}):")
    print(format_split_table(splits))
    return 0


def _add_raw_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, choices=DATASETS, help="raw layout")
    p.add_argument("--raw", required=True,
                   help="raw data: dataset folder (nnunet: the nnU-Net v2 raw folder with "
                        "dataset.json); for nifti one file or a folder; for dicom one series "
                        "folder or a folder of series folders")
    p.add_argument("--labels", default=None,
                   help="nifti/dicom: a label file or a folder of <case id>.nii.gz labels")
    p.add_argument("--ct-only", action="store_true",
                   help="AMOS: drop the MRI cases (ids >= 500; kept by default and normalised as MR)")
    p.add_argument("--classes", default=None,
                   help="nifti/dicom: class names 'background,liver,...' or 'synapse'/'amos' "
                        "(default: class_1..class_K from the largest label value)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")


def register(subparsers) -> None:
    p = subparsers.add_parser("phantom", help="write a synthetic abdomen CT data set in a raw layout",
                              description="Write a synthetic abdomen CT phantom in the exact raw "
                                          "Synapse or AMOS22 layout.")
    p.add_argument("--layout", choices=("synapse", "amos"), default="synapse")
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--out", required=True, help="raw data folder to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="voxels per case (default: the phantom's, 80 80 64)")
    p.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="fixed voxel size in mm (default: random per case, fitting the body)")
    p.set_defaults(func=cmd_phantom)

    p = subparsers.add_parser("check", help="integrity check of a raw data set (writes nothing)",
                              description="Report every problem of a raw data set at once "
                                          "(unreadable/truncated files, shape/affine mismatch, "
                                          "label values, NaN/inf, not 3D, duplicate ids, missing "
                                          "labels); exit 1 if there is any.")
    _add_raw_args(p)
    p.set_defaults(func=cmd_check)

    p = subparsers.add_parser("prep", help="check, then preprocess a raw data set into PREP_DIR",
                              description="Check the raw data, then reorient to RAS, resample, "
                                          "crop to the body, normalise intensities (CT: clip HU "
                                          "and scale to [0, 1]; MR: clip to the body's 0.5-99.5 "
                                          "percentiles and z-score); write NIfTI + dataset.json "
                                          "into PREP_DIR.")
    _add_raw_args(p)
    p.add_argument("--out", required=True, help="PREP_DIR to write")
    p.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="target voxel size in mm, RAS order (default: per axis the coarser of "
                        "1.5 x 1.5 x 2 and the data set's median spacing)")
    p.add_argument("--clip", type=float, nargs=2, default=(-175.0, 250.0), metavar=("LO", "HI"),
                   help="CT: HU window, then scaled to [0, 1] (default -175 250)")
    p.add_argument("--modality", choices=("ct", "mr"), default=None,
                   help="intensity scheme for every case (default: from the layout: nnunet "
                        "channel_names, AMOS ids >= 500 = MR; nifti/dicom: ct)")
    p.set_defaults(func=cmd_prep)

    p = subparsers.add_parser("split", help="train/eval/test and labeled/unlabeled split lists",
                              description="Write PREP_DIR/splits/{train,eval,test,labeled_<P>p,"
                                          "unlabeled_<P>p}.txt (DHC protocol sizes by default).")
    p.add_argument("--data", required=True, help="PREP_DIR written by prep")
    p.add_argument("--labeled", type=float, nargs="+", default=None, metavar="FRACTION",
                   help="labeled fraction(s) of the train set (default: Synapse 0.2, AMOS 0.05)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--from-lists", default=None, metavar="DIR",
                   help="use the split lists in DIR (one id per line, DHC names); the lists it "
                        "lacks are drawn with --seed")
    p.set_defaults(func=cmd_split)
