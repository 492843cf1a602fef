"""Integrity check of a raw dataset: every problem at once, each naming the file and the reason.

Checked: unreadable or truncated files, images that are not 3D, NaN/inf intensities, image/label
shape or affine mismatch, label values outside the dataset's classes (or not integers), duplicate
case ids, a missing label where the layout promises one (plus the layout problems of
:func:`medseg_dpl.data.readers.scan_dataset`). Headers are compared before any voxel is
decoded; decoding (needed to find truncation, NaNs and label values) runs in parallel.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from medseg_dpl.data.io import DataError, load_nifti, read_dicom_series, squeeze_to_3d, voxel_spacing
from medseg_dpl.data.readers import Case, scan_dataset

AFFINE_ATOL = 1e-3  # mm; headers written by different tools differ by float rounding


class CheckError(DataError):
    """The integrity check found problems; ``problems`` lists them (``str(exc)`` joins them)."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        n = len(self.problems)
        super().__init__(f"{n} problem{'s' if n != 1 else ''} in the raw data:\n  "
                         + "\n  ".join(self.problems))


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def parallel_map(fn: Callable, items: Sequence, workers: int | None = None, desc: str = "",
                 progress: bool = True, executor=None) -> list:
    """``[fn(x) for x in items]`` over ``workers`` processes (in order), with a tqdm bar.

    ``workers=1`` runs in this process (no start-up cost; what small jobs and tests want).
    """
    from tqdm import tqdm

    items = list(items)
    workers = default_workers() if workers is None else max(1, int(workers))
    workers = min(workers, max(1, len(items)))
    bar = tqdm(total=len(items), desc=desc, unit="case", disable=not progress or not items,
               dynamic_ncols=True, leave=False)
    try:
        if workers == 1 and executor is None:
            out = []
            for x in items:
                out.append(fn(x))
                bar.update()
            return out
        own = executor is None
        if own:
            executor = make_executor(workers)
        try:
            futures = [executor.submit(fn, x) for x in items]
            for f in futures:  # completes in order; the bar still moves as cases finish
                f.add_done_callback(lambda _f: bar.update())
            return [f.result() for f in futures]
        finally:
            if own:
                executor.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()


