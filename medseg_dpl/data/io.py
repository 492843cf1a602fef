"""Reading CT volumes (NIfTI files, DICOM series folders) with a RAS world affine, and writing NIfTI.

Conventions used throughout ``medseg_dpl.data``:

* arrays are indexed ``(X, Y, Z)`` (NIfTI order: index ``i`` moves along the affine's first
  column);
* an affine maps a voxel index ``(i, j, k, 1)`` to world millimetres in RAS+ (nibabel's
  convention: +x towards the patient's Right, +y Anterior, +z Superior).

DICOM and ITK describe geometry in LPS+ (+x Left, +y Posterior, +z Superior), so an LPS world
point ``(x, y, z)`` is the RAS world point ``(-x, -y, z)`` and the RAS affine is
``diag(-1, -1, 1, 1) @ lps_affine``.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from medseg_dpl.errors import MedsegError
from medseg_dpl.utils import atomic_path

NIFTI_SUFFIXES = (".nii.gz", ".nii")

# ITK/DICOM (LPS+) world -> NIfTI (RAS+) world: negate the first two world axes.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class DataError(MedsegError, ValueError):
    """Bad input data; the message names the file and the cause."""


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).endswith(NIFTI_SUFFIXES)


def nifti_stem(path: str | os.PathLike) -> str:
    """``/a/img0001.nii.gz`` -> ``img0001``."""
    name = Path(path).name
    for suf in NIFTI_SUFFIXES:
        if name.endswith(suf):
            return name[: -len(suf)]
    return name


def list_nifti(folder: str | os.PathLike) -> list[Path]:
    """NIfTI files directly inside ``folder`` (sorted; hidden and temporary files skipped)."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and is_nifti(p) and not p.name.startswith((".", "._")))


# ----------------------------------------------------------------------------- DICOM
def dicom_series_ids(folder: str | os.PathLike) -> list[str]:
    """Series instance UIDs of the DICOM files directly inside ``folder`` (not recursive)."""
    import SimpleITK as sitk

    return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or ())


def _one_series_files(folder: Path) -> list[str]:
    import SimpleITK as sitk

    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder (a DICOM series is read from its folder)")
    uids = dicom_series_ids(folder)
    if not uids:
        raise DataError(f"{folder}: no DICOM series found in this folder")
    if len(uids) > 1:
        raise DataError(f"{folder}: folder holds {len(uids)} DICOM series ({', '.join(uids)}); "
                        "put each series in its own folder")
    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uids[0]))
    if not files:
        raise DataError(f"{folder}: DICOM series {uids[0]} has no readable files")
    return files


def itk_to_ras(img) -> tuple[np.ndarray, np.ndarray]:
    """A SimpleITK image -> (array (X, Y, Z), 4x4 RAS affine).

    ITK: LPS point = origin + D · diag(spacing) · (i, j, k); its numpy view is indexed (k, j, i).
    """
    import SimpleITK as sitk

    if img.GetDimension() != 3:
        raise DataError(f"image is {img.GetDimension()}D, expected 3D")
    arr = sitk.GetArrayFromImage(img).transpose(2, 1, 0)
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(img.GetSpacing(), dtype=np.float64)[None, :]
    lps[:3, 3] = img.GetOrigin()
    return arr, _LPS_TO_RAS @ lps


def ras_to_itk(array: np.ndarray, affine: np.ndarray):
    """(array (X, Y, Z), RAS affine) -> SimpleITK image with the same world geometry."""
    import SimpleITK as sitk

    lps = _LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0)))
    img.SetSpacing([float(s) for s in spacing])
    img.SetDirection([float(v) for v in (lps[:3, :3] / spacing[None, :]).ravel()])
    img.SetOrigin([float(v) for v in lps[:3, 3]])
    return img


