"""Atlas baseline (no learning): the honest floor of a segmentation benchmark (issue 9).

Every test case gets the label map of *one* labeled training case, shifted so that the centres
of the two bodies' bounding boxes coincide. The labeled case used is the one whose map scores
the best mean organ Dice on the eval split. A benchmark in which this matches a trained network
measures anatomy that hardly varies between patients, not learning.

Body bounding box: the box of the largest connected component of voxels above the clip floor
(:data:`BODY_LEVEL` of the [0, 1] intensity scale: ~-166 HU at the default clip [-175, 250]),
found on the *preprocessed* image. Why: after prep's clip, air and lung sit exactly at 0 and fat
(~-100 HU) is well above the level, so the box is the skin surface; the largest component leaves
out a scanner table or stray voxels, as prep's own body crop does. The prep crop box itself is
not used because it carries a margin that is cut off wherever the body touches the edge of the
field of view, which moves its centre. Craniocaudally the body fills the scan, so the z-centre
is the scan's centre. Non-CT (MR) preps, or an image with no voxel above the level, fall back to
the whole preprocessed grid (prep has already cropped it to the body).

Geometry: the shifted map lives on the test case's preprocessed grid; with ``geometry=
"original"`` (default) it is mapped back onto the source label's voxels with
:func:`medseg_dpl.data.preprocess.restore_to_original` and scored against the source label at
its own spacing, exactly as :func:`medseg_dpl.evaluation.evaluate.evaluate_checkpoint` scores a
network, so the rows are comparable. ``geometry="prep"`` scores against ``PREP/labelsTr`` on the
preprocessed grid instead (cheaper; no source files needed).

Outputs in ``out_dir``: ``per_case.csv``, ``summary.json``, ``results.md``,
``dice_per_organ.png`` written by :func:`~medseg_dpl.evaluation.evaluate.write_report` (same
format as ``medseg-dpl eval``), method ``atlas``; ``summary.json`` also holds the chosen
``atlas_case`` and every candidate's eval Dice.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from medseg_dpl.evaluation.cases import EvalError, read_labels, resolve_path
from medseg_dpl.evaluation.evaluate import plot_overlay, score_case, write_report
from medseg_dpl.evaluation.metrics import PROTOCOLS, dice_per_class

log = logging.getLogger(__name__)

__all__ = ["BODY_LEVEL", "GEOMETRIES", "body_box", "body_centre", "shift_labels", "atlas_predict",
           "select_atlas", "evaluate_atlas"]

BODY_LEVEL = 0.02          # fraction of the CT clip range: just above the clip floor (air, lung)
GEOMETRIES = ("original", "prep")


# --------------------------------------------------------------------------- alignment
def body_box(image: np.ndarray, level: float | None = BODY_LEVEL) -> np.ndarray:
    """Half-open box ``[[x0, x1], [y0, y1], [z0, z1]]`` (int, (3, 2)) of the body in ``image``.

    ``image``: (X, Y, Z) preprocessed intensities. The largest 6-connected component of
    ``image > level``; the whole grid when ``level`` is None or nothing exceeds it.
    """
    full = np.array([[0, n] for n in image.shape])
    if level is None:
        return full
    mask = image > level
    lab, n = ndimage.label(mask)
    if n == 0:
        return full
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    k = int(np.argmax(sizes))
    sl = ndimage.find_objects(lab, max_label=k)[k - 1]
    return np.array([[s.start, s.stop] for s in sl])


def body_centre(image: np.ndarray, level: float | None = BODY_LEVEL) -> np.ndarray:
    """Centre (3,) float, in voxel indices, of :func:`body_box` (the mid-point of its end voxels)."""
    box = body_box(image, level)
    return (box[:, 0] + box[:, 1] - 1) / 2.0


def shift_labels(label: np.ndarray, src_centre: np.ndarray, dst_centre: np.ndarray,
                 dst_shape: Sequence[int]) -> np.ndarray:
    """Place ``label`` (X, Y, Z) on a ``dst_shape`` grid (same spacing) so that ``src_centre``
    lands on ``dst_centre`` (voxel indices, rounded to a whole-voxel shift: a label map is not
    interpolated). Voxels that fall outside are dropped; uncovered ones are background (0)."""
    shift = np.round(np.asarray(dst_centre, float) - np.asarray(src_centre, float)).astype(int)
    out = np.zeros(tuple(int(n) for n in dst_shape), dtype=label.dtype)
    src, dst = [], []
    for s, n_src, n_dst in zip(shift, label.shape, out.shape):
        lo, hi = max(0, -s), min(n_src, n_dst - s)      # source range that lands inside
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo + s, hi + s))
    out[tuple(dst)] = label[tuple(src)]
    return out


# --------------------------------------------------------------------------- the prep folder
class _Prep:
    """Cached access to a PREP_DIR's cases: prep image/label, body centre, scoring truth."""

    def __init__(self, prep_dir: str | os.PathLike, geometry: str = "original"):
        from medseg_dpl.data.manifest import load_manifest

        if geometry not in GEOMETRIES:
            raise EvalError(f"geometry must be one of {GEOMETRIES}, got {geometry!r}")
        self.dir = Path(prep_dir)
        self.manifest = load_manifest(self.dir)
        self.geometry = geometry
        self.classes = list(self.manifest["classes"])
        self.by_id = {c["id"]: c for c in self.manifest["cases"]}
        intensity = self.manifest.get("intensity") or {}
        # the level is a fraction of the CT clip range; other modalities: the prep crop itself
        self.level = BODY_LEVEL if intensity.get("modality", "ct") == "ct" else None
        self._centres: dict[str, np.ndarray] = {}
        self._labels: dict[str, np.ndarray] = {}
        self._truth: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def case(self, cid: str) -> dict:
        if cid not in self.by_id:
            raise EvalError(f"{self.dir / 'dataset.json'}: no case {cid!r}")
        return self.by_id[cid]

    def _load(self, rel: str, dtype) -> np.ndarray:
        import nibabel as nib
        return np.asarray(nib.load(str(self.dir / rel)).dataobj, dtype=dtype)

    def centre(self, cid: str) -> np.ndarray:
        if cid not in self._centres:
            self._centres[cid] = body_centre(self._load(self.case(cid)["image"], np.float32), self.level)
        return self._centres[cid]

    def label(self, cid: str) -> np.ndarray:
        """The prep label map (X', Y', Z') uint8 of a labeled case."""
        if cid not in self._labels:
            rel = self.case(cid).get("label")
            if not rel:
                raise EvalError(f"{self.dir / 'dataset.json'}: case {cid} has no label to use as an atlas")
            self._labels[cid] = self._load(rel, np.uint8)
        return self._labels[cid]

    def truth(self, cid: str) -> tuple[np.ndarray, np.ndarray]:
        """The map to score against and its voxel spacing (3,) mm, in ``self.geometry``."""
        if cid not in self._truth:
            c = self.case(cid)
            if self.geometry == "prep":
                self._truth[cid] = (self.label(cid), np.asarray(c["spacing"], float))
            else:
                if not c.get("source_label"):
                    raise EvalError(f"{self.dir / 'dataset.json'}: case {cid} has no source_label to score against")
                arr, aff = read_labels(resolve_path(c["source_label"], self.dir))
                self._truth[cid] = (arr, np.linalg.norm(aff[:3, :3], axis=0))
        return self._truth[cid]

    def predict(self, atlas_id: str, cid: str) -> np.ndarray:
        """The atlas's label map aligned onto case ``cid``, in ``self.geometry``."""
        c = self.case(cid)
        pred = shift_labels(self.label(atlas_id), self.centre(atlas_id), self.centre(cid), c["shape"])
        if self.geometry == "original":
            from medseg_dpl.data.preprocess import restore_to_original
            pred = restore_to_original(pred, c)
        return pred


