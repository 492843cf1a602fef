"""Connected-component post-processing decided per organ on the eval split (nnU-Net's rule).

A raw prediction often carries small organ-coloured blobs far from the organ. Two operations
per organ ``c`` (removed voxels become background):

* ``keep_largest``: only the largest connected component of ``c`` stays (MONAI's
  ``KeepLargestConnectedComponent``);
* ``remove_small``: components smaller than ``min_fraction`` × the largest one are dropped
  (keeps an organ that is legitimately in several large pieces).

:func:`determine_postprocessing` scores every operation on eval predictions against their
ground truth and enables, per organ, the one with the highest mean Dice *only if it raises* that
organ's mean Dice (a tie keeps the raw output), as nnU-Net's ``determine_postprocessing``.
Connectivity is the full 26-neighbourhood (MONAI's default, nnU-Net v2's).

This module holds the operations and the rule only (it reads label maps, never a checkpoint
or a PREP_DIR). :func:`medseg_dpl.evaluation.run_postprocess.postprocess_run` does it for a
training run: predict the eval split with ``RUN/checkpoints/best.pt``, decide, write
``RUN/postprocessing.json`` and add the decision to ``RUN/checkpoints/{best,last}.pt`` (key
``"postprocessing"``) so that ``eval`` and ``predict`` apply it by default. The decision file::

    {"format": "medseg-dpl-postprocessing", "version": 1, "connectivity": 3,
     "classes": [...], "organs": {"liver": {"label": 1, "op": "keep_largest" | "remove_small" | "none",
     "min_fraction": null | 0.1, "dice_raw": ..., "dice": ..., "candidates": {...}, "n": ...}, ...},
     "dice_raw_mean": ..., "dice_mean": ..., + where it was decided (checkpoint, data, split, cases, tta)}
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from medseg_dpl.errors import MedsegError

FORMAT = "medseg-dpl-postprocessing"
CONNECTIVITY = 3                     # 26-neighbourhood in 3D
DEFAULT_FRACTIONS = (0.1, 0.25)      # candidate min_fraction values of ``remove_small``
OPS = ("none", "keep_largest", "remove_small")


class PostprocessError(MedsegError, RuntimeError):
    """A bad decision file/record or a run that cannot be post-processed; names the file."""


# --------------------------------------------------------------------------- operations
def _bbox(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box of a ``(X, Y, Z)`` boolean mask (None if empty): components never leave it,
    so labelling the box instead of the whole volume is exact and much faster on CT."""
    box = []
    for ax in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != ax)))
        if hit.size == 0:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def keep_largest(labelmap: np.ndarray, label: int, connectivity: int = CONNECTIVITY) -> np.ndarray:
    """``(X, Y, Z)`` label map -> copy where only the largest component of ``label`` is kept."""
    from monai.transforms import KeepLargestConnectedComponent

    out = np.array(labelmap, copy=True)
    box = _bbox(out == label)
    if box is None:
        return out
    crop = out[box]
    kept = KeepLargestConnectedComponent(applied_labels=[int(label)], is_onehot=False,
                                         connectivity=connectivity)(crop[None])
    kept = kept.numpy() if hasattr(kept, "numpy") else np.asarray(kept)  # MONAI returns a MetaTensor
    out[box] = kept[0].astype(out.dtype, copy=False)
    return out


def remove_small(labelmap: np.ndarray, label: int, min_fraction: float,
                 connectivity: int = CONNECTIVITY) -> np.ndarray:
    """``(X, Y, Z)`` label map -> copy without the components of ``label`` whose voxel count is
    below ``min_fraction`` × that of its largest component."""
    from skimage.measure import label as cc_label  # the labeller MONAI's transform uses on CPU

    out = np.array(labelmap, copy=True)
    box = _bbox(out == label)
    if box is None:
        return out
    crop = out[box]
    comps = cc_label(crop == label, connectivity=connectivity)
    sizes = np.bincount(comps.ravel())
    sizes[0] = 0
    small = sizes < min_fraction * sizes.max()
    small[0] = False
    crop[small[comps]] = 0
    return out


