"""``medseg-dpl predict | eval | postprocess | compare``: thin layers over the evaluation package's functions."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from medseg_dpl.errors import EXIT_ERROR
from medseg_dpl.evaluation.metrics import PROTOCOLS


def _errors() -> tuple[type[BaseException], ...]:
    from medseg_dpl.evaluation.compare import CompareError
    from medseg_dpl.evaluation.evaluate import EvalError
    from medseg_dpl.evaluation.metrics import MetricInputError
    from medseg_dpl.evaluation.postprocess import PostprocessError
    from medseg_dpl.evaluation.predict import PredictError
    errs: list[type[BaseException]] = [PredictError, EvalError, CompareError, MetricInputError,
                                       PostprocessError, FileNotFoundError]
    try:
        from medseg_dpl.data.io import DataError
        errs.append(DataError)
    except ImportError:
        pass
    return tuple(errs)


def _guard(fn):
    """Expected failures (bad files, mismatches) -> ``error: ...`` on stderr and exit code 1."""
    def run(args) -> int:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
        try:
            return int(fn(args) or 0)
        except _errors() as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_ERROR
    return run


def _predict(args) -> int:
    from medseg_dpl.evaluation.predict import predict
    paths = predict(args.checkpoint, args.input, args.out, overlap=args.overlap,
                    sw_batch_size=args.sw_batch_size, tta=args.tta, device=args.device,
                    interpolation=args.interpolation, postprocess=not args.no_postprocess,
                    save_probs=args.save_probs, modality=args.modality)
    print(f"wrote {len(paths)} label map(s) to {args.out}"
          + (" and their <case>_probs.npz" if args.save_probs else ""))
    return 0


def _print_summary(summary: dict, out: str) -> None:
    from medseg_dpl.evaluation.evaluate import markdown_table
    print(markdown_table(summary, summary.get("method", "ours")))
    print(f"wrote {out}/per_case.csv, summary.json, results.md, dice_per_organ.png")


def _eval(args) -> int:
    from medseg_dpl.evaluation.evaluate import EvalError, evaluate_checkpoint, evaluate_predictions
    if args.checkpoint and args.pred:
        raise EvalError("give either --checkpoint (with --data) or --pred (with --labels), not both")
    if args.checkpoint:
        if not args.data:
            raise EvalError("--checkpoint needs --data PREP_DIR")
        s = evaluate_checkpoint(args.checkpoint, args.data, args.out, split=args.split,
                                overlap=args.overlap, sw_batch_size=args.sw_batch_size,
                                tta=args.tta, device=args.device, protocol=args.protocol,
                                save_predictions=not args.no_save_predictions,
                                num_overlays=args.overlays, method=args.method,
                                postprocess=not args.no_postprocess)
    elif args.pred:
        if not args.labels:
            raise EvalError("--pred needs --labels LABEL_DIR")
        classes = args.dataset or args.data
        s = evaluate_predictions(args.pred, args.labels, args.out, classes=classes,
                                 protocol=args.protocol, num_overlays=args.overlays,
                                 image_dir=args.images, method=args.method or "predictions")
    else:
        raise EvalError("give --checkpoint CKPT --data PREP_DIR, or --pred PRED_DIR --labels LABEL_DIR")
    _print_summary(s, args.out)
    return 0


def _postprocess(args) -> int:
    from medseg_dpl.evaluation.postprocess import describe
    from medseg_dpl.evaluation.run_postprocess import postprocess_run
    fractions = [float(f) for f in args.fractions.split(",")] if args.fractions else None
    kw = {"fractions": fractions} if fractions else {}
    decision = postprocess_run(args.run, data_dir=args.data, split=args.split, device=args.device,
                               tta=args.tta, **kw)
    print(describe(decision))
    run = Path(decision["checkpoint"]).parent.parent
    print(f"wrote {run / 'postprocessing.json'} and stored it in {run / 'checkpoints'}/{{best,last}}.pt")
    return 0


def _compare(args) -> int:
    from medseg_dpl.evaluation.compare import compare_markdown, compare_runs
    names = args.names.split(",") if args.names else None
    table = compare_runs(args.runs, args.out, names=names, seeds=args.seeds)
    print(compare_markdown(table))
    if args.out:
        print(f"wrote {args.out}/compare.md, compare.json, compare_dice.png")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("predict", help="segment CT volumes with a checkpoint",
                              description="Segment NIfTI files, a folder of them, or a DICOM series "
                                          "folder; writes OUT/<case>.nii.gz (uint8) in each input's "
                                          "own shape and affine.")
    p.add_argument("--checkpoint", required=True, help="RUN_DIR/checkpoints/best.pt")
    p.add_argument("--input", required=True, help="NIfTI file, folder of NIfTI files, or DICOM series folder")
    p.add_argument("--out", required=True, help="output folder")
    _inference_args(p)
    p.add_argument("--interpolation", choices=("linear", "nearest"), default="linear",
                   help="back to the input grid: resample probabilities (linear) or labels (nearest)")
    p.add_argument("--modality", choices=("ct", "mr"), default=None,
                   help="the input's modality; needed only for a model trained on CT and MR "
                        "(default: the checkpoint's)")
    p.add_argument("--save-probs", action="store_true",
                   help="also write OUT/<case>_probs.npz: raw softmax (C, X, Y, Z) float16 on the "
                        "input's grid + its affine (for ensembling, or as teacher.predictions)")
    p.set_defaults(func=_guard(_predict))

    e = subparsers.add_parser("eval", help="Dice / HD95 / ASD per organ, reports and plots",
                              description="Score a checkpoint on a PREP_DIR split (in the original "
                                          "label geometry), or score existing predictions.")
    e.add_argument("--checkpoint", help="checkpoint to evaluate (with --data)")
    e.add_argument("--data", help="PREP_DIR (with --checkpoint; with --pred: where to read class names)")
    e.add_argument("--split", default="test", help="split file name in PREP_DIR/splits (default test)")
    e.add_argument("--pred", help="folder of prediction NIfTI files (with --labels)")
    e.add_argument("--labels", help="folder of ground-truth NIfTI files")
    e.add_argument("--images", help="optional CT folder drawn beneath the overlays (--pred mode)")
    e.add_argument("--dataset", choices=("synapse", "amos"), help="class names for --pred mode")
    e.add_argument("--out", required=True, help="report folder")
    e.add_argument("--protocol", choices=PROTOCOLS, default="standard",
                   help="standard: mm, NaN for organs absent in both; dhc: DHC paper's rules")
    e.add_argument("--overlays", type=int, default=2, help="cases to draw axial overlays for")
    e.add_argument("--method", help="row name in the tables")
    e.add_argument("--no-save-predictions", action="store_true",
                   help="do not write OUT/predictions/<id>.nii.gz")
    _inference_args(e)
    e.set_defaults(func=_guard(_eval))

    pp = subparsers.add_parser("postprocess", help="decide per-organ connected-component post-processing",
                               description="Predict a run's eval split, keep per organ the connected-"
                                           "component rule (keep largest / drop small) that raises its "
                                           "Dice, write RUN/postprocessing.json and store it in "
                                           "RUN/checkpoints/{best,last}.pt (eval and predict apply it). "
                                           "train does this at its end (eval.postprocess).")
    pp.add_argument("--run", required=True, help="RUN_DIR (or RUN_DIR/checkpoints/best.pt)")
    pp.add_argument("--data", help="PREP_DIR (default: the run config's data.root)")
    pp.add_argument("--split", help="split to decide on (default: the run config's data.eval_split)")
    pp.add_argument("--fractions", help="candidate min_fraction values of the drop-small rule, "
                                        "comma-separated (default 0.1,0.25)")
    pp.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                    help="flip TTA (default: the run config's eval.tta)")
    pp.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    pp.set_defaults(func=_guard(_postprocess))

    c = subparsers.add_parser("compare", help="mean ± std tables and a grouped Dice chart over runs")
    c.add_argument("runs", nargs="+", metavar="RUN_DIR", help="folders holding an eval summary.json")
    c.add_argument("--seeds", action="store_true",
                   help="pool runs of the same method (seeds): mean ± std over runs")
    c.add_argument("--names", help="comma-separated row names, one per RUN_DIR")
    c.add_argument("--out", help="write compare.md/json/png here")
    c.set_defaults(func=_guard(_compare))


def _inference_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overlap", type=float, default=None, help="sliding-window overlap (default: config)")
    p.add_argument("--sw-batch-size", type=int, default=None, help="windows per forward pass (default: config)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="average the softmax over the 8 axis flips (default: the checkpoint "
                        "config's eval.tta)")
    p.add_argument("--no-postprocess", action="store_true",
                   help="do not apply the run's post-processing (RUN/postprocessing.json): raw labels")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