def _ids(prep_dir: Path, ids: Sequence[str] | str) -> list[str]:
    """A list of case ids, or the name of a split list in ``PREP/splits``."""
    if isinstance(ids, str):
        from medseg_dpl.data.manifest import read_split
        return read_split(prep_dir, ids)
    return [str(i) for i in ids]


# --------------------------------------------------------------------------- API
def atlas_predict(prep_dir: str | os.PathLike, atlas_id: str, case_id: str,
                  geometry: str = "prep") -> np.ndarray:
    """Labeled case ``atlas_id``'s label map aligned (body-box centres) onto case ``case_id``.

    Returns (X', Y', Z') uint8 on ``case_id``'s preprocessed grid (``geometry="prep"``) or on its
    source image's voxels (``"original"``).
    """
    return _Prep(prep_dir, geometry).predict(atlas_id, case_id)


def _select(prep: _Prep, labeled: list[str], evals: list[str]) -> tuple[str, dict[str, float]]:
    n = len(prep.classes)
    scores = {}
    for a in labeled:
        dice = np.array([dice_per_class(prep.predict(a, e), prep.truth(e)[0], n) for e in evals])
        with warnings.catch_warnings():                     # an organ absent in every eval case
            warnings.simplefilter("ignore", RuntimeWarning)
            organ_means = np.nanmean(dice, axis=0)          # summary.json's "overall" definition
        scores[a] = float(np.nanmean(organ_means)) if np.isfinite(organ_means).any() else float("nan")
    finite = {a: s for a, s in scores.items() if np.isfinite(s)}
    best = max(finite, key=finite.get) if finite else labeled[0]   # ties: the first listed
    return best, scores