def _apply_op(labelmap: np.ndarray, label: int, op: str, min_fraction, connectivity: int) -> np.ndarray:
    if op == "keep_largest":
        return keep_largest(labelmap, label, connectivity)
    if op == "remove_small":
        return remove_small(labelmap, label, float(min_fraction), connectivity)
    return labelmap


def apply_postprocessing(labelmap: np.ndarray, decision: dict | None) -> np.ndarray:
    """Apply a decision (:func:`determine_postprocessing`) to a ``(X, Y, Z)`` integer label map.

    Returns a new label map of the same shape and dtype; organs whose ``op`` is ``"none"`` and
    ``decision=None`` leave it unchanged (a copy is still returned).
    """
    out = np.array(labelmap, copy=True)
    if not decision:
        return out
    validate_decision(decision)
    conn = int(decision.get("connectivity", CONNECTIVITY))
    for rule in sorted(decision["organs"].values(), key=lambda r: int(r["label"])):
        out = _apply_op(out, int(rule["label"]), rule["op"], rule.get("min_fraction"), conn)
    return out


def validate_decision(decision, source: str = "post-processing decision") -> dict:
    """Raise :class:`PostprocessError` naming ``source`` unless ``decision`` is well formed."""
    if not isinstance(decision, dict) or decision.get("format") != FORMAT or \
            not isinstance(decision.get("organs"), dict):
        raise PostprocessError(f"{source}: not a medseg-dpl post-processing decision "
                               f"(expected 'format': {FORMAT!r} and an 'organs' table)")
    for organ, rule in decision["organs"].items():
        if not isinstance(rule, dict) or rule.get("op") not in OPS or not isinstance(rule.get("label"), int):
            raise PostprocessError(f"{source}: organ {organ!r}: needs an integer 'label' and 'op' in {OPS}")
        if rule["op"] == "remove_small" and not (isinstance(rule.get("min_fraction"), (int, float))
                                                 and 0 < rule["min_fraction"] <= 1):
            raise PostprocessError(f"{source}: organ {organ!r}: remove_small needs 0 < min_fraction <= 1")
    return decision


# --------------------------------------------------------------------------- deciding
def _dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks; NaN when both are empty (excluded from the mean, as in eval)."""
    s = int(a.sum()) + int(b.sum())
    return float("nan") if s == 0 else 2.0 * int(np.logical_and(a, b).sum()) / s


def _candidates(fractions: Sequence[float]) -> list[tuple[str, str, float | None]]:
    return [("keep_largest", "keep_largest", None)] + \
        [(f"remove_small@{f:g}", "remove_small", float(f)) for f in fractions]


def case_dice_table(pred: np.ndarray, truth: np.ndarray, num_classes: int,
                    fractions: Sequence[float] = DEFAULT_FRACTIONS,
                    connectivity: int = CONNECTIVITY) -> dict[int, dict[str, float]]:
    """Per organ label ``1..C-1``: Dice of the raw ``(X, Y, Z)`` prediction (key ``"none"``)
    and after each candidate operation. Operations on organ ``c`` only move ``c``'s voxels to
    background, so organ ``c``'s Dice is all that can change."""
    if pred.shape != truth.shape:
        raise PostprocessError(f"prediction shape {pred.shape} differs from ground truth {truth.shape}")
    table = {}
    for c in range(1, num_classes):
        t = truth == c
        row = {"none": _dice(pred == c, t)}
        for key, op, frac in _candidates(fractions):
            row[key] = _dice(_apply_op(pred, c, op, frac, connectivity) == c, t)
        table[c] = row
    return table


