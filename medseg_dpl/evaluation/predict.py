"""Prediction: a checkpoint + CT volumes -> label maps in each input's own geometry.

Pipeline per case: ``preprocess_image`` (exactly what ``medseg-dpl prep`` does: RAS, the
checkpoint's target spacing, HU clip and scaling, body crop) -> MONAI sliding-window inference
(Gaussian blending, optional flip TTA, bf16 autocast on CUDA) -> class probabilities on the
preprocessed grid -> resampled onto the input's voxel grid through the world coordinates
(the preprocessed NIfTI affine is the true world affine, so ``inv(A_prep) @ A_orig`` maps each
input voxel to its location in the preprocessed grid; this undoes crop, resampling and
reorientation at once) -> argmax -> ``uint8`` NIfTI with the input's shape and affine.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm

from medseg_dpl.checkpoint import CheckpointError, load_checkpoint
from medseg_dpl.data.io import dicom_series_ids, list_nifti, read_header
from medseg_dpl.data.preprocess import DEFAULT_CLIP, intensity_kwargs, preprocess_image, restore_to_original
from medseg_dpl.errors import MedsegError
from medseg_dpl.evaluation.postprocess import PostprocessError, apply_postprocessing, decision_for_checkpoint
from medseg_dpl.utils import atomic_path

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")


class PredictError(MedsegError, RuntimeError):
    """Bad checkpoint or input; the message names the file and the cause."""


# --------------------------------------------------------------------------- checkpoint
@dataclass
class LoadedModel:
    """A network ready for inference plus what prediction needs from its checkpoint."""
    model: torch.nn.Module
    classes: list[str]
    spacing: list[float]
    clip: list[float]
    patch_size: list[int]
    overlap: float
    sw_batch_size: int
    config: dict
    device: torch.device
    postprocessing: dict | None = None  # the run's connected-component decision (postprocess.py)
    intensity: dict | None = None       # PREP's intensity record: modality, CT clip, MR percentiles


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``--device`` of predict/eval: the package's one rule (:func:`medseg_dpl.utils.resolve_device`)."""
    from medseg_dpl.utils import resolve_device as resolve
    return resolve(device, key="--device")


def load_checkpoint_model(checkpoint: str | os.PathLike, device=None) -> LoadedModel:
    """Load a trainer checkpoint (contract format) and build its inference network (eval mode)."""
    path = Path(checkpoint)
    try:
        ckpt = load_checkpoint(path, "segmentation")
    except CheckpointError as exc:  # names the file and the cause
        raise PredictError(str(exc)) from None
    return model_from_checkpoint(path, ckpt, device)


def model_from_checkpoint(path: str | os.PathLike, ckpt: dict, device=None) -> LoadedModel:
    """The :class:`LoadedModel` of a checkpoint dict read by ``medseg_dpl.checkpoint.load_checkpoint``;
    ``path`` names it in errors."""
    from medseg_dpl.models import build_model

    cfg, ds = ckpt["config"], ckpt["dataset"]
    try:
        classes = list(ds["classes"])
        spacing = [float(s) for s in ds["spacing"]]
        clip = [float(c) for c in ds["intensity"].get("clip", DEFAULT_CLIP)]  # none for MR-only
        patch = [int(p) for p in cfg["data"]["patch_size"]]
    except (KeyError, TypeError) as exc:
        raise PredictError(f"{path}: checkpoint lacks {exc} in its dataset/config record") from exc
    ev = cfg.get("eval", {}) or {}
    dev = resolve_device(device)
    model = build_model(cfg.get("model", {}), 1, len(classes))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise PredictError(f"{path}: weights do not fit the configured network ({exc})") from exc
    model.to(dev).eval()
    try:
        decision = decision_for_checkpoint(path, ckpt)
    except PostprocessError as exc:
        raise PredictError(str(exc)) from exc
    return LoadedModel(model, classes, spacing, clip, patch, float(ev.get("overlap", 0.5)),
                       int(ev.get("sw_batch_size", 2)), cfg, dev, decision,
                       intensity=dict(ds["intensity"]))


# --------------------------------------------------------------------------- inputs
def _is_nifti(p: Path) -> bool:
    return p.is_file() and p.name.lower().endswith(NIFTI_SUFFIXES)


def case_name(p: Path) -> str:
    name = p.name
    for suf in NIFTI_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return name


def _dicom_series_ids(folder: Path) -> list[str]:
    return dicom_series_ids(folder)


def find_inputs(path: str | os.PathLike) -> list[tuple[str, Path]]:
    """``(case name, path)`` of each volume under ``path``: a NIfTI file, a folder of NIfTI
    files (sorted), or a DICOM series folder (one case named after the folder)."""
    p = Path(path)
    if not p.exists():
        raise PredictError(f"{p}: input not found")
    if p.is_file():
        if not _is_nifti(p):
            raise PredictError(f"{p}: not a NIfTI file (.nii or .nii.gz) or a DICOM series folder")
        return [(case_name(p), p)]
    niftis = list_nifti(p)  # sorted, hidden/temporary files skipped
    if niftis:
        return [(case_name(q), q) for q in niftis]
    if _dicom_series_ids(p):
        return [(p.name, p)]
    raise PredictError(f"{p}: folder holds neither NIfTI files nor a DICOM series")