def select_atlas(prep_dir: str | os.PathLike, labeled_ids: Sequence[str] | str,
                 eval_ids: Sequence[str] | str, geometry: str = "original") -> tuple[str, dict[str, float]]:
    """The labeled case whose aligned label map has the best mean organ Dice on ``eval_ids``.

    ``labeled_ids``, ``eval_ids``: case ids, or split names (``"labeled_20p"``, ``"eval"``).
    Returns ``(chosen id, {labeled id: mean organ Dice on eval})``; the mean is that of
    ``summary.json`` (over organs of the per-organ means over cases).
    """
    prep = _Prep(prep_dir, geometry)
    labeled, evals = _ids(prep.dir, labeled_ids), _ids(prep.dir, eval_ids)
    if not labeled or not evals:
        raise EvalError("atlas selection needs at least one labeled and one eval case")
    return _select(prep, labeled, evals)


def evaluate_atlas(prep_dir: str | os.PathLike, labeled_ids: Sequence[str] | str,
                   eval_ids: Sequence[str] | str, test_ids: Sequence[str] | str,
                   out_dir: str | os.PathLike, protocol: str = "standard", geometry: str = "original",
                   method: str = "atlas", num_overlays: int = 0, save_predictions: bool = False) -> dict:
    """Choose the atlas on ``eval_ids``, score it on ``test_ids``, write the eval report.

    Ids: lists of case ids or split names. Writes ``out_dir/{per_case.csv, summary.json,
    results.md, dice_per_organ.png}`` like ``medseg-dpl eval`` (plus ``predictions/<id>.nii.gz``
    in the source geometry if ``save_predictions``, ``overlays/`` for ``num_overlays`` cases).
    Returns the summary dict.
    """
    if protocol not in PROTOCOLS:
        raise EvalError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    prep = _Prep(prep_dir, geometry)
    labeled, evals, tests = (_ids(prep.dir, x) for x in (labeled_ids, eval_ids, test_ids))
    if not labeled or not evals or not tests:
        raise EvalError("the atlas baseline needs labeled, eval and test cases")
    chosen, scores = _select(prep, labeled, evals)
    log.info("atlas: case %s (mean eval Dice %.3f of %d candidates)", chosen, scores[chosen], len(scores))
    out = Path(out_dir)
    organs = prep.classes[1:]
    rows = []
    for n, cid in enumerate(tests):
        pred = prep.predict(chosen, cid)
        truth, spacing = prep.truth(cid)
        rows += score_case(cid, pred, truth, organs, spacing, protocol)
        if save_predictions and geometry == "original":
            from medseg_dpl.evaluation.predict import write_labels
            write_labels(pred, np.asarray(prep.case(cid)["original"]["affine"], float),
                         out / "predictions" / f"{cid}.nii.gz")
        if n < num_overlays:
            plot_overlay(out / "overlays" / f"{cid}.png", truth, pred, num_classes=len(prep.classes),
                         title=f"atlas {chosen} -> case {cid}", class_names=prep.classes)
    extra = {"data": str(prep.dir), "split": "test", "atlas_case": chosen,
             "atlas_selection": {"eval_ids": evals, "mean_dice": scores},
             "alignment": "body bounding-box centre (whole-voxel shift on the preprocessed grid)",
             "geometry": geometry}
    return write_report(rows, organs, out, protocol, method, extra)