def make_executor(workers: int):
    """A process pool that does not fork a possibly multi-threaded parent (torch, BLAS)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    try:
        ctx = mp.get_context("forkserver")
        # Imported once in the fork server, not in every worker (medseg_dpl.utils pulls torch).
        ctx.set_forkserver_preload(["medseg_dpl.utils", "medseg_dpl.data.preprocess",
                                    "medseg_dpl.data.check", "scipy.ndimage",
                                    "nibabel.orientations"])
    except ValueError:  # platforms without forkserver
        ctx = mp.get_context("spawn")
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx)


# ----------------------------------------------------------------------------- one case
def ras_spacing(affine: np.ndarray) -> list[float]:
    """Voxel sizes (mm) in RAS axis order, i.e. after reorientation to RAS."""
    from nibabel.orientations import io_orientation

    vs = voxel_spacing(affine)
    out = [0.0, 0.0, 0.0]
    for i, (ras_axis, _flip) in enumerate(io_orientation(affine)):
        out[int(ras_axis)] = float(vs[i])
    return out


def _read_for_check(path: Path, problems: list[str]):
    """(header shape, affine, voxels or None). Adds a problem and returns Nones when unreadable."""
    if path.is_dir():
        try:
            arr, aff = read_dicom_series(path)
        except DataError as exc:
            problems.append(str(exc))
            return None, None, None
        return arr.shape, aff, arr
    try:
        img = load_nifti(path)
    except DataError as exc:
        problems.append(str(exc))
        return None, None, None
    shape = squeeze_to_3d(img.shape)
    if shape is None:
        problems.append(f"{path}: not 3D (shape {tuple(img.shape)})")
        return None, None, None
    if 0 in shape:
        problems.append(f"{path}: empty image (shape {shape})")
        return None, None, None
    aff = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(aff)) or abs(np.linalg.det(aff[:3, :3])) < 1e-12:
        problems.append(f"{path}: invalid affine in the header (singular or not finite)")
    try:
        # Unscaled: the stored values, so no float64 copy of an int16 CT; scaling checked below.
        proxy = img.dataobj
        arr = proxy.get_unscaled() if hasattr(proxy, "get_unscaled") else np.asanyarray(proxy)
        arr = np.asarray(arr).reshape(shape)
    except Exception as exc:  # EOFError / zlib.error / ValueError on a truncated file
        problems.append(f"{path}: unreadable or truncated image data ({type(exc).__name__}: {exc})")
        return shape, aff, None
    slope, inter = img.header.get_slope_inter() if hasattr(img.header, "get_slope_inter") else (None, None)
    for name, v in (("scl_slope", slope), ("scl_inter", inter)):
        if v is not None and not np.isfinite(v):
            problems.append(f"{path}: header {name} is {v}")
    return shape, aff, arr


def _nonfinite(arr: np.ndarray) -> int:
    if not np.issubdtype(arr.dtype, np.floating):
        return 0
    return int(arr.size - np.count_nonzero(np.isfinite(arr)))


def check_case(case: Case, num_classes: int | None, declared_by: str | None = None) -> dict:
    """Problems of one case and what prep needs to know (spacing, max label value).

    ``declared_by`` names where the classes come from (e.g. an nnU-Net dataset.json), for the
    message about undeclared label values.
    """
    problems: list[str] = []
    info: dict = {"id": case.id, "spacing": None, "max_label": None}
    shape, aff, arr = _read_for_check(Path(case.image), problems)
    if arr is not None:
        if arr.dtype.kind not in "biuf":
            problems.append(f"{case.image}: unsupported voxel type {arr.dtype} (expected a scalar CT)")
        else:
            bad = _nonfinite(arr)
            if bad:
                problems.append(f"{case.image}: {bad} NaN/inf intensities")
    if aff is not None:
        info["spacing"] = ras_spacing(aff)
    del arr
    if case.label is not None:
        lshape, laff, lab = _read_for_check(Path(case.label), problems)
        if shape is not None and lshape is not None and tuple(lshape) != tuple(shape):
            problems.append(f"{case.label}: label shape {tuple(lshape)} does not match image "
                            f"shape {tuple(shape)} ({case.image})")
        elif aff is not None and laff is not None and not np.allclose(aff, laff, atol=AFFINE_ATOL):
            d = float(np.abs(aff - laff).max())
            problems.append(f"{case.label}: label affine differs from the image's ({case.image}) "
                            f"by up to {d:.4g} mm")
        if lab is not None:
            problems += _label_value_problems(case.label, lab, num_classes, info, declared_by)
    return {"problems": problems, "info": info}


def _label_value_problems(path, lab: np.ndarray, num_classes: int | None, info: dict,
                          declared_by: str | None = None) -> list[str]:
    out = []
    if lab.dtype.kind == "f":
        nonfinite = _nonfinite(lab)
        if nonfinite:
            return [f"{path}: {nonfinite} NaN/inf label values"]
        if not np.array_equal(lab, np.round(lab)):
            return [f"{path}: label values are not integers"]
    elif lab.dtype.kind not in "biu":
        return [f"{path}: unsupported label voxel type {lab.dtype}"]
    lo, hi = lab.min(), lab.max()
    info["max_label"] = int(hi)
    limit = num_classes if num_classes is not None else 256
    if lo < 0 or hi >= limit:
        bad = np.unique(lab[(lab < 0) | (lab >= limit)])
        shown = ", ".join(str(int(v)) for v in bad[:10]) + (" ..." if bad.size > 10 else "")
        if declared_by and num_classes:
            out.append(f"{path}: label values not declared in {declared_by} "
                       f"(0..{num_classes - 1}): {shown}")
            return out
        what = (f"the dataset's {num_classes} classes (0..{num_classes - 1})" if num_classes
                else "0..255")
        out.append(f"{path}: label values outside {what}: {shown}")
    return out


# ----------------------------------------------------------------------------- dataset
def run_check(dataset: str, raw, labels=None, ct_only: bool = False, num_classes: int | None = None,
              workers: int | None = None, progress: bool = True, executor=None
              ) -> tuple[list[Case], list[str], list[dict]]:
    """(cases, problems, per-case info). ``num_classes`` defaults to the dataset's class count."""
    from medseg_dpl.data.readers import dataset_classes

    cases, problems = scan_dataset(dataset, raw, labels, ct_only)
    declared_by = None
    if num_classes is None and cases:
        fixed = dataset_classes(dataset, raw)
        num_classes = None if fixed is None else len(fixed)
        if dataset == "nnunet":
            declared_by = f"the labels of {Path(raw) / 'dataset.json'}"
    for cid, n in Counter(c.id for c in cases).items():
        if n > 1:
            files = ", ".join(str(c.image) for c in cases if c.id == cid)
            problems.append(f"duplicate case id {cid!r}: {files}")
    from functools import partial

    results = parallel_map(partial(check_case, num_classes=num_classes, declared_by=declared_by),
                           cases, workers,
                           desc="check", progress=progress, executor=executor)
    for r in results:
        problems += r["problems"]
    return cases, problems, [r["info"] for r in results]


def check_dataset(dataset: str, raw, labels=None, ct_only: bool = False,
                  num_classes: int | None = None, workers: int | None = None,
                  progress: bool = True) -> list[str]:
    """Every problem of a raw dataset (empty list: fine). Writes nothing.

    Each problem is one line, ``"<file>: <reason>"``. ``dataset`` in
    {"synapse", "amos", "nifti", "dicom"}; ``labels`` (nifti/dicom) a label file or folder;
    ``ct_only`` drops AMOS MRI cases; ``num_classes`` overrides the dataset's class count.
    """
    return run_check(dataset, raw, labels, ct_only, num_classes, workers, progress)[1]
