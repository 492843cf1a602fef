#!/usr/bin/env python
"""Preprocessing cost of one 512 x 512 x 150 CT against the floor of loading and saving it.

    python scripts/bench_prep.py [--shape 512 512 150] [--repeats 3] [--workdir DIR]

The CT is synthesised: a phantom case (medseg_dpl.data.phantom) generated at 1/4 x 1/4 x 1/2 of
the size, upsampled by voxel repetition, plus noise (int16 HU, in-plane ~0.7-1 mm, LPS axes as
from a DICOM converter), saved as .nii.gz with nibabel, with its uint8 label. Then, each in a
fresh process (so peak memory is per step), interleaved ``--repeats`` times:

* floor: ``nibabel.load`` + read the voxels + ``nibabel.save`` to .nii.gz (image; image+label);
* prep:  ``preprocess_image`` (reorient, resample to the default spacing, body crop, clip,
  scale) + write the result (what ``medseg-dpl predict`` does to an input), and ``prep_case``
  (image + label + per-case meta: one case of ``medseg-dpl prep``).

Reported: median wall and CPU time (CPU time is robust to other users' load), ratio to the floor measured in the same run, peak RSS (VmHWM) of
the step's process and its increase over the RSS after imports, and the tracemalloc peak of the
step (numpy buffers; measured in one extra traced run so tracing does not skew the times).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def synthesize(out_dir: Path, shape=(512, 512, 150), seed: int = 0):
    """Write ct.nii.gz (int16 HU) and label.nii.gz (uint8) of ``shape``; returns spacing."""
    import nibabel as nib

    from medseg_dpl.data.phantom import phantom_case

    fx, fy, fz = 4, 4, 2
    if shape[0] % fx or shape[1] % fy or shape[2] % fz:
        raise SystemExit(f"shape must be divisible by (4, 4, 2), got {shape}")
    small = (shape[0] // fx, shape[1] // fy, shape[2] // fz)
    case = phantom_case(seed, 0, "synapse", shape=small)
    rep = lambda a: np.repeat(np.repeat(np.repeat(a, fx, 0), fy, 1), fz, 2)  # noqa: E731
    rng = np.random.default_rng(seed)
    ct = rep(case.image).astype(np.float32)
    ct += rng.normal(0, 12, ct.shape).astype(np.float32)   # texture at full resolution
    ct = np.clip(np.round(ct), -1024, 3071).astype(np.int16)
    label = rep(case.label).astype(np.uint8)
    # voxel (i, j, k) of the fine grid sits at small-grid index ((i + 0.5) / f - 0.5)
    f = np.array([fx, fy, fz], dtype=np.float64)
    aff = case.affine.copy()
    aff[:3, :3] = case.affine[:3, :3] / f
    aff[:3, 3] = case.affine[:3, 3] + case.affine[:3, :3] @ (0.5 / f - 0.5)
    for arr, name in ((ct, "ct.nii.gz"), (label, "label.nii.gz")):
        img = nib.Nifti1Image(arr, aff)
        img.set_sform(aff, code=1)
        img.set_qform(aff, code=1)
        nib.save(img, str(out_dir / name))
    return aff


def _proc_status_mb(field: str) -> float:
    """VmRSS / VmHWM of this process in MB (per process: unlike ru_maxrss, not inherited from
    the parent across fork+exec). Falls back to ru_maxrss off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _step(kind: str, work: str, spacing, trace: bool) -> dict:
    """Run one step in this (fresh) process; returns time and memory."""
    import tracemalloc

    import nibabel as nib
    import nibabel.orientations  # noqa: F401  (imports are per process, not per step: load
    import scipy.ndimage  # noqa: F401          them before the clock starts, as a worker pool
    import medseg_dpl.utils  # noqa: F401       does once; medseg_dpl.utils pulls in torch)

    from medseg_dpl.data.io import save_nifti
    from medseg_dpl.data.preprocess import DEFAULT_CLIP, prep_case, preprocess_image
    from medseg_dpl.data.readers import Case

    work = Path(work)
    base_rss = _proc_status_mb("VmRSS")
    if trace:
        tracemalloc.start()
    t0, c0 = time.perf_counter(), time.process_time()
    if kind.startswith("floor"):
        names = ["ct"] + (["label"] if kind == "floor_label" else [])
        for n in names:
            img = nib.load(str(work / f"{n}.nii.gz"))
            arr = np.asanyarray(img.dataobj)
            nib.save(nib.Nifti1Image(arr, img.affine, img.header), str(work / f"out_{n}.nii.gz"))
            del arr, img
    elif kind == "prep_image":
        image, affine, _ = preprocess_image(work / "ct.nii.gz", spacing, DEFAULT_CLIP)
        save_nifti(image, affine, work / "out_prep.nii.gz")
    elif kind == "prep_case":
        out = work / "prep"
        for p in (out / "meta" / "bench.json",):
            if p.exists():
                p.unlink()  # not "already done"
        prep_case(Case("bench", work / "ct.nii.gz", work / "label.nii.gz"), out, spacing,
                  DEFAULT_CLIP, num_classes=14)
    else:
        raise ValueError(kind)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    traced = tracemalloc.get_traced_memory()[1] / 2**20 if trace else float("nan")
    if trace:
        tracemalloc.stop()
    return {"time": dt, "cpu": cpu, "rss": _proc_status_mb("VmHWM"), "base_rss": base_rss, "traced": traced}


