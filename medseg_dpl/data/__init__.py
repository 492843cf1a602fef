"""CT and MR data: raw readers, integrity check, preprocessing, splits, phantom, MONAI pipelines.

The contract's helpers are importable from here (loaded lazily, so ``import medseg_dpl.data``
stays cheap): ``load_manifest``, ``read_split``, ``read_image``, ``preprocess_image``,
``restore_to_original``, ``check_dataset``, ``preprocess_dataset``, ``make_splits``,
``scan_dataset``, ``DataError``.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "DataError": "medseg_dpl.data.io",
    "read_image": "medseg_dpl.data.io",
    "load_manifest": "medseg_dpl.data.manifest",
    "read_split": "medseg_dpl.data.manifest",
    "preprocess_image": "medseg_dpl.data.preprocess",
    "preprocess_arrays": "medseg_dpl.data.preprocess",
    "preprocess_dataset": "medseg_dpl.data.preprocess",
    "restore_to_original": "medseg_dpl.data.preprocess",
    "check_dataset": "medseg_dpl.data.check",
    "CheckError": "medseg_dpl.data.check",
    "make_splits": "medseg_dpl.data.splits",
    "scan_dataset": "medseg_dpl.data.readers",
    "Case": "medseg_dpl.data.readers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'medseg_dpl.data' has no attribute {name!r}")
