"""Preprocessing of raw CT and MR into PREP_DIR (see ``contracts.md``): one grid, one intensity scale.

Per case, in this order (:func:`preprocess_arrays`, shared by prep and predict):

1. **Reorient** to the closest RAS+ axis order (flips/transposes only, no interpolation;
   ``nibabel.orientations``). An oblique scan keeps its residual rotation in the affine.
2. **Resample** to ``spacing`` (mm, RAS axis order): separable linear interpolation for the
   image, nearest neighbour for the label. New size ``n' = round(n · s / s')``; voxel centres
   follow ``src = (dst + 0.5) · s'/s - 0.5`` (the field of view stays centred, as
   ``torch``'s ``align_corners=False``), edges replicate. An axis already at the target
   spacing is copied untouched, so a 3 mm scan prepped at 3 mm is bit-exact.
3. **Crop to the body**: CT: voxels > ``BODY_HU`` (-500 HU: soft tissue and bone, not air), the
   largest 6-connected component, its bounding box + ``BODY_MARGIN_MM`` per side (found on
   every 2nd voxel for volumes over 4 M voxels); no body found → no crop. MR: the box of
   :func:`mr_body_mask` + the same margin.
4. **Intensity**, by modality (nnU-Net's schemes): CT: clip HU to ``clip`` and scale linearly
   to [0, 1]. MR (any non-CT channel): per case, clip to the ``MR_PERCENTILES`` (0.5, 99.5) of
   the body-mask voxels, then z-score with the body voxels' mean and std (float32).

The affine written is the true world affine of the final grid; ``original`` (shape, affine,
spacing of the source), ``resampled_shape`` and ``crop_box`` let :func:`restore_to_original`
map a prediction back onto the source voxels exactly.
"""
from __future__ import annotations

import json
import os
import sys
import time
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np

from medseg_dpl.data.io import DataError, read_image, save_nifti, voxel_spacing
from medseg_dpl.data.readers import MODALITIES

DEFAULT_CLIP = (-175.0, 250.0)
# Default target spacing (mm, RAS order), one place: per axis the *coarser* of
#   * MIN_SPACING[dataset]: real Synapse/AMOS scans (0.6-1 mm in-plane, 1.25-5 mm slices) are
#     commonly resampled to ~1.5 x 1.5 x 2 mm for 3D U-Nets: fine enough for the adrenal glands,
#     coarse enough that a 96^3 patch spans a good part of the abdomen; and
#   * the dataset's median spacing (nnU-Net's rule): never invent resolution the data lack.
# Real Synapse (median ~0.76 x 0.76 x 3 mm) -> 1.5 x 1.5 x 3; AMOS (~0.7 x 0.7 x 5) -> 1.5 x 1.5 x 5;
# the phantom (5-6 x 5-6 x ~7 mm at its default 80 x 80 x 64) keeps its median spacing, so it
# stays small. --spacing X Y Z overrides.
MIN_SPACING = {
    "synapse": (1.5, 1.5, 2.0),
    "amos": (1.5, 1.5, 2.0),
    "nifti": (1.5, 1.5, 2.0),
    "dicom": (1.5, 1.5, 2.0),
}


def default_spacing(dataset: str, case_spacings: Sequence[Sequence[float]]) -> tuple[float, ...]:
    """Per axis max(MIN_SPACING[dataset], median of the cases' RAS spacings), to 0.1 µm."""
    floor = np.asarray(MIN_SPACING.get(dataset, MIN_SPACING["nifti"]), dtype=np.float64)
    sp = np.asarray([s for s in case_spacings if s is not None], dtype=np.float64).reshape(-1, 3)
    med = np.median(sp, axis=0) if len(sp) else floor
    return tuple(float(round(v, 4)) for v in np.maximum(floor, med))


BODY_HU = -500.0
MR_PERCENTILES = (0.5, 99.5)
MR_BODY_MASK = "Otsu threshold of log(1 + I - min), largest 6-connected component, holes filled per axial slice"
BODY_MARGIN_MM = 10.0
BODY_STRIDE_VOXELS = 4_000_000
PREP_VERSION = 2  # bump when the math changes: cases done by an older version are redone


