"""Helpers for the data tests: tiny synthetic raw cases and DICOM series writing."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np


def body_volume(shape=(16, 16, 12), seed=0) -> tuple[np.ndarray, np.ndarray]:
    """(int16 CT with an air background and a soft-tissue box, uint8 label 0..2)."""
    rng = np.random.default_rng(seed)
    img = np.full(shape, -1000, np.int16)
    img[3:-3, 3:-3, 2:-2] = 40 + rng.integers(-20, 20, (shape[0] - 6, shape[1] - 6, shape[2] - 4))
    lab = np.zeros(shape, np.uint8)
    lab[5:9, 5:9, 4:8] = 1
    lab[9:11, 9:11, 4:6] = 2
    return img, lab


def save(arr, path: Path, affine=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    aff = np.diag([2.0, 2.0, 3.0, 1.0]) if affine is None else affine
    nib.save(nib.Nifti1Image(arr, aff), str(path))
    return path


def write_dicom_series(image_path: Path, out_dir: Path, series_uid: str = "1.2.826.0.1.3680043.2.1125.1") -> None:
    """Write a NIfTI CT as a DICOM CT series (one file per slice) with SimpleITK."""
    import SimpleITK as sitk

    img = sitk.Cast(sitk.ReadImage(str(image_path)), sitk.sitkInt16)
    out_dir.mkdir(parents=True, exist_ok=True)
    d = img.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    common = [("0008|0060", "CT"), ("0008|0008", "ORIGINAL\\PRIMARY\\AXIAL"),
              ("0020|000d", series_uid + ".0"), ("0020|000e", series_uid),
              ("0020|0037", "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))),
              ("0010|0010", "test^ct"), ("0008|103e", "written by medseg-dpl tests"),
              ("0028|1053", "1"), ("0028|1052", "0")]
    for k in range(img.GetDepth()):
        sl = img[:, :, k]
        for tag, val in common:
            sl.SetMetaData(tag, val)
        sl.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in img.TransformIndexToPhysicalPoint((0, 0, k))))
        sl.SetMetaData("0020|0013", str(k + 1))
        sl.SetMetaData("0008|0018", f"{series_uid}.{k + 1}")
        sl.SetMetaData("0018|0050", f"{img.GetSpacing()[2]:.6f}")
        writer.SetFileName(str(out_dir / f"slice{k:04d}.dcm"))
        writer.Execute(sl)


