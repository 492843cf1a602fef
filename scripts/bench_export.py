#!/usr/bin/env python
"""Export benchmark: ``export`` time, and the bundle's inference time against ``predict`` on one case.

    python scripts/bench_export.py [--checkpoint RUN/checkpoints/best.pt] [--case CT.nii.gz ...]
                                   [--repeat 3] [--cli] [--json OUT.json]

Without ``--checkpoint``, a phantom checkpoint is trained first (8 cases of 48 x 48 x 40, 20
supervised steps, as in tests/deploy/test_export.py). Without ``--case``, it runs on one raw phantom
case and on ``../shared/data/real_ct/ct.nii.gz`` when that file exists. Per case, ``predict``
(in process) and the bundle (``monai.bundle.run`` in process, the function behind
``python -m monai.bundle run``) alternate ``--repeat`` times after one untimed warm-up of each.
The medians and their ratio come from the same run, and so does the voxel agreement of the
two label maps. ``--cli`` also times both command lines (each with its interpreter start-up).
Targets (issue 20): export <= 30 s; bundle <= 1.5 x predict.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
REAL_CT = REPO.parent / "shared" / "data" / "real_ct" / "ct.nii.gz"


def train_phantom_checkpoint(work: Path) -> tuple[Path, Path]:
    """(best.pt of a 20-step supervised phantom run, one raw phantom case)."""
    sys.path.insert(0, str(REPO / "tests"))
    from train_helpers import tiny_cfg

    from medseg_dpl.data.phantom import make_phantom
    from medseg_dpl.data.preprocess import preprocess_dataset
    from medseg_dpl.data.splits import make_splits
    from medseg_dpl.engine.trainer import train

    make_phantom(work / "raw", layout="synapse", cases=8, seed=0, shape=(48, 48, 40))
    preprocess_dataset("synapse", work / "raw", work / "prep", workers=1, progress=False, stream=io.StringIO())
    make_splits(work / "prep", labeled=0.25, seed=0)
    train(tiny_cfg(work / "prep", "supervised", "data.labeled_split=labeled_25p",
                   "data.unlabeled_split=unlabeled_25p", "train.steps=20", "train.val_every=20",
                   "train.checkpoint_every=20", "optim.name=adamw", "optim.lr=0.005",
                   "train.ema_momentum=0.0"), work / "run")
    return work / "run" / "checkpoints" / "best.pt", sorted((work / "raw/RawData/Training/img").glob("*.nii.gz"))[0]


def run_bundle(bundle: Path, inp: Path, out: Path) -> None:
    from monai.bundle import run

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(config_file=str(bundle / "configs/inference.json"), bundle_root=str(bundle),
            dataset_dir=str(inp), output_dir=str(out))


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def agreement(a: Path, b: Path) -> tuple[float, int]:
    """(fraction of equal voxels, number of differing voxels) of two label maps."""
    la, lb = np.asarray(nib.load(str(a)).dataobj), np.asarray(nib.load(str(b)).dataobj)
    return float((la == lb).mean()), int((la != lb).sum())


def cli_times(ckpt: Path, bundle: Path, inp: Path, work: Path) -> dict:
    """Wall time of ``medseg-dpl predict`` and ``python -m monai.bundle run`` (interpreter start-up included)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    pred = [sys.executable, "-m", "medseg_dpl.cli", "predict", "--checkpoint", str(ckpt), "--input",
            str(inp), "--out", str(work / "cli_pred"), "--device", "cpu"]
    bund = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs/inference.json"),
            "--bundle_root", str(bundle), "--dataset_dir", str(inp), "--output_dir", str(work / "cli_out")]
    out = {}
    for name, cmd in (("predict_cli_s", pred), ("bundle_cli_s", bund)):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env=env)
        out[name] = time.perf_counter() - t
    out["cli_ratio"] = out["bundle_cli_s"] / out["predict_cli_s"]
    return out


def bench_case(ckpt: Path, bundle: Path, case: Path, work: Path, repeat: int, cli: bool) -> dict:
    """Warm-up, then ``repeat`` alternating timings of predict and the bundle on ``case``."""
    from medseg_dpl.evaluation.predict import predict

    inp = work / "in"
    inp.mkdir(parents=True)
    shutil.copy(case, inp / case.name)
    do_pred = lambda: predict(ckpt, inp, work / "pred", device="cpu", progress=False)  # noqa: E731
    do_bund = lambda: run_bundle(bundle, inp, work / "out")  # noqa: E731
    do_pred(), do_bund()  # warm-up: lazy imports, allocator
    tp, tb = [], []
    for _ in range(repeat):
        tp.append(timed(do_pred))
        tb.append(timed(do_bund))
    agree, ndiff = agreement(work / "pred" / case.name, work / "out" / case.name)
    shape = nib.load(str(case)).shape
    res = {"case": str(case), "shape": list(shape), "predict_s": statistics.median(tp),
           "bundle_s": statistics.median(tb), "predict_runs_s": tp, "bundle_runs_s": tb,
           "agreement": agree, "voxels_differing": ndiff}
    res["ratio"] = res["bundle_s"] / res["predict_s"]
    if cli:
        res.update(cli_times(ckpt, bundle, inp, work))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="RUN/checkpoints/best.pt (default: train a phantom one)")
    ap.add_argument("--case", nargs="*", help="NIfTI volumes (default: a phantom case and the real CT)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cli", action="store_true", help="also time both command lines")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)  # monai.bundle.run logs its arguments and a missing logging.conf
    from medseg_dpl.deploy.export import export_bundle

    with tempfile.TemporaryDirectory(prefix="bench_export.") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        if args.checkpoint:
            ckpt, phantom_case = Path(args.checkpoint), None
        else:
            ckpt, phantom_case = train_phantom_checkpoint(work / "phantom")
            print(f"trained a phantom checkpoint in {time.perf_counter() - t0:.1f} s: {ckpt}")
        cases = [Path(c) for c in args.case] if args.case else \
            [c for c in (phantom_case, REAL_CT if REAL_CT.exists() else None) if c is not None]
        export_s = timed(lambda: export_bundle(ckpt, work / "bundle"))
        results = {"checkpoint": str(ckpt), "export_s": export_s, "cases": []}
        print(f"export: {export_s:.2f} s (target <= 30 s)")
        for i, case in enumerate(cases):
            r = bench_case(ckpt, work / "bundle", case, work / f"case{i}", args.repeat, args.cli)
            results["cases"].append(r)
            line = (f"{case.name} {tuple(r['shape'])}: predict {r['predict_s']:.2f} s, bundle "
                    f"{r['bundle_s']:.2f} s, ratio {r['ratio']:.2f} (target <= 1.5); agreement "
                    f"{100 * r['agreement']:.4f} % ({r['voxels_differing']} voxels differ)")
            if args.cli:
                line += (f"; CLI: predict {r['predict_cli_s']:.1f} s, bundle {r['bundle_cli_s']:.1f} s, "
                         f"ratio {r['cli_ratio']:.2f}")
            print(line, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