# ----------------------------------------------------------------------------- math
def reorient_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip/transpose ``array`` (X, Y, Z) to the closest RAS+ order; returns (view, new affine)."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

    ornt = io_orientation(affine)
    tf = ornt_transform(ornt, axcodes2ornt("RAS"))
    if np.array_equal(tf, [[0, 1], [1, 1], [2, 1]]):
        return array, np.asarray(affine, dtype=np.float64)
    out = apply_orientation(array, tf)
    return out, np.asarray(affine, dtype=np.float64) @ inv_ornt_aff(tf, array.shape)


def _target_shape(shape: Sequence[int], spacing_in: np.ndarray, spacing_out: np.ndarray):
    """(new shape, ratio s'/s per axis); ratio exactly 1 where the axis needs no resampling."""
    new_shape, ratio = [], []
    for n, s, t in zip(shape, spacing_in, spacing_out):
        if abs(s - t) <= 1e-6 * t:
            new_shape.append(int(n))
            ratio.append(1.0)
        else:
            new_shape.append(max(1, int(np.floor(n * s / t + 0.5))))
            ratio.append(float(t / s))
    return tuple(new_shape), np.asarray(ratio)


def _src_coords(n_out: int, n_in: int, r: float) -> np.ndarray:
    return np.clip((np.arange(n_out, dtype=np.float64) + 0.5) * r - 0.5, 0.0, n_in - 1.0)


def _linear_axis(a: np.ndarray, axis: int, n_out: int, r: float) -> np.ndarray:
    """Linear interpolation along one axis; float32 out (ints are cast after the gather)."""
    n_in = a.shape[axis]
    src = _src_coords(n_out, n_in, r)
    i0 = np.floor(src).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w = (src - i0).astype(np.float32)
    shape = [1] * a.ndim
    shape[axis] = n_out
    w = w.reshape(shape)
    lo = np.take(a, i0, axis=axis).astype(np.float32, copy=False)
    hi = np.take(a, i1, axis=axis).astype(np.float32, copy=False)
    hi -= lo          # in place: no temporaries of the output size beyond lo and hi
    hi *= w
    hi += lo
    return hi


def _nearest_index(n_out: int, n_in: int, r: float) -> np.ndarray:
    return np.minimum(np.floor((np.arange(n_out, dtype=np.float64) + 0.5) * r).astype(np.intp), n_in - 1)