def source_geometry(path: str | os.PathLike) -> tuple[tuple[int, ...], np.ndarray, nib.Nifti1Header | None]:
    """Voxel grid an output must reproduce: ``(shape (X, Y, Z), 4x4 RAS affine, NIfTI header or None)``.

    NIfTI: the file's own array order and affine (its header is kept for the output).
    DICOM series: ITK's index order ``(i, j, k)`` with its LPS geometry as a RAS affine
    (``medseg_dpl.data`` ``read_header``), so the written NIfTI lies on the series' voxels.
    """
    p = Path(path)
    shape, affine = read_header(p)
    header = nib.load(str(p)).header if p.is_file() else None
    return tuple(int(s) for s in shape), np.asarray(affine, float), header


# --------------------------------------------------------------------------- geometry
def resample_probs_to_grid(probs: np.ndarray, src_affine: np.ndarray, dst_shape: Sequence[int],
                           dst_affine: np.ndarray, order: int = 1) -> np.ndarray:
    """Labels on ``dst`` from class probabilities on ``src``.

    ``probs`` ``(C, x, y, z)`` on the grid with affine ``src_affine`` -> ``(X, Y, Z)`` uint8 on
    the grid ``dst_shape``/``dst_affine``. Each class map is interpolated (``order`` 1:
    trilinear, 0: nearest) with scipy's ``affine_transform`` and a running argmax is kept, so
    memory stays at two destination volumes whatever the number of classes. Destination voxels
    whose centre falls outside the source voxels' extent (the body crop's exterior) are
    background; within half a voxel of the edge the edge value is used (prep replicates edges
    when resampling too).
    """
    m = np.linalg.inv(src_affine) @ dst_affine  # dst voxel index -> src voxel index
    shape = tuple(int(s) for s in dst_shape)
    best = np.full(shape, -1.0, np.float32)
    labels = np.zeros(shape, np.uint8)
    for c in range(probs.shape[0]):
        pc = ndimage.affine_transform(probs[c].astype(np.float32, copy=False), m[:3, :3], m[:3, 3],
                                      output_shape=shape, output=np.float32, order=order,
                                      mode="nearest")
        better = pc > best
        labels[better] = c
        np.maximum(best, pc, out=best)
    # inside = nearest source voxel exists: rounding maps [-0.5, n-0.5) onto the grid
    inside = ndimage.affine_transform(np.ones(probs.shape[1:], np.uint8), m[:3, :3], m[:3, 3],
                                      output_shape=shape, output=np.uint8, order=0,
                                      mode="grid-constant", cval=0)
    labels[inside == 0] = 0
    return labels


def infer_probs(lm: LoadedModel, image: np.ndarray, overlap: float | None = None,
                sw_batch_size: int | None = None, tta: bool | None = False,
                amp: bool = True) -> np.ndarray:
    """Softmax probabilities ``(C, X, Y, Z)`` float32 of a preprocessed ``(X, Y, Z)`` volume.

    ``tta``: average over the 8 axis flips; None: the checkpoint config's ``eval.tta``."""
    from medseg_dpl.evaluation.inference import sliding_window_predict
    if tta is None:
        tta = bool((lm.config.get("eval") or {}).get("tta", False))
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None].to(lm.device)
    p = sliding_window_predict(lm.model, x, lm.patch_size,
                               overlap=lm.overlap if overlap is None else overlap,
                               sw_batch_size=lm.sw_batch_size if sw_batch_size is None else sw_batch_size,
                               amp=amp, tta_flip=tta)
    return p[0].float().cpu().numpy()


def write_labels(labels: np.ndarray, affine: np.ndarray, out_path: Path,
                 header: nib.Nifti1Header | None = None) -> Path:
    """Atomically write a uint8 label map with exactly ``affine`` (header copied when given)."""
    # keep the source's header fields (units, description, ...) only from a NIfTI-1 source
    hdr = header.copy() if type(header) is nib.Nifti1Header else None
    img = nib.Nifti1Image(labels.astype(np.uint8), affine, header=hdr)
    img.set_data_dtype(np.uint8)
    img.header["scl_slope"], img.header["scl_inter"] = 1.0, 0.0
    img.header["cal_min"], img.header["cal_max"] = 0.0, 0.0
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    with atomic_path(out_path) as tmp:
        nib.save(img, str(tmp))
    return out_path