def decide(tables: Iterable[dict[int, dict[str, float]]], classes: Sequence[str],
           fractions: Sequence[float] = DEFAULT_FRACTIONS, connectivity: int = CONNECTIVITY) -> dict:
    """The decision from per-case tables (:func:`case_dice_table`): per organ the candidate with
    the best mean Dice over cases, enabled only where it beats the raw mean Dice."""
    tables = list(tables)
    cands = _candidates(fractions)
    organs, raw_means, pp_means = {}, [], []
    for c in range(1, len(classes)):
        means = {}
        for key in ["none"] + [k for k, _, _ in cands]:
            v = np.array([t[c][key] for t in tables], float)
            v = v[np.isfinite(v)]
            means[key] = float(v.mean()) if v.size else None
        n = int(np.isfinite([t[c]["none"] for t in tables]).sum()) if tables else 0
        op, frac, best = "none", None, means["none"]
        if best is not None:
            for key, cop, cfrac in cands:  # first best wins a tie: keep_largest, then fractions
                if means[key] is not None and means[key] > best + 1e-12:
                    op, frac, best = cop, cfrac, means[key]
        organs[classes[c]] = {"label": c, "op": op, "min_fraction": frac, "dice_raw": means["none"],
                              "dice": best, "candidates": {k: means[k] for k, _, _ in cands}, "n": n}
        if means["none"] is not None:
            raw_means.append(means["none"])
            pp_means.append(best)
    return {"format": FORMAT, "version": 1, "connectivity": connectivity,
            "fractions": [float(f) for f in fractions], "classes": list(classes), "organs": organs,
            "num_cases": len(tables),
            "dice_raw_mean": float(np.mean(raw_means)) if raw_means else None,
            "dice_mean": float(np.mean(pp_means)) if pp_means else None}


def determine_postprocessing(preds: Sequence[np.ndarray], truths: Sequence[np.ndarray], num_classes: int,
                             classes: Sequence[str] | None = None,
                             fractions: Sequence[float] = DEFAULT_FRACTIONS,
                             connectivity: int = CONNECTIVITY) -> dict:
    """Decide the post-processing from eval predictions and their ground truth.

    ``preds``, ``truths``: one ``(X, Y, Z)`` integer label map per case (each pair on one grid;
    0 is background). ``classes``: names of the ``num_classes`` labels (default ``class_<i>``).
    Returns the decision dict (module docstring) for :func:`apply_postprocessing`.
    """
    if len(preds) != len(truths):
        raise PostprocessError(f"{len(preds)} predictions but {len(truths)} ground-truth maps")
    names = list(classes) if classes is not None else [f"class_{i}" for i in range(num_classes)]
    if len(names) != num_classes:
        raise PostprocessError(f"{len(names)} class names for {num_classes} classes")
    tables = (case_dice_table(np.asarray(p), np.asarray(t), num_classes, fractions, connectivity)
              for p, t in zip(preds, truths))
    return decide(tables, names, fractions, connectivity)


def describe(decision: dict) -> str:
    """One line per organ: the chosen operation and its eval Dice before/after."""
    def pct(x):
        return "–" if x is None else f"{100 * x:.1f}"
    lines = []
    for organ, r in decision["organs"].items():
        op = r["op"] + (f" (< {r['min_fraction']:g} x largest)" if r["op"] == "remove_small" else "")
        lines.append(f"{organ:>24}: {op:<30} Dice {pct(r['dice_raw'])} -> {pct(r['dice'])}  (n={r['n']})")
    lines.append(f"{'mean':>24}: {'':<30} Dice {pct(decision['dice_raw_mean'])} -> {pct(decision['dice_mean'])}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- loading
def load_decision(path: str | os.PathLike) -> dict:
    """Read and validate a ``postprocessing.json``."""
    p = Path(path)
    try:
        decision = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PostprocessError(f"{p}: post-processing file not found") from None
    except (OSError, ValueError) as exc:
        raise PostprocessError(f"{p}: cannot read post-processing decision ({exc})") from exc
    return validate_decision(decision, str(p))


def decision_for_checkpoint(checkpoint: str | os.PathLike, ckpt: dict | None = None) -> dict | None:
    """The decision a loaded checkpoint dict carries (key ``"postprocessing"``), else None.

    Only the checkpoint counts, not a ``postprocessing.json`` lying beside it: that file may be
    left from an earlier run in the same folder (``postprocess_run`` writes both)."""
    if ckpt is not None and ckpt.get("postprocessing"):
        return validate_decision(ckpt["postprocessing"], f"{checkpoint} ['postprocessing']")
    return None