def resample(array: np.ndarray, affine: np.ndarray, spacing: Sequence[float], order: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """Resample (X, Y, Z) ``array`` to voxel sizes ``spacing`` (mm, array axis order).

    ``order`` 1: linear, float32 out; 0: nearest, dtype kept. Returns (array, affine).
    Works in the array's memory order (NIfTI data are Fortran-ordered): gathering whole
    contiguous slabs along the slow axes is ~10x faster than strided gathers.
    """
    spacing_in = voxel_spacing(affine)
    new_shape, ratio = _target_shape(array.shape, spacing_in, np.asarray(spacing, dtype=np.float64))
    perm = [int(k) for k in np.argsort([-abs(st) for st in array.strides], kind="stable")]
    inv = [int(k) for k in np.argsort(perm)]
    work = array.transpose(perm)          # C-like view: slowest-varying axis first
    w_shape = [new_shape[k] for k in perm]
    w_ratio = [float(ratio[k]) for k in perm]
    if order == 1:
        # Shrinking axes first keeps the intermediate arrays small.
        for ax in sorted(range(3), key=lambda k: w_shape[k] / work.shape[k]):
            if w_ratio[ax] != 1.0:
                work = _linear_axis(work, ax, w_shape[ax], w_ratio[ax])
        work = work.astype(np.float32, copy=False)
    elif any(r != 1.0 for r in w_ratio):
        for ax in range(3):
            if w_ratio[ax] != 1.0:
                work = np.take(work, _nearest_index(w_shape[ax], work.shape[ax], w_ratio[ax]), axis=ax)
    step = np.eye(4)
    step[:3, :3] = np.diag(ratio)
    step[:3, 3] = 0.5 * ratio - 0.5
    return work.transpose(inv), np.asarray(affine, dtype=np.float64) @ step


def body_box(hu: np.ndarray, spacing: Sequence[float], threshold: float = BODY_HU,
             margin_mm: float = BODY_MARGIN_MM) -> list[list[int]]:
    """[[x0, x1], [y0, y1], [z0, z1]] (half-open) around the largest component above ``threshold``.

    Volumes over ``BODY_STRIDE_VOXELS`` are searched on every 2nd voxel per axis (8x less
    work; the box is widened by the skipped voxel, and the margin dwarfs it).
    """
    step = 2 if hu.size > BODY_STRIDE_VOXELS else 1
    return mask_box(hu[::step, ::step, ::step] > threshold, spacing, hu.shape, step, margin_mm)


def _largest_component(mask: np.ndarray) -> tuple[np.ndarray, int] | None:
    """(component labels of ``mask`` (6-connected), the largest one's label); None if empty."""
    from scipy import ndimage

    if not mask.any():
        return None
    lab, _ = ndimage.label(mask)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab, int(np.argmax(sizes))


def mask_box(mask: np.ndarray, spacing: Sequence[float], shape: Sequence[int], step: int = 1,
             margin_mm: float = BODY_MARGIN_MM) -> list[list[int]]:
    """Half-open box (in a volume of ``shape``) around the largest component of ``mask``, which
    is that volume sampled on every ``step``-th voxel; + ``margin_mm`` per side. Empty: all."""
    from scipy import ndimage

    found = _largest_component(mask)
    if found is None:
        return [[0, int(n)] for n in shape]
    lab, k = found
    sl = ndimage.find_objects(lab, max_label=k)[k - 1]
    box = []
    for ax, s in enumerate(sl):
        m = int(np.ceil(margin_mm / float(spacing[ax])))
        lo, hi = s.start * step - (step - 1), s.stop * step
        box.append([max(0, lo - m), min(int(shape[ax]), hi + m)])
    return box


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of 1-D ``values`` (maximal between-class variance over a histogram)."""
    hist, edges = np.histogram(values, bins=bins)
    centres = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist, dtype=np.float64)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centres)
    m0 = s0 / np.maximum(w0, 1)
    m1 = (s0[-1] - s0) / np.maximum(w1, 1)
    return float(centres[int(np.argmax(w0 * w1 * (m0 - m1) ** 2))])


def mr_body_mask(image: np.ndarray) -> np.ndarray:
    """Body voxels of an MR volume ``(X, Y, Z)`` (RAS, Z axial) -> bool ``(X, Y, Z)``.

    MR air is not zero (CHAOS: noise of 5-60 units in two of 15 scans), so "nonzero" keeps
    the background; a fixed threshold depends on the scanner's arbitrary units. On a log scale
    air and tissue form two modes whatever the units, so Otsu on ``log(1 + I - min)`` splits
    them without tuning (CHAOS: 16-63 units, every organ voxel inside; Otsu or the mean on the
    linear scale cut into darker organs). The largest 6-connected component drops noise specks;
    holes (fat-suppressed fat, bowel gas) are filled per axial slice, because in 3D they can
    touch the top or bottom slice and would not count as holes. Constant image: all True.
    """
    from scipy import ndimage

    img = np.asarray(image, dtype=np.float32)
    lo = float(img.min())
    if float(img.max()) <= lo:
        return np.ones(img.shape, dtype=bool)
    logv = np.log1p(img - lo)
    found = _largest_component(logv > _otsu(logv[::2, ::2, :].ravel()))  # 2nd voxels: same histogram
    if found is None:
        return np.ones(img.shape, dtype=bool)
    mask = found[0] == found[1]
    for z in range(mask.shape[2]):
        mask[:, :, z] = ndimage.binary_fill_holes(mask[:, :, z])
    return mask


def normalize_mr(image: np.ndarray, mask: np.ndarray,
                 percentiles: Sequence[float] = MR_PERCENTILES) -> dict:
    """In place: clip float32 ``image`` (X, Y, Z) to the ``percentiles`` of its ``mask`` voxels
    (bool, same shape; empty: all voxels), then z-score with their mean and std after clipping.

    Returns ``{"clip": [lo, hi], "mean": m, "std": s}`` in source units (output = (clip(I) - m) / s;
    s = 1 when the body is constant).
    """
    vals = image[mask] if mask.any() else image.ravel()
    lo, hi = (float(v) for v in np.percentile(vals, percentiles))
    vals = np.clip(vals, lo, hi)
    mean, std = float(vals.mean(dtype=np.float64)), float(vals.std(dtype=np.float64))
    std = std if std > 1e-6 * max(1.0, abs(hi - lo)) else 1.0
    np.clip(image, lo, hi, out=image)
    image -= np.float32(mean)
    image *= np.float32(1.0 / std)
    return {"clip": [lo, hi], "mean": mean, "std": std}


def preprocess_arrays(image: np.ndarray, affine: np.ndarray, spacing: Sequence[float],
                      clip: Sequence[float] = DEFAULT_CLIP, label: np.ndarray | None = None,
                      modality: str = "ct", percentiles: Sequence[float] = MR_PERCENTILES):
    """The prep math on arrays: image (X, Y, Z) (CT in HU, or MR) + its affine -> preprocessed grid.

    Returns ``(image float32 (X', Y', Z'), label uint8 or None, affine, meta)``: CT in [0, 1]
    (``clip`` window), MR z-scored (``percentiles``; see :func:`normalize_mr`). ``meta`` holds
    ``original`` {shape, affine, spacing}, ``resampled_shape``, ``crop_box``, ``shape``,
    ``spacing`` (the written grid's), ``label_outside_crop`` (labelled voxels lost),
    ``modality`` and, for MR, ``normalization`` (the case's clip, mean, std).
    """
    lo, hi = float(clip[0]), float(clip[1])
    if not hi > lo:
        raise ValueError(f"clip range must be increasing, got {clip}")
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
    affine = np.asarray(affine, dtype=np.float64)
    meta = {"original": {"shape": [int(s) for s in image.shape], "affine": affine.tolist(),
                         "spacing": [float(s) for s in voxel_spacing(affine)]}}
    img, aff_ras = reorient_ras(image, affine)
    img, aff_res = resample(img, aff_ras, spacing, order=1)
    resampled_shape = [int(n) for n in img.shape]
    body = None
    if modality == "ct":
        box = body_box(img, spacing)
    else:
        body = mr_body_mask(img)
        box = mask_box(body, spacing, img.shape)
    crop = tuple(slice(a, b) for a, b in box)
    # A copy of the crop: the input may be the caller's float32 array (no axis resampled) or a
    # read-only memmap, and the in-place ops below must touch neither.
    img = np.array(img[crop], dtype=np.float32, order="K")
    meta["modality"] = modality
    if modality == "ct":
        np.clip(img, lo, hi, out=img)
        img -= lo
        img *= np.float32(1.0 / (hi - lo))
    else:
        meta["normalization"] = normalize_mr(img, body[crop], percentiles)
        del body
    aff = aff_res.copy()
    aff[:3, 3] = aff_res[:3, :3] @ np.array([b[0] for b in box], dtype=np.float64) + aff_res[:3, 3]
    lab_out = None
    meta["label_outside_crop"] = 0
    if label is not None:
        if label.shape != image.shape:
            raise DataError(f"label shape {label.shape} differs from image shape {image.shape}")
        lab = label
        if lab.dtype != np.uint8:
            lab = lab.astype(np.uint8)  # values checked to be 0..255 integers beforehand
        lab, _ = reorient_ras(lab, affine)
        lab, _ = resample(lab, aff_ras, spacing, order=0)
        total = int(np.count_nonzero(lab))
        lab_out = np.array(lab[crop], order="K")
        meta["label_outside_crop"] = total - int(np.count_nonzero(lab_out))
    meta.update({"resampled_shape": resampled_shape, "crop_box": box,
                 "shape": [int(n) for n in img.shape], "affine": aff.tolist(),
                 "spacing": [float(v) for v in voxel_spacing(aff)]})
    return img, lab_out, aff, meta


def intensity_kwargs(intensity: dict | None, modality: str | None = None) -> dict:
    """:func:`preprocess_image`'s intensity arguments for a new image, from the ``intensity``
    record of a PREP_DIR's dataset.json (or a checkpoint's copy of it).

    A record without ``modality`` (before MR support) is CT. A model trained on CT and MR
    (AMOS, "mixed") needs ``modality`` for each new image; a single-modality model refuses the
    other one (its intensities would be on another scale). Raises ValueError.
    """
    rec = dict(intensity or {})
    trained = rec.get("modality", "ct")
    if modality is not None and modality not in MODALITIES:
        raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
    if trained == "mixed":
        if modality is None:
            raise ValueError("the model was trained on CT and MR images; give the input's "
                             "modality (--modality ct|mr)")
    elif modality is not None and modality != trained:
        raise ValueError(f"the model was trained on {trained.upper()} images only; it cannot "
                         f"segment a {modality.upper()} input")
    return {"modality": modality or trained, "clip": tuple(rec.get("clip", DEFAULT_CLIP)),
            "percentiles": tuple(rec.get("percentiles", MR_PERCENTILES))}


def preprocess_image(path_or_dicom_dir, spacing: Sequence[float], clip: Sequence[float] = DEFAULT_CLIP,
                     modality: str = "ct", percentiles: Sequence[float] = MR_PERCENTILES):
    """Exactly what prep does to an image: NIfTI file or DICOM series folder -> model input.

    Returns ``(image float32 ndarray (X, Y, Z) (CT in [0, 1], MR z-scored), affine 4x4 (RAS
    world of that grid), meta)``; ``meta`` as in :func:`preprocess_arrays` (feed it to
    :func:`restore_to_original`).
    """
    image, affine = read_image(path_or_dicom_dir)
    img, _, aff, meta = preprocess_arrays(image, affine, spacing, clip, modality=modality,
                                          percentiles=percentiles)
    return img, aff, meta


def restore_to_original(array: np.ndarray, meta: dict, fill=0) -> np.ndarray:
    """Map a label map on the preprocessed grid back onto the source image's voxels (nearest).

    ``array`` (X', Y', Z') as written by prep; ``meta`` a case's entry of ``dataset.json`` (or
    the meta of :func:`preprocess_image`). Source voxels outside the crop box get ``fill``.
    Returns an array of ``meta["original"]["shape"]`` in the source file's axis order.
    """
    array = np.asarray(array)
    if list(array.shape) != list(meta["shape"]):
        raise ValueError(f"array shape {array.shape} is not the preprocessed shape {meta['shape']}")
    box = meta["crop_box"]
    full = np.full([int(n) + 2 for n in meta["resampled_shape"]], fill, dtype=array.dtype)
    # One voxel of `fill` on every side: out-of-grid source voxels index into it.
    full[tuple(slice(a + 1, b + 1) for a, b in box)] = array
    aff_crop = np.asarray(meta["affine"], dtype=np.float64)
    aff_res = aff_crop.copy()
    aff_res[:3, 3] = aff_crop[:3, 3] - aff_crop[:3, :3] @ np.array([b[0] for b in box], dtype=np.float64)
    orig_aff = np.asarray(meta["original"]["affine"], dtype=np.float64)
    orig_shape = [int(n) for n in meta["original"]["shape"]]
    m = np.linalg.solve(aff_res, orig_aff)  # source voxel index -> resampled voxel index
    lin = m[:3, :3]
    src_axis_of = np.argmax(np.abs(lin), axis=1)
    separable = _is_signed_permutation(lin)  # true unless the source is oblique
    n_res = np.asarray(meta["resampled_shape"])
    if separable:
        idx = []
        for b in range(3):
            a = int(src_axis_of[b])
            u = lin[b, a] * np.arange(orig_shape[a]) + m[b, 3]
            i = np.floor(u + 0.5).astype(np.intp)
            i = np.where((i < 0) | (i >= n_res[b]), -1, i) + 1   # -1 -> the fill border
            idx.append(i)
        out = full[np.ix_(*idx)]                 # axes in resampled order, sizes of source axes
        order = [int(np.where(src_axis_of == a)[0][0]) for a in range(3)]
        return np.ascontiguousarray(out.transpose(order))
    from scipy import ndimage

    grid = np.indices(orig_shape, dtype=np.float64).reshape(3, -1)
    coords = lin @ grid + m[:3, 3:4] + 1.0
    out = ndimage.map_coordinates(full, coords, order=0, mode="constant", cval=fill)
    return out.reshape(orig_shape)


def _is_signed_permutation(lin: np.ndarray) -> bool:
    mask = np.abs(lin) > 1e-6 * np.abs(lin).max()
    return bool((mask.sum(axis=0) == 1).all() and (mask.sum(axis=1) == 1).all())


# ----------------------------------------------------------------------------- dataset
def _stat(path: Path | None):
    if path is None:
        return None
    st = os.stat(path)
    return [int(st.st_size), int(st.st_mtime_ns)]


def _settings(case, spacing, clip, modality: str) -> dict:
    # only what the case's math uses: changing --clip does not redo MR cases
    scale = ({"clip": [float(c) for c in clip]} if modality == "ct"
             else {"percentiles": [float(p) for p in MR_PERCENTILES]})
    return {"version": PREP_VERSION, "spacing": [float(s) for s in spacing],
            "modality": modality, **scale,
            "source_image": os.path.abspath(case.image), "source_image_stat": _stat(Path(case.image)),
            "source_label": None if case.label is None else os.path.abspath(case.label),
            "source_label_stat": _stat(None if case.label is None else Path(case.label))}


def _case_done(out: Path, case, settings: dict) -> dict | None:
    meta_path = out / "meta" / f"{case.id}.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if meta.get("settings") != settings:
        return None
    if not (out / meta["image"]).exists() or (meta["label"] and not (out / meta["label"]).exists()):
        return None
    return meta


def case_modality(case, modality: str | None = None) -> str:
    """``modality`` if given (``--modality``), else the layout's (AMOS id, nnU-Net channel), else ct."""
    return modality or getattr(case, "modality", None) or "ct"


def prep_case(case, out: str | os.PathLike, spacing, clip, num_classes: int,
              modality: str | None = None) -> dict:
    """Preprocess one case into ``out`` (image, label, meta/<id>.json; each written atomically).

    ``modality`` overrides the case's own (see :func:`case_modality`).
    """
    from medseg_dpl.utils import atomic_path

    out = Path(out)
    modality = case_modality(case, modality)
    settings = _settings(case, spacing, clip, modality)
    done = _case_done(out, case, settings)
    if done is not None:
        done["skipped"] = True
        return done
    image, affine = read_image(case.image)
    label = None
    if case.label is not None:
        label, _ = read_image(case.label)
    img, lab, aff, meta = preprocess_arrays(image, affine, spacing, clip, label, modality=modality)
    del image, label
    rel_img = f"imagesTr/{case.id}.nii.gz"
    rel_lab = f"labelsTr/{case.id}.nii.gz" if lab is not None else None
    save_nifti(img, aff, out / rel_img)
    counts = None
    if lab is not None:
        save_nifti(lab, aff, out / rel_lab)
        counts = np.bincount(lab.ravel(), minlength=num_classes)[:num_classes].astype(int).tolist()
    entry = {"id": case.id, "image": rel_img, "label": rel_lab, "subset": case.subset,
             "source_image": settings["source_image"], "source_label": settings["source_label"],
             **meta, "label_counts": counts, "settings": settings}
    with atomic_path(out / "meta" / f"{case.id}.json") as tmp:
        tmp.write_text(json.dumps(entry), encoding="utf-8")
    entry["skipped"] = False
    return entry


def format_imbalance_table(classes: Sequence[str], counts: dict) -> str:
    """Per-class voxel counts of the labeled cases, with each organ's share of the foreground."""
    fg = sum(v for k, v in counts.items() if k != classes[0]) or 1
    largest = max([v for k, v in counts.items() if k != classes[0]] or [0])
    width = max(len(c) for c in classes)
    lines = [f"{'class':<{width}}  {'voxels':>13}  {'% fg':>7}  {'largest/this':>12}"]
    for c in classes:
        v = counts.get(c, 0)
        share = "" if c == classes[0] else f"{100.0 * v / fg:6.2f}%"
        ratio = "" if c == classes[0] else (f"{largest / v:12.1f}" if v else f"{'absent':>12}")
        lines.append(f"{c:<{width}}  {v:>13,}  {share:>7}  {ratio:>12}")
    return "\n".join(lines)


def resolve_classes(dataset: str, classes, max_label: int | None) -> list[str]:
    """Class names: the dataset's own (synapse, amos), given names, or inferred from the labels."""
    from medseg_dpl.data.labels import DATASET_CLASSES

    if classes is not None:
        if isinstance(classes, str):
            if classes in DATASET_CLASSES:
                return list(DATASET_CLASSES[classes])
            names = [c.strip() for c in classes.split(",") if c.strip()]
            return names if names[0] == "background" else ["background"] + names
        return list(classes)
    if dataset in DATASET_CLASSES:
        return list(DATASET_CLASSES[dataset])
    k = max_label or 0
    return ["background"] + [f"class_{i}" for i in range(1, k + 1)]


def intensity_record(modalities: Sequence[str], clip: Sequence[float]) -> dict:
    """``dataset.json``'s ``intensity``: the modality ("ct", "mr", or "mixed" for AMOS with its
    MRI) and each scheme's settings (``clip`` for CT, ``percentiles`` + ``body_mask`` for MR)."""
    kinds = sorted(set(modalities)) or ["ct"]
    rec: dict = {"modality": kinds[0] if len(kinds) == 1 else "mixed"}
    if "ct" in kinds:
        rec["clip"] = [float(c) for c in clip]
    if "mr" in kinds:
        rec.update({"percentiles": [float(p) for p in MR_PERCENTILES], "body_mask": MR_BODY_MASK,
                    "scale": "z-score"})
    return rec


def preprocess_dataset(dataset: str, raw, out, spacing: Sequence[float] | None = None,
                       clip: Sequence[float] = DEFAULT_CLIP, workers: int | None = None,
                       ct_only: bool = False, labels=None, classes=None,
                       progress: bool = True, stream=None, modality: str | None = None) -> dict:
    """Check, then preprocess a raw dataset into ``out`` (PREP_DIR); returns the manifest.

    ``spacing`` defaults to :func:`default_spacing` (coarser of MIN_SPACING and the median); ``classes`` (nifti/dicom only): a
    dataset name, comma-separated names, or a list; default: inferred from the largest label
    (Synapse and AMOS have fixed classes; nnU-Net's come from its dataset.json).
    ``modality`` ("ct" | "mr") overrides the layout's (nnU-Net ``channel_names``, AMOS ids
    >= 500 = MR; nifti/dicom default to CT); it selects the intensity scheme per case.
    Raises :class:`medseg_dpl.data.check.CheckError` (listing every problem) before ``out``
    is created when the raw data are bad. Cases already done with the same settings (and
    unchanged sources) are skipped. Prints a summary and the imbalance table (per-class voxel
    counts of the labeled cases) to ``stream`` (default stdout).
    """
    from medseg_dpl.data.check import CheckError, default_workers, make_executor, parallel_map, run_check
    from medseg_dpl.data.readers import dataset_classes
    from medseg_dpl.utils import atomic_path

    stream = sys.stdout if stream is None else stream
    out = Path(out)
    if spacing is not None:
        spacing = tuple(float(s) for s in spacing)
        if len(spacing) != 3 or min(spacing) <= 0:
            raise ValueError(f"spacing must be 3 positive numbers (mm), got {spacing}")
    clip = (float(clip[0]), float(clip[1]))
    if not clip[1] > clip[0]:
        raise ValueError(f"clip must be LO < HI, got {clip}")
    if dataset in ("synapse", "amos", "nnunet") and classes is not None:
        raise ValueError(f"{dataset} has fixed classes; --classes is for nifti/dicom")
    if modality is not None and modality not in MODALITIES:
        raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
    if ct_only and modality == "mr":
        raise ValueError("--ct-only drops the MRI cases; it contradicts --modality mr")
    workers = default_workers() if workers is None else max(1, int(workers))
    n_classes_hint = len(resolve_classes(dataset, classes, None)) if classes is not None else None
    t0 = time.perf_counter()
    executor = make_executor(workers) if workers > 1 else None
    try:
        cases, problems, infos = run_check(dataset, raw, labels, ct_only, n_classes_hint, workers,
                                           progress, executor)
        if not cases and not problems:
            problems = [f"{raw}: no cases found"]
        if problems:
            raise CheckError(problems)
        max_label = max([i["max_label"] for i in infos if i["max_label"] is not None] or [0])
        names = dataset_classes(dataset, raw) or resolve_classes(dataset, classes, max_label)
        if spacing is None:
            spacing = default_spacing(dataset, [i["spacing"] for i in infos])
        out.mkdir(parents=True, exist_ok=True)
        entries = parallel_map(partial(prep_case, out=out, spacing=spacing, clip=clip,
                                       num_classes=len(names), modality=modality),
                               cases, workers, desc="prep", progress=progress, executor=executor)
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
    totals = np.zeros(len(names), dtype=np.int64)
    case_list = []
    for e in entries:
        if e["label_counts"] is not None:
            totals += np.asarray(e["label_counts"], dtype=np.int64)
        case_list.append({k: e[k] for k in (
            "id", "image", "label", "subset", "source_image", "source_label", "original",
            "resampled_shape", "crop_box", "shape", "affine", "spacing", "label_outside_crop",
            "modality")})
        if e.get("normalization"):
            case_list[-1]["normalization"] = e["normalization"]
    intensity = intensity_record([e["modality"] for e in entries], clip)
    manifest = {"dataset": dataset, "classes": names, "spacing": list(spacing), "orientation": "RAS",
                "intensity": intensity,
                "label_counts": {n: int(v) for n, v in zip(names, totals)},
                "cases": case_list}
    with atomic_path(out / "dataset.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    n_skip = sum(bool(e.get("skipped")) for e in entries)
    n_lab = sum(e["label"] is not None for e in entries)
    n_mr = sum(e["modality"] == "mr" for e in entries)
    scheme = [f"CT clip {list(clip)} HU -> [0, 1]"] if n_mr < len(entries) else []
    scheme += [f"MR ({n_mr} case(s)) clip to body percentiles {list(MR_PERCENTILES)} + z-score"] if n_mr else []
    print(f"prepped {len(entries) - n_skip} case(s), skipped {n_skip} already done, into {out} "
          f"({time.perf_counter() - t0:.1f} s); spacing {list(spacing)} mm, {'; '.join(scheme)}",
          file=stream)
    lost = [(e["id"], e["label_outside_crop"]) for e in entries if e.get("label_outside_crop")]
    for cid, n in lost:
        print(f"warning: case {cid}: {n} labelled voxels fell outside the body crop", file=stream)
    print(f"class voxel counts over {n_lab} labeled case(s) (after prep):", file=stream)
    print(format_imbalance_table(names, manifest["label_counts"]), file=stream)
    return manifest
