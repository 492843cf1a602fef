"""Soft predictions on disk: ``<case>_probs.npz`` for ensembling runs and for teacher mode.

File format (``numpy.savez_compressed``): ``probs`` ``(C, X, Y, Z)`` float16 softmax (class
0 = background) on the voxel grid described by ``affine`` ``(4, 4)`` float64 (voxel index ->
RAS mm, as a NIfTI affine). ``medseg-dpl predict --save-probs`` writes them on each input's own
grid (the label map's grid), so runs can be averaged voxel by voxel. Teacher mode
(``teacher.predictions=DIR``) reads ``DIR/<id>_probs.npz`` on any grid: the affine says where
each voxel lies, and :func:`probs_on_grid` resamples onto the case's preprocessed grid.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from medseg_dpl.errors import MedsegError
from medseg_dpl.utils import atomic_path

PROBS_SUFFIX = "_probs.npz"


class ProbsFileError(MedsegError, ValueError):
    """A probability file that is missing, unreadable or malformed; the message names it."""


def probs_on_grid(probs: np.ndarray, src_affine: np.ndarray, dst_shape: Sequence[int],
                  dst_affine: np.ndarray, order: int = 1) -> np.ndarray:
    """Resample class probabilities between voxel grids through world coordinates.

    ``probs`` ``(C, x, y, z)`` on the grid ``src_affine`` -> ``(C, X, Y, Z)`` float16 on the grid
    ``dst_shape``/``dst_affine``. Trilinear (``order=1``) weights are the same for every class,
    so each voxel stays a distribution. Destination voxels whose centre lies outside the source
    voxels' extent (e.g. outside prep's body crop) are certain background, as the label maps
    of ``predict`` are.
    """
    probs = np.asarray(probs)
    if probs.ndim != 4:
        raise ValueError(f"probs must be (C, X, Y, Z), got shape {probs.shape}")
    m = np.linalg.inv(np.asarray(src_affine, float)) @ np.asarray(dst_affine, float)  # dst -> src index
    shape = tuple(int(s) for s in dst_shape)
    if np.allclose(m, np.eye(4), atol=1e-6) and tuple(probs.shape[1:]) == shape:
        return probs.astype(np.float16)
    out = np.empty((probs.shape[0], *shape), np.float16)
    for c in range(probs.shape[0]):
        out[c] = ndimage.affine_transform(probs[c].astype(np.float32, copy=False), m[:3, :3], m[:3, 3],
                                          output_shape=shape, output=np.float32, order=order,
                                          mode="nearest")
    inside = ndimage.affine_transform(np.ones(probs.shape[1:], np.uint8), m[:3, :3], m[:3, 3],
                                      output_shape=shape, output=np.uint8, order=0,
                                      mode="grid-constant", cval=0).astype(bool)
    out[:, ~inside] = 0
    out[0, ~inside] = 1
    return out


def save_probs_npz(path: str | os.PathLike, probs: np.ndarray, affine: np.ndarray) -> Path:
    """Atomically write ``probs`` ``(C, X, Y, Z)`` (stored float16) and ``affine`` ``(4, 4)``."""
    path = Path(path)
    probs = np.asarray(probs)
    if probs.ndim != 4:
        raise ValueError(f"{path}: probs must be (C, X, Y, Z), got shape {probs.shape}")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: savez would append .npz to a bare name
            np.savez_compressed(f, probs=probs.astype(np.float16),
                                affine=np.asarray(affine, np.float64))
    return path


def load_probs_npz(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(probs (C, X, Y, Z) float16, affine (4, 4) float64)`` from a ``*_probs.npz`` file."""
    path = Path(path)
    if not path.is_file():
        raise ProbsFileError(f"{path}: probability file not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "probs" not in z or "affine" not in z:
                raise ProbsFileError(f"{path}: needs arrays 'probs' (C, X, Y, Z) and 'affine' (4, 4), "
                                     f"has {sorted(z.files)}")
            probs, affine = z["probs"], z["affine"].astype(np.float64)
    except ProbsFileError:
        raise
    except Exception as exc:  # truncated zip, not an npz, pickled objects
        raise ProbsFileError(f"{path}: cannot read probabilities ({exc})") from exc
    if probs.ndim != 4 or affine.shape != (4, 4) or probs.dtype.kind != "f":
        raise ProbsFileError(f"{path}: 'probs' must be float (C, X, Y, Z) and 'affine' 4x4, got "
                             f"{probs.dtype} {probs.shape} and {affine.shape}")
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ProbsFileError(f"{path}: 'affine' is not an invertible voxel-to-world matrix")
    return probs, affine