def read_dicom_series(folder: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """One DICOM series folder -> (array (X, Y, Z) in stored units after rescale, RAS affine)."""
    import SimpleITK as sitk

    folder = Path(folder)
    files = _one_series_files(folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        img = reader.Execute()
    except RuntimeError as exc:
        raise DataError(f"{folder}: cannot read DICOM series: {str(exc).strip().splitlines()[-1]}") from exc
    try:
        return itk_to_ras(img)
    except DataError as exc:
        raise DataError(f"{folder}: {exc}") from None


def dicom_header(folder: str | os.PathLike) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape (X, Y, Z) and RAS affine of a DICOM series.

    A series' geometry needs every slice's position and ITK's series reader is the reliable
    way to get it, so this decodes the series (DICOM folders have no cheap global header).
    """
    arr, aff = read_dicom_series(folder)
    return tuple(int(s) for s in arr.shape), aff


# ----------------------------------------------------------------------------- NIfTI
def load_nifti(path: str | os.PathLike):
    """``nibabel.load`` with a :class:`DataError` naming the file (header only; data is lazy)."""
    import nibabel as nib

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        return nib.load(str(path))
    except Exception as exc:  # nibabel raises several types for corrupt headers
        raise DataError(f"{path}: unreadable NIfTI header ({type(exc).__name__}: {exc})") from exc


def squeeze_to_3d(shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """Drop trailing singleton axes ((X, Y, Z, 1) is a 3D volume); None if not 3D."""
    shape = tuple(int(s) for s in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape if len(shape) == 3 else None


def read_nifti_data(img, path: str | os.PathLike, dtype=None) -> np.ndarray:
    """All voxels of a loaded NIfTI, reshaped to 3D; a truncated/corrupt file raises DataError."""
    try:
        slope, inter = img.header.get_slope_inter()
        trivial = slope in (None, 1.0) and inter in (None, 0.0)
        if dtype is not None and np.issubdtype(np.dtype(dtype), np.floating):
            arr = img.get_fdata(dtype=dtype, caching="unchanged")
        elif trivial:
            arr = np.asanyarray(img.dataobj)  # stored type (int16 CT stays int16)
        else:  # scaled storage (e.g. uint16 + scl_inter -1024): float32, not nibabel's float64
            arr = img.get_fdata(dtype=np.float32, caching="unchanged")
    except Exception as exc:  # EOFError, zlib.error, OSError, ValueError on short reads
        raise DataError(f"{path}: unreadable or truncated image data "
                        f"({type(exc).__name__}: {exc})") from exc
    shape3 = squeeze_to_3d(arr.shape)
    if shape3 is None:
        raise DataError(f"{path}: image is not 3D (shape {tuple(arr.shape)})")
    return arr.reshape(shape3)


def read_image(path: str | os.PathLike, dtype=None) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI file or a DICOM series folder -> (array (X, Y, Z), 4x4 RAS world affine).

    ``dtype`` (e.g. ``np.float32``) converts with the NIfTI scaling applied; by default the
    stored type is kept (float32 when the header has a non-trivial slope/intercept).
    """
    path = Path(path)
    if path.is_dir():
        arr, aff = read_dicom_series(path)
        if dtype is not None:
            arr = arr.astype(dtype, copy=False)
        return arr, aff
    if not path.exists():
        raise DataError(f"{path}: file or folder not found")
    if not is_nifti(path):
        raise DataError(f"{path}: not a NIfTI file (.nii/.nii.gz) or a DICOM series folder")
    img = load_nifti(path)
    arr = read_nifti_data(img, path, dtype)
    return arr, np.asarray(img.affine, dtype=np.float64)


def read_header(path: str | os.PathLike) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and RAS affine without reading voxels (NIfTI header; DICOM via the series reader)."""
    path = Path(path)
    if path.is_dir():
        return dicom_header(path)
    img = load_nifti(path)
    shape3 = squeeze_to_3d(img.shape)
    if shape3 is None:
        raise DataError(f"{path}: image is not 3D (shape {tuple(img.shape)})")
    return shape3, np.asarray(img.affine, dtype=np.float64)


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> None:
    """Write ``array`` with ``affine`` as both sform and qform (code 1 = scanner), units mm.

    Written atomically (temp file + rename) so an interrupted run never leaves a partial file.
    """
    import nibabel as nib

    img = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm")
    img.set_sform(img.affine, code=1)
    img.set_qform(img.affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel sizes (mm) along the array axes: the norms of the affine's columns."""
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
