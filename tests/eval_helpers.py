"""Helpers for the evaluation tests: a tiny untrained checkpoint in the contract's format,
the shared real CT, and a DICOM series written from an array with SimpleITK."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg_dpl.data.labels import SYNAPSE_CLASSES

TINY_MODEL = {"name": "UNet", "channels": [4, 8], "strides": [2], "num_res_units": 0, "norm": "instance"}


def make_checkpoint(path: Path, classes=SYNAPSE_CLASSES, spacing=(6.0, 6.0, 6.0),
                    patch=(32, 32, 32), seed: int = 0, model_cfg: dict | None = None) -> Path:
    """An untrained network saved as ``RUN_DIR/checkpoints/best.pt`` would be (contract format)."""
    from medseg_dpl.models import build_model

    torch.manual_seed(seed)
    mcfg = dict(model_cfg or TINY_MODEL)
    net = build_model(mcfg, 1, len(classes))
    ckpt = {"step": 0, "config": {"model": mcfg, "data": {"patch_size": list(patch)},
                                  "eval": {"overlap": 0.25, "sw_batch_size": 2},
                                  "method": {"name": "supervised"}},
            "model": net.state_dict(), "student": net.state_dict(), "teacher": None,
            "optimizer": {}, "scaler": {}, "method": {}, "rng": {},
            "dataset": {"classes": list(classes), "spacing": list(spacing), "orientation": "RAS",
                        "intensity": {"clip": [-175.0, 250.0]}},
            "best_metric": 0.0}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def real_ct_dir() -> Path:
    """``shared/data/real_ct`` (env MEDSEG_DPL_SHARED overrides the shared root); skip if absent."""
    root = os.environ.get("MEDSEG_DPL_SHARED")
    d = Path(root) / "data" / "real_ct" if root else Path(__file__).resolve().parents[2] / "shared/data/real_ct"
    if not (d / "ct.nii.gz").exists():
        pytest.skip(f"real CT not found at {d} (set MEDSEG_DPL_SHARED)")
    return d


def write_dicom_series(array: np.ndarray, affine: np.ndarray, folder: Path) -> Path:
    """Write ``array`` (X, Y, Z) HU with RAS ``affine`` as an int16 CT DICOM series, one file per slice."""
    import SimpleITK as sitk

    from medseg_dpl.data.io import ras_to_itk

    img = ras_to_itk(np.asarray(array).astype(np.int16), affine)
    folder.mkdir(parents=True, exist_ok=True)
    d = img.GetDirection()
    orient = "\\".join(f"{v:.8f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    series, study = "1.2.826.0.1.3680043.2.1125.1.99", "1.2.826.0.1.3680043.2.1125.1.98"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(img.GetDepth()):
        sl = img[:, :, k]
        pos = img.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, val in (("0008|0060", "CT"), ("0020|000d", study), ("0020|000e", series),
                         ("0008|0018", f"{series}.{k + 1}"), ("0020|0013", str(k + 1)),
                         ("0020|0032", "\\".join(f"{p:.6f}" for p in pos)), ("0020|0037", orient),
                         ("0018|0050", f"{img.GetSpacing()[2]:.6f}"),
                         ("0028|1052", "0"), ("0028|1053", "1")):
            sl.SetMetaData(tag, val)
        writer.SetFileName(str(folder / f"slice_{k:04d}.dcm"))
        writer.Execute(sl)
    return folder
