"""MONAI dictionary-transform pipelines over a PREP_DIR (training crops, weak/strong views, eval).

Every pipeline reads the preprocessed NIfTIs (float32 image in [0, 1], uint8 label, RAS, target
spacing) and returns MONAI ``MetaTensor``s, so each crop keeps its affine (the trainer uses the
weak view's affine to find a crop's voxels in a whole-volume prediction). The deterministic
prefix (load, channel-first, pad, class indices) is what a ``CacheDataset`` caches; the random
suffix runs on every access and is reseeded through ``Compose.set_random_state``.

Shapes (``P`` = ``patch_size``, ``X, Y, Z`` = the preprocessed volume):

* ``labeled_transforms`` -> list of ``num_samples`` dicts: ``image`` (1, *P) float32,
  ``label`` (1, *P) int64. Crop centres are drawn class-balanced (every class present in the
  volume, background included, equally likely: ``RandCropByLabelClassesd`` with equal ratios),
  so the adrenal glands are seen as often as the liver. Augmentation: a random affine of the
  crop (rotation up to ±15° about each axis, isotropic scaling 0.85–1.15, image bilinear, label
  nearest; :func:`spatial_augmentation`) and mild intensity changes (scale/shift, a little noise).
  No flips: left/right organs (kidneys, adrenals) are lateralised and a flip would swap their
  identities.
* ``unlabeled_transforms`` -> list of ``num_samples`` dicts: ``image_weak`` and ``image_strong``
  (1, *P) float32 of the *same* random crop. The crop first gets the same random affine as the
  labeled crops (so the unlabeled data add geometric variety too), *then* the two views are
  made: the weak view is that crop, the strong view the same voxels with intensity changes
  (noise, gamma/contrast, scale, shift, Gaussian smoothing) and cut-outs (``RandCoarseDropoutd``).
  No geometric change separates the views, so a pseudo-label from the weak view supervises
  the strong view voxel for voxel (CutMix between crops happens in the method, on the batch,
  where the pseudo-labels can be mixed with the same boxes).
* ``eval_transforms`` -> ``image`` (1, X, Y, Z) float32 and, if the case has one, ``label``
  (1, X, Y, Z) int64: the whole volume, no padding.

``build_dataset`` attaches ``id`` (the case id) to every item.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from monai.data import CacheDataset, Dataset
from monai.transforms import (
    ClassesToIndicesd,
    Compose,
    CopyItemsd,
    DeleteItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    RandAdjustContrastd,
    RandAffined,
    RandCoarseDropoutd,
    RandCropByLabelClassesd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropSamplesd,
    SpatialPadd,
)

from medseg_dpl.data.io import DataError
from medseg_dpl.data.manifest import load_manifest

__all__ = ["labeled_transforms", "unlabeled_transforms", "eval_transforms", "build_dataset",
           "KINDS"]

KINDS = ("labeled", "unlabeled", "eval")

# Background indices cover most of a volume; an evenly strided subsample of this many per class
# keeps the cached index lists (deep-copied on every access) small without biasing the centres.
_MAX_INDICES_PER_CLASS = 20000


def _patch(patch_size: Sequence[int]) -> list[int]:
    p = [int(v) for v in patch_size]
    if len(p) != 3 or min(p) < 1:
        raise ValueError(f"patch_size must be 3 positive integers, got {list(patch_size)}")
    return p


def _load(keys_with_label: bool) -> list:
    # image float32, label uint8 (cached compactly; cast to int64 at the end of the pipeline)
    t = [LoadImaged("image", dtype=np.float32, image_only=True)]
    if keys_with_label:
        t.append(LoadImaged("label", dtype=np.uint8, image_only=True, allow_missing_keys=True))
    return t


def spatial_augmentation(keys: Sequence[str], patch: Sequence[int], modes: Sequence[str],
                         prob: float = 0.5) -> RandAffined:
    """MONAI ``RandAffined`` on a crop: rotation ±15° about each axis, scale 0.85–1.15, output
    the crop's own size; ``modes`` per key (bilinear for images, nearest for labels). Border
    padding: rotated-in corners repeat the edge instead of a black wedge the network could
    learn to read as "outside the body"."""
    rot = float(np.deg2rad(15))
    return RandAffined(list(keys), prob=prob, rotate_range=(rot, rot, rot), scale_range=0.15,
                       spatial_size=list(patch), mode=list(modes), padding_mode="border",
                       cache_grid=True, allow_missing_keys=True)


def labeled_transforms(patch_size: Sequence[int], num_classes: int, num_samples: int = 1,
                       spatial: bool = True) -> Compose:
    """Labeled training crops: ``image`` (1, *patch) float32, ``label`` (1, *patch) int64.

    Returns a list of ``num_samples`` such dicts per volume (class-balanced crop centres);
    ``spatial=False`` leaves out the random affine.
    """
    p = _patch(patch_size)
    keys = ["image", "label"]
    return Compose(_load(True) + [
        EnsureChannelFirstd(keys),
        SpatialPadd(keys, spatial_size=p),
        ClassesToIndicesd("label", num_classes=int(num_classes),
                          max_samples_per_class=_MAX_INDICES_PER_CLASS),
        # --- random from here on (not cached) ---
        RandCropByLabelClassesd(keys, label_key="label", spatial_size=p, ratios=None,
                                num_classes=int(num_classes), num_samples=int(num_samples),
                                indices_key="label_cls_indices", warn=False),
        *([spatial_augmentation(keys, p, ("bilinear", "nearest"))] if spatial else []),
        RandScaleIntensityd("image", factors=0.1, prob=0.5),
        RandShiftIntensityd("image", offsets=0.05, prob=0.5),
        RandGaussianNoised("image", prob=0.2, mean=0.0, std=0.02),
        EnsureTyped("image", dtype=torch.float32),
        EnsureTyped("label", dtype=torch.int64),
    ])


def unlabeled_transforms(patch_size: Sequence[int], num_samples: int = 1,
                         strong_intensity: bool = True, cutout: bool = True,
                         spatial: bool = True) -> Compose:
    """Unlabeled crops with two views of the same voxels: ``image_weak`` and ``image_strong``
    (1, *patch) float32, ``num_samples`` crops per volume.

    ``strong_intensity`` / ``cutout`` switch the two parts of the strong augmentation and
    ``spatial`` the shared affine (all on for training; tests switch them off one at a time to
    check the views are voxel-aligned).
    """
    p = _patch(patch_size)
    strong: list = []
    if strong_intensity:
        strong += [
            RandGaussianNoised("image_strong", prob=0.8, mean=0.0, std=0.05),
            RandAdjustContrastd("image_strong", prob=0.8, gamma=(0.6, 1.6)),
            RandScaleIntensityd("image_strong", factors=0.25, prob=0.8),
            RandShiftIntensityd("image_strong", offsets=0.1, prob=0.8),
            RandGaussianSmoothd("image_strong", prob=0.3, sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0),
                                sigma_z=(0.25, 1.0)),
        ]
    if cutout:
        # 1-3 boxes of 1/6 to 1/3 of the patch per axis (up to ~10 % of the voxels), filled with
        # random values in the image's range (MONAI default): the organ must come from context
        strong.append(RandCoarseDropoutd("image_strong", holes=1, max_holes=3,
                                          spatial_size=[max(1, s // 6) for s in p],
                                          max_spatial_size=[max(1, s // 3) for s in p], prob=0.5))
    # "label" (only present when the caller asks for the truth, see build_dataset) follows the
    # image through crop and affine, so crop-level pseudo-label diagnostics compare like with like
    return Compose(_load(True) + [
        EnsureChannelFirstd(["image", "label"], allow_missing_keys=True),
        SpatialPadd(["image", "label"], spatial_size=p, allow_missing_keys=True),
        # --- random from here on (not cached) ---
        RandSpatialCropSamplesd(["image", "label"], roi_size=p, num_samples=int(num_samples),
                                random_size=False, allow_missing_keys=True),
        *([spatial_augmentation(["image", "label"], p, ["bilinear", "nearest"])] if spatial else []),
        EnsureTyped("image", dtype=torch.float32),
        EnsureTyped("label", dtype=torch.int64, allow_missing_keys=True),
        CopyItemsd("image", times=2, names=["image_weak", "image_strong"]),
        CopyItemsd("label", times=1, names=["truth"], allow_missing_keys=True),
        DeleteItemsd(["image", "label"]),
        *strong,
    ])


def eval_transforms() -> Compose:
    """Whole volumes: ``image`` (1, X, Y, Z) float32 and ``label`` (1, X, Y, Z) int64 when the
    item has a label path (unlabeled test cases get the image only)."""
    return Compose(_load(True) + [
        EnsureChannelFirstd(["image", "label"], allow_missing_keys=True),
        EnsureTyped("image", dtype=torch.float32),
        EnsureTyped("label", dtype=torch.int64, allow_missing_keys=True),
    ])


def build_dataset(prep_dir: str | os.PathLike, ids: Sequence[str], kind: str,
                  patch_size: Sequence[int], num_classes: int, num_samples: int = 1,
                  cache: bool = True, spatial: bool = True, with_truth: bool = False):
    """A MONAI dataset over the cases ``ids`` of ``PREP_DIR``; each item holds ``id`` as well.

    ``kind``: ``"labeled"`` (:func:`labeled_transforms`, needs a label for every case),
    ``"unlabeled"`` (:func:`unlabeled_transforms`, labels ignored) or ``"eval"``
    (:func:`eval_transforms`; the label is included when the case has one).
    ``spatial``: the random affine of training crops (``data.spatial_aug``).
    ``with_truth`` (unlabeled only): each crop also carries ``truth`` (1, *patch) int64, the
    case's label at the same voxels, for diagnostics; every case must then have a label.
    ``cache=True`` gives a ``CacheDataset`` (the deterministic prefix kept in memory),
    otherwise a plain ``Dataset``.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; known: {', '.join(KINDS)}")
    root = Path(prep_dir)
    manifest = load_manifest(root)
    cases = {c["id"]: c for c in manifest["cases"]}
    unknown = [i for i in ids if i not in cases]
    if unknown:
        raise DataError(f"{root / 'dataset.json'}: unknown case id(s) {', '.join(map(str, unknown[:5]))}"
                        + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""))
    data = []
    for i in ids:
        c = cases[i]
        item = {"id": str(i), "image": str(root / c["image"])}
        if (kind != "unlabeled" or with_truth) and c.get("label"):
            item["label"] = str(root / c["label"])
        elif kind == "labeled" or (kind == "unlabeled" and with_truth):
            raise DataError(f"{root / 'dataset.json'}: case {i} has no label but is used as labeled")
        for key in ("image", "label"):
            if key in item and not Path(item[key]).is_file():
                raise DataError(f"{item[key]}: {key} of case {i} listed in {root / 'dataset.json'} "
                                "does not exist")
        data.append(item)
    if kind == "labeled":
        transform = labeled_transforms(patch_size, num_classes, num_samples, spatial=spatial)
    elif kind == "unlabeled":
        transform = unlabeled_transforms(patch_size, num_samples, spatial=spatial)
    else:
        transform = eval_transforms()
    if cache:
        return CacheDataset(data, transform, cache_rate=1.0, num_workers=min(4, os.cpu_count() or 1),
                            progress=False)
    return Dataset(data, transform)