def probs_to_original(probs: np.ndarray, prep_affine: np.ndarray, shape: Sequence[int],
                      affine: np.ndarray, meta: dict | None = None,
                      interpolation: str = "linear") -> np.ndarray:
    """Class probabilities ``(C, x, y, z)`` on the preprocessed grid -> labels ``(X, Y, Z)``
    uint8 on the source grid (``shape``, ``affine``).

    ``"linear"``: trilinear probabilities then argmax (:func:`resample_probs_to_grid`).
    ``"nearest"``: argmax on the preprocessed grid, then the data package's
    ``restore_to_original`` with ``meta`` (prep's own inverse, the same nearest-voxel rule
    prep used for labels).
    """
    needed = ("original", "resampled_shape", "crop_box", "shape", "affine")
    if interpolation == "nearest" and meta is not None and all(k in meta for k in needed):
        return restore_to_original(probs.argmax(0).astype(np.uint8), meta).astype(np.uint8)
    if interpolation not in ("linear", "nearest"):
        raise ValueError(f"interpolation must be 'linear' or 'nearest', got {interpolation!r}")
    return resample_probs_to_grid(probs, np.asarray(prep_affine, float), shape,
                                  np.asarray(affine, float), order=1 if interpolation == "linear" else 0)


def predict_volume(lm: LoadedModel, source: Path, overlap=None, sw_batch_size=None,
                   tta=False, interpolation: str = "linear", postprocess: bool = True,
                   keep_probs: bool = False, modality: str | None = None):
    """One input (NIfTI file or DICOM folder) -> ``(labels (X, Y, Z) uint8, affine, header)``
    on the input's own grid, post-processed with the run's decision when ``postprocess``.
    ``keep_probs`` appends ``(probs (C, x, y, z) float32, prep affine)``: the raw softmax on the
    preprocessed grid. ``modality`` ("ct" | "mr"): the input's, needed only by a model trained
    on both (AMOS with its MRI); default: the checkpoint's."""
    try:  # the recorded modality's normalisation (CT window or MR z-score), as prep did
        scheme = intensity_kwargs(lm.intensity, modality)
    except ValueError as exc:
        raise PredictError(f"{source}: {exc}") from None
    image, prep_affine, meta = preprocess_image(source, lm.spacing, **scheme)
    shape, affine, header = source_geometry(source)
    probs = infer_probs(lm, np.asarray(image), overlap, sw_batch_size, tta)
    labels = probs_to_original(probs, prep_affine, shape, affine, meta, interpolation)
    if postprocess and lm.postprocessing:
        labels = apply_postprocessing(labels, lm.postprocessing)
    if keep_probs:
        return labels, affine, header, (probs, prep_affine)
    return labels, affine, header


def predict(checkpoint: str | os.PathLike, input: str | os.PathLike, out_dir: str | os.PathLike,
            overlap: float | None = None, sw_batch_size: int | None = None, tta: bool | None = None,
            device: str | None = None, interpolation: str = "linear",
            progress: bool = True, postprocess: bool = True, save_probs: bool = False,
            modality: str | None = None) -> list[Path]:
    """Predict every volume under ``input`` and write ``out_dir/<case>.nii.gz`` (uint8).

    ``input``: a NIfTI file, a folder of NIfTI files, or a DICOM series folder. ``overlap`` and
    ``sw_batch_size`` default to the checkpoint config's ``eval`` section; ``tta`` averages
    the 8 flips (None: the config's ``eval.tta``); ``device`` ``"cpu"``, ``"cuda"`` or None
    (CUDA when available). ``postprocess``: apply the run's connected-component decision
    (``RUN/postprocessing.json``, carried in the checkpoint). ``save_probs``: also write
    ``out_dir/<case>_probs.npz`` (raw softmax, float16, in the input's geometry; see
    ``medseg_dpl.evaluation.probabilities``).
    ``interpolation``: ``"linear"`` resamples probabilities then takes the argmax,
    ``"nearest"`` picks the nearest preprocessed voxel. Returns the written paths.
    """
    lm = load_checkpoint_model(checkpoint, device)
    cases = find_inputs(input)
    out_dir = Path(out_dir)
    written = []
    for name, src in tqdm(cases, desc="predict", unit="case", disable=not progress):
        labels, affine, header, (probs, prep_affine) = predict_volume(
            lm, src, overlap, sw_batch_size, tta, interpolation, postprocess, keep_probs=True,
            modality=modality)
        written.append(write_labels(labels, affine, out_dir / f"{name}.nii.gz", header))
        if save_probs:
            from medseg_dpl.evaluation.probabilities import probs_on_grid, save_probs_npz
            save_probs_npz(out_dir / f"{name}_probs.npz",
                           probs_on_grid(probs, prep_affine, labels.shape, affine), affine)
        log.info("wrote %s", written[-1])
    return written


def iter_case_predictions(lm: LoadedModel, items: Iterable[tuple[str, np.ndarray, np.ndarray, dict]],
                          overlap=None, sw_batch_size=None, tta=False, interpolation="linear"):
    """For already preprocessed cases ``(id, image (x, y, z), prep_affine, case entry of
    dataset.json)`` yield ``(id, labels (X, Y, Z) uint8 on the case's original grid)``."""
    for cid, image, prep_affine, case in items:
        probs = infer_probs(lm, image, overlap, sw_batch_size, tta)
        yield cid, probs_to_original(probs, prep_affine, case["original"]["shape"],
                                     case["original"]["affine"], case, interpolation)
