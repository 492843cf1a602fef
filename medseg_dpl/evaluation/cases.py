"""The cases a checkpoint is scored on: a PREP_DIR split, its ground truth, its raw predictions.

Shared by ``eval`` (:mod:`medseg_dpl.evaluation.evaluate`), the run's post-processing decision
(:mod:`medseg_dpl.evaluation.run_postprocess`) and the atlas baseline, so all three read the
same cases and score against the same labels.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from medseg_dpl.errors import MedsegError
from medseg_dpl.evaluation.predict import infer_probs, iter_case_predictions


class EvalError(MedsegError, RuntimeError):
    """Inputs that cannot be scored; the message names the file and the cause."""


def resolve_path(path: str, base: Path) -> Path:
    """A path recorded in ``dataset.json``: as is if absolute or existing, else under ``base``."""
    p = Path(path)
    return p if p.is_absolute() or p.exists() else base / p


def read_labels(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(label map (X, Y, Z) int, affine 4x4)`` of a label file; float files must hold integers."""
    from medseg_dpl.data.io import read_image
    if not path.exists():
        raise EvalError(f"{path}: label file not found")
    arr, aff = read_image(path)
    arr = np.asarray(arr)
    if arr.dtype.kind == "f":
        if np.any(arr != np.round(arr)):
            raise EvalError(f"{path}: label values are not integers")
        arr = arr.astype(np.int16)
    return arr, np.asarray(aff, float)


def split_cases(lm, checkpoint, data_dir: Path, split: str, allow_prep_labels: bool = False) -> list[dict]:
    """The ``dataset.json`` entries of ``split`` after checking that ``lm`` fits the PREP_DIR."""
    from medseg_dpl.data.manifest import load_manifest, read_split

    manifest = load_manifest(data_dir)
    ids = read_split(data_dir, split)
    classes = list(manifest["classes"])
    if classes != lm.classes:
        raise EvalError(f"{checkpoint}: classes {lm.classes} differ from {data_dir / 'dataset.json'} "
                        f"classes {classes}")
    if not np.allclose(lm.spacing, manifest["spacing"], rtol=1e-4):
        raise EvalError(f"{checkpoint}: trained at spacing {lm.spacing} mm but {data_dir} is prepped at "
                        f"{manifest['spacing']} mm; score with `medseg-dpl predict` + `eval --pred` instead")
    trained, here = ((rec or {}).get("modality", "ct") for rec in (lm.intensity, manifest.get("intensity")))
    if trained != here:
        raise EvalError(f"{checkpoint}: trained on {trained} images but {data_dir} holds {here} images")
    clip = (manifest.get("intensity") or {}).get("clip")
    if clip is not None and not np.allclose(lm.clip, clip):
        raise EvalError(f"{checkpoint}: trained with HU clip {lm.clip} but {data_dir} uses {clip}")
    by_id = {c["id"]: c for c in manifest["cases"]}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise EvalError(f"{data_dir}/splits/{split}.txt: ids not in dataset.json: {missing[:5]}")
    cases = [by_id[i] for i in ids]
    for c in cases:
        if not c.get("source_label") and not (allow_prep_labels and c.get("label")):
            raise EvalError(f"{data_dir / 'dataset.json'}: case {c['id']} has no source_label to score against")
    return cases


def split_predictions(lm, checkpoint, data_dir: str | os.PathLike, split: str,
                      overlap: float | None = None, sw_batch_size: int | None = None, tta: bool = False,
                      interpolation: str = "linear", allow_prep_labels: bool = False,
                      progress: bool = True, desc: str | None = None):
    """Raw predictions of a PREP_DIR split with their ground truth, case by case.

    Yields ``(case id, pred (X, Y, Z) uint8, truth (X, Y, Z) int, truth affine 4x4)`` on the
    case's original grid (``source_label``). With ``allow_prep_labels`` a case without a
    source label is predicted and scored on the preprocessed grid against its prepped label.
    """
    import nibabel as nib

    data_dir = Path(data_dir)
    cases = split_cases(lm, checkpoint, data_dir, split, allow_prep_labels)
    for c in tqdm(cases, desc=desc or f"eval {split}", unit="case", disable=not progress):
        img = nib.load(str(data_dir / c["image"]))
        image, paff = np.asarray(img.dataobj, dtype=np.float32), np.asarray(img.affine, float)
        if c.get("source_label"):
            _, pred = next(iter_case_predictions(lm, [(c["id"], image, paff, c)], overlap,
                                                 sw_batch_size, tta, interpolation))
            truth, taff = read_labels(resolve_path(c["source_label"], data_dir))
            if truth.shape != pred.shape:
                raise EvalError(f"{c['source_label']}: shape {truth.shape} differs from the recorded "
                                f"original shape {pred.shape}")
        else:  # no source label (allow_prep_labels): the preprocessed grid
            pred = infer_probs(lm, image, overlap, sw_batch_size, tta).argmax(0).astype(np.uint8)
            truth, taff = read_labels(data_dir / c["label"])
            if truth.shape != pred.shape:
                raise EvalError(f"{data_dir / c['label']}: shape {truth.shape} differs from image {image.shape}")
        yield c["id"], pred, truth, taff