def run_in_fresh_process(kind, work, spacing, trace=False) -> dict:
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_step, (kind, str(work), spacing, trace))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(512, 512, 150))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir)")
    args = ap.parse_args(argv)

    from medseg_dpl.data.check import ras_spacing
    from medseg_dpl.data.preprocess import default_spacing

    tmp = tempfile.TemporaryDirectory(prefix="bench_prep_") if args.workdir is None else None
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    aff = synthesize(work, tuple(args.shape))
    spacing = default_spacing("synapse", [ras_spacing(aff)])
    print(f"synthesised CT {tuple(args.shape)} int16, spacing "
          f"{[round(float(s), 3) for s in np.linalg.norm(aff[:3, :3], axis=0)]} mm "
          f"({(work / 'ct.nii.gz').stat().st_size / 2**20:.1f} MB .nii.gz) in "
          f"{time.perf_counter() - t0:.1f} s; target spacing {list(spacing)} mm", flush=True)

    kinds = ["floor", "prep_image", "floor_label", "prep_case"]
    runs = {k: [] for k in kinds}
    for r in range(args.repeats):
        for k in kinds:  # interleaved, so load from other users hits both sides alike
            runs[k].append(run_in_fresh_process(k, work, spacing))
        print(f"  repeat {r + 1}/{args.repeats}: " + ", ".join(
            f"{k} {runs[k][-1]['time']:.2f} s ({runs[k][-1]['cpu']:.2f} s CPU)" for k in kinds),
            flush=True)
    traced = {k: run_in_fresh_process(k, work, spacing, trace=True)["traced"] for k in kinds}

    import nibabel as nib
    out_shape = nib.load(str(work / "out_prep.nii.gz")).shape
    med = {k: statistics.median(x["time"] for x in runs[k]) for k in kinds}
    cpu = {k: statistics.median(x["cpu"] for x in runs[k]) for k in kinds}
    labels = {
        "floor": "floor: nibabel load + save (image)",
        "prep_image": "prep: preprocess_image + save",
        "floor_label": "floor: nibabel load + save (image + label)",
        "prep_case": "prep: one case (image + label + meta)",
    }
    ref = {"floor": "floor", "prep_image": "floor", "floor_label": "floor_label",
           "prep_case": "floor_label"}
    w = max(len(v) for v in labels.values())
    print()
    print(f"CT {tuple(args.shape)} -> {tuple(out_shape)} at {list(spacing)} mm; "
          f"median of {args.repeats} runs; {os.cpu_count()} CPU core(s), 1 process")
    print(f"{'step':<{w}}  {'wall s':>6}  {'x floor':>7}  {'CPU s':>6}  {'x floor':>7}  "
          f"{'peak RSS MB':>11}  {'+RSS MB':>7}  {'traced MB':>9}")
    for k in kinds:
        rss = max(x["rss"] for x in runs[k])
        inc = max(x["rss"] - x["base_rss"] for x in runs[k])
        print(f"{labels[k]:<{w}}  {med[k]:6.2f}  {med[k] / med[ref[k]]:7.2f}  {cpu[k]:6.2f}  "
              f"{cpu[k] / cpu[ref[k]]:7.2f}  {rss:11.0f}  {inc:7.0f}  {traced[k]:9.0f}")
    ratio = med["prep_image"] / med["floor"]
    print(f"\nprep / floor = {ratio:.2f} wall, {cpu['prep_image'] / cpu['floor']:.2f} CPU (goal <= 3); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} core(s)")
    if tmp is not None:
        tmp.cleanup()
    return 0 if ratio <= 3.0 else 1


if __name__ == "__main__":
    sys.exit(main())
