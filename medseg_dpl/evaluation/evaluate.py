"""Scoring: a checkpoint on a split of PREP_DIR, or existing prediction files, per case and organ.

Scores are computed in the *original* label space (the source label files recorded in
``dataset.json``, at their own voxel spacing), with :func:`medseg_dpl.evaluation.metrics.organ_metrics`;
see that module for the empty-organ rules of each protocol.

Outputs in ``out_dir``:

* ``per_case.csv``: ``case, organ, dice, hd95, asd`` (Dice as a fraction; distances in mm for
  the standard protocol, in voxels for ``dhc``; NaN where an organ is absent in both maps);
  scoring a checkpoint, these are after the run's post-processing and ``dice_raw, hd95_raw,
  asd_raw`` follow with the raw prediction's scores;
* ``summary.json``: per organ ``{metric: {mean, std, n}}`` over cases, ``overall`` (``mean``:
  the mean of the per-organ means, the papers' "Avg"; ``std``: over cases of each case's
  organ average) and per-case averages; scoring a checkpoint also ``raw`` (the same three
  tables before post-processing) and ``postprocessing`` (applied or not, op per organ);
* ``results.md``: the papers' table (Avg Dice, Avg ASD, one Dice column per organ) and a
  per-organ Dice/HD95/ASD table;
* ``dice_per_organ.png`` (bars with std over cases) and ``overlays/<case>.png`` (axial slices,
  ground truth vs prediction).
"""
from __future__ import annotations

import csv
import json
import logging
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from medseg_dpl.data.labels import short_name
from medseg_dpl.evaluation.cases import EvalError, read_labels, resolve_path, split_cases, split_predictions
from medseg_dpl.evaluation.metrics import DHC_PENALTY, PROTOCOLS, organ_metrics
from medseg_dpl.evaluation.postprocess import apply_postprocessing
from medseg_dpl.evaluation.predict import load_checkpoint_model, write_labels
from medseg_dpl.utils import atomic_path, save_figure

log = logging.getLogger(__name__)

METRICS = ("dice", "hd95", "asd")
CSV_COLUMNS = ("case", "organ", "dice", "hd95", "asd")
RAW_COLUMNS = ("dice_raw", "hd95_raw", "asd_raw")  # checkpoint mode: before post-processing


# --------------------------------------------------------------------------- scoring
def score_case(case: str, pred: np.ndarray, truth: np.ndarray, organs: Sequence[str],
               spacing: Sequence[float], protocol: str = "standard") -> list[dict]:
    """Rows ``{case, organ, dice, hd95, asd}`` for one case; ``organs`` excludes background.

    ``pred``, ``truth``: ``(X, Y, Z)`` label maps on the same grid with voxel size ``spacing`` (mm).
    """
    m = organ_metrics(pred, truth, len(organs) + 1, spacing=spacing, protocol=protocol)
    return [{"case": case, "organ": o, **{k: float(m[k][i]) for k in METRICS}}
            for i, o in enumerate(organs)]


def _stats(values) -> dict:
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "n": int(v.size)}


def summarize(rows: list[dict], organs: Sequence[str], protocol: str = "standard",
              extra: dict | None = None) -> dict:
    """Aggregate per-case rows into the ``summary.json`` structure (NaN entries excluded)."""
    cases = list(dict.fromkeys(r["case"] for r in rows))
    table = {m: np.array([[np.nan] * len(organs) for _ in cases]) for m in METRICS}
    ci, oi = {c: i for i, c in enumerate(cases)}, {o: i for i, o in enumerate(organs)}
    for r in rows:
        for m in METRICS:
            table[m][ci[r["case"]], oi[r["organ"]]] = r[m]
    per_organ = {o: {m: _stats(table[m][:, j]) for m in METRICS} for j, o in enumerate(organs)}
    overall = {}
    for m in METRICS:
        organ_means = [per_organ[o][m]["mean"] for o in organs if per_organ[o][m]["mean"] is not None]
        with np.errstate(all="ignore"):
            case_means = np.array([np.nanmean(row) if np.isfinite(row).any() else np.nan
                                   for row in table[m]])
        overall[m] = {"mean": float(np.mean(organ_means)) if organ_means else None,
                      "std": _stats(case_means)["std"], "n_cases": len(cases)}
    per_case = {}
    for i, c in enumerate(cases):
        per_case[c] = {}
        for m in METRICS:
            row = table[m][i]
            per_case[c][m] = float(np.nanmean(row)) if np.isfinite(row).any() else None
    units = "voxel" if protocol == "dhc" else "mm"
    rules = ("absent in both: Dice 1, distances 0 (counted); absent in one: Dice 0, distances "
             f"{DHC_PENALTY:g} voxels; ASD directed pred->truth, HD95 medpy-style (pooled), voxel units"
             if protocol == "dhc" else
             "absent in both: NaN (excluded); absent in one: Dice 0, HD95 = ASD = image diagonal "
             "in mm; HD95 = max of directed 95th percentiles, ASD symmetric (MONAI)")
    out = {"protocol": protocol, "distance_units": units, "empty_organs": rules,
           "organs": list(organs), "num_cases": len(cases), "overall": overall,
           "per_organ": per_organ, "per_case": per_case}
    if extra:
        out.update(extra)
    return out


# --------------------------------------------------------------------------- reports
def _fmt(x, scale=1.0, digits=2):
    return "–" if x is None else f"{x * scale:.{digits}f}"


def markdown_table(summary: dict, method: str = "ours") -> str:
    """The DHC/MagicNet table layout: Method | Avg. Dice | Avg. ASD | one Dice column per organ.

    Dice in percent; ASD in the summary's units.
    """
    organs = summary["organs"]
    ov = summary["overall"]
    head = ["Method", "Avg. Dice (%)", f"Avg. ASD ({summary['distance_units']})"] + \
        [short_name(o) for o in organs]
    row = [method,
           f"{_fmt(ov['dice']['mean'], 100, 1)} ± {_fmt(ov['dice']['std'], 100, 1)}",
           f"{_fmt(ov['asd']['mean'])} ± {_fmt(ov['asd']['std'])}"] + \
        [_fmt(summary["per_organ"][o]["dice"]["mean"], 100, 1) for o in organs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), "| " + " | ".join(row) + " |"]
    u = summary["distance_units"]
    lines += ["", f"| Organ | Dice (%) | HD95 ({u}) | ASD ({u}) | n |", "|---|---|---|---|---|"]
    for o in organs:
        s = summary["per_organ"][o]
        lines.append(f"| {short_name(o)} | {_fmt(s['dice']['mean'], 100, 1)} ± {_fmt(s['dice']['std'], 100, 1)}"
                     f" | {_fmt(s['hd95']['mean'])} ± {_fmt(s['hd95']['std'])}"
                     f" | {_fmt(s['asd']['mean'])} ± {_fmt(s['asd']['std'])} | {s['dice']['n']} |")
    lines += ["", f"Protocol `{summary['protocol']}`: {summary['empty_organs']}. "
              f"{summary['num_cases']} cases; ± is the std over cases."]
    return "\n".join(lines) + "\n"


def plot_dice_bars(summary: dict, path: str | os.PathLike, title: str | None = None) -> Path:
    """Per-organ mean Dice with std-over-cases error bars -> PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    organs = summary["organs"]
    means = [summary["per_organ"][o]["dice"]["mean"] or 0.0 for o in organs]
    stds = [summary["per_organ"][o]["dice"]["std"] or 0.0 for o in organs]
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(organs) + 1.5), 3.2))
    ax.bar(range(len(organs)), means, yerr=stds, capsize=3, color="tab:blue")
    ax.set_xticks(range(len(organs)), [short_name(o) for o in organs], rotation=0)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("Dice")
    ax.set_title(title or f"Dice per organ (mean {_fmt(summary['overall']['dice']['mean'], 100, 1)}%)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def plot_overlay(path: str | os.PathLike, truth: np.ndarray, pred: np.ndarray,
                 image: np.ndarray | None = None, num_slices: int = 3, num_classes: int | None = None,
                 title: str = "", window: tuple[float, float] = (-175.0, 250.0),
                 affine: np.ndarray | None = None, class_names: Sequence[str] | None = None) -> Path:
    """Axial slices with ground truth (left) and prediction (right), ``(X, Y, Z)`` arrays.

    ``class_names`` (index = label, background first): a colour legend naming the classes
    that appear in the drawn slices.

    With ``affine`` the arrays are first reoriented to RAS (axis flips/permutations only) and
    drawn in the radiological convention (patient's right on the left, anterior up); without
    it, array axes are drawn as they are. Slices at 25/50/75 % of the ground truth's extent
    along Z (of the prediction's if the truth is empty). ``image`` (same grid, HU) is drawn
    beneath, windowed to ``window``.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if affine is not None:
        import nibabel as nib
        ornt = nib.orientations.io_orientation(np.asarray(affine, float))
        truth, pred = (nib.orientations.apply_orientation(a, ornt) for a in (truth, pred))
        if image is not None:
            image = nib.orientations.apply_orientation(image, ornt)
        truth, pred = truth[::-1], pred[::-1]  # radiological: patient's right on screen left
        image = None if image is None else image[::-1]

    fg = truth if truth.any() else pred
    zs = np.nonzero(fg.reshape(-1, fg.shape[2]).any(0))[0]
    if zs.size == 0:
        zs = np.arange(truth.shape[2])
    picks = sorted({int(zs[int(round(q * (zs.size - 1)))])
                    for q in np.linspace(0.25, 0.75, num_slices)})
    ncls = num_classes or int(max(truth.max(), pred.max())) + 1
    cmap = plt.get_cmap("tab20", max(ncls, 2))
    fig, axes = plt.subplots(len(picks), 2, figsize=(6, 3 * len(picks)), squeeze=False)
    for r, z in enumerate(picks):
        for c, (lab, name) in enumerate(((truth, "ground truth"), (pred, "prediction"))):
            ax = axes[r, c]
            if image is not None:  # x to the right, y up: transpose then flip for display
                ax.imshow(np.clip(image[:, :, z].T, *window), cmap="gray", origin="lower")
            sl = np.ma.masked_equal(lab[:, :, z].T, 0)
            ax.imshow(sl, cmap=cmap, vmin=0, vmax=max(ncls - 1, 1), alpha=0.5 if image is not None else 1.0,
                      origin="lower", interpolation="nearest")
            ax.set_title(f"{name}, z={z}", fontsize=9)
            ax.axis("off")
    legend_rows = 0
    if class_names is not None:
        from matplotlib.colors import Normalize
        from matplotlib.patches import Patch
        norm = Normalize(vmin=0, vmax=max(ncls - 1, 1))   # the mapping imshow used above
        shown = sorted({int(v) for a in (truth, pred) for z in picks for v in np.unique(a[:, :, z])} - {0})
        handles = [Patch(color=cmap(norm(i)), label=str(class_names[i]) if i < len(class_names) else str(i))
                   for i in shown]
        if handles:
            legend_rows = (len(handles) + 3) // 4
            fig.legend(handles=handles, loc="lower center", ncol=min(4, len(handles)), fontsize=7,
                       frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.035 * legend_rows / len(picks) * 3, 1, 1))
    return save_figure(fig, path, dpi=100)


def write_report(rows: list[dict], organs: Sequence[str], out_dir: str | os.PathLike,
                 protocol: str = "standard", method: str = "ours", extra: dict | None = None,
                 raw_rows: list[dict] | None = None) -> dict:
    """Write ``per_case.csv``, ``summary.json``, ``results.md``, ``dice_per_organ.png``; return the summary.

    ``raw_rows`` (same cases and organs as ``rows``, before post-processing): added as the
    ``dice_raw, hd95_raw, asd_raw`` columns and as ``summary["raw"]`` (``overall``,
    ``per_organ``, ``per_case``); ``rows`` stay the headline.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns = CSV_COLUMNS + (RAW_COLUMNS if raw_rows is not None else ())
    if raw_rows is not None:
        raw_by = {(r["case"], r["organ"]): r for r in raw_rows}
        rows_out = [{**r, **{f"{m}_raw": raw_by[(r["case"], r["organ"])][m] for m in METRICS}} for r in rows]
    else:
        rows_out = rows
    with atomic_path(out / "per_case.csv") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=columns)
            w.writeheader()
            for r in rows_out:
                w.writerow({k: (f"{r[k]:.6f}" if isinstance(r[k], float) else r[k]) for k in columns})
    extra = {"method": method, **(extra or {})}
    if raw_rows is not None:
        raw = summarize(raw_rows, organs, protocol)
        extra["raw"] = {k: raw[k] for k in ("overall", "per_organ", "per_case")}
    summary = summarize(rows, organs, protocol, extra)
    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(markdown_table(summary, method), encoding="utf-8")
    plot_dice_bars(summary, out / "dice_per_organ.png", title=f"{method}: Dice per organ")
    return summary


# --------------------------------------------------------------------------- from a checkpoint
def evaluate_checkpoint(checkpoint: str | os.PathLike, data_dir: str | os.PathLike,
                        out_dir: str | os.PathLike, split: str = "test",
                        overlap: float | None = None, sw_batch_size: int | None = None,
                        tta: bool | None = None, device: str | None = None,
                        protocol: str = "standard", save_predictions: bool = True,
                        num_overlays: int = 2, method: str | None = None,
                        interpolation: str = "linear", progress: bool = True,
                        postprocess: bool = True) -> dict:
    """Predict the cases of ``split`` and score them against their source labels.

    Each case's preprocessed image (``PREP_DIR/imagesTr``) is segmented by sliding windows, the
    probabilities are mapped back onto the original grid recorded in ``dataset.json``
    (``original.shape``/``affine``) and scored against ``source_label`` at its voxel spacing.
    ``postprocess``: apply the run's connected-component decision (the checkpoint's
    ``"postprocessing"``, written by ``postprocess_run``; none: the raw result); the
    headline scores are then post-processed and the raw ones are reported beside them
    (``dice_raw``... columns, ``summary["raw"]``). ``tta``: flip TTA (None: the checkpoint
    config's ``eval.tta``).
    Writes the report files (module docstring), ``predictions/<id>.nii.gz`` (post-processed, if
    ``save_predictions``) and ``overlays/<id>.png`` for the first ``num_overlays`` cases.
    Returns the summary dict (also ``summary.json``); ``method`` names the table row
    (default: the checkpoint config's method, else the run folder's name).
    """
    if protocol not in PROTOCOLS:
        raise EvalError(f"--protocol must be one of {PROTOCOLS}, got {protocol!r}")
    data_dir, out = Path(data_dir), Path(out_dir)
    lm = load_checkpoint_model(checkpoint, device)
    if tta is None:
        tta = bool((lm.config.get("eval") or {}).get("tta", False))
    decision = lm.postprocessing if postprocess else None
    classes = lm.classes
    organs = classes[1:]
    by_id = {c["id"]: c for c in split_cases(lm, checkpoint, data_dir, split)}

    rows, raw_rows = [], []
    for n, (cid, raw, truth, taff) in enumerate(split_predictions(
            lm, checkpoint, data_dir, split, overlap, sw_batch_size, tta, interpolation,
            progress=progress)):
        c = by_id[cid]
        spacing = np.linalg.norm(taff[:3, :3], axis=0)
        raw_rows += score_case(cid, raw, truth, organs, spacing, protocol)
        pred = apply_postprocessing(raw, decision) if decision else raw
        rows += (score_case(cid, pred, truth, organs, spacing, protocol)
                 if not np.array_equal(pred, raw) else [dict(r) for r in raw_rows[-len(organs):]])
        if save_predictions:
            write_labels(pred, np.asarray(c["original"]["affine"], float),
                         out / "predictions" / f"{cid}.nii.gz")
        if n < num_overlays:
            image = None
            src = c.get("source_image")
            if src and resolve_path(src, data_dir).exists():
                from medseg_dpl.data.io import read_image
                image = read_image(resolve_path(src, data_dir), dtype=np.float32)[0]
            # MR: the case's own body percentiles, not a HU window
            window = tuple(c["normalization"]["clip"]) if c.get("normalization") else (-175.0, 250.0)
            plot_overlay(out / "overlays" / f"{cid}.png", truth, pred, image,
                         num_classes=len(classes), title=f"case {cid}", affine=taff, window=window,
                         class_names=classes)
    if method is None:
        method = str(lm.config.get("method", {}).get("name") if isinstance(lm.config.get("method"), dict)
                     else lm.config.get("method") or Path(checkpoint).resolve().parent.parent.name)
    pp_info = {"applied": bool(decision),
               "organs": ({o: r["op"] + (f"@{r['min_fraction']:g}" if r["op"] == "remove_small" else "")
                           for o, r in decision["organs"].items()} if decision else None)}
    return write_report(rows, organs, out, protocol, method,
                        {"checkpoint": str(checkpoint), "data": str(data_dir), "split": split,
                         "tta": tta, "postprocessing": pp_info}, raw_rows=raw_rows)


# --------------------------------------------------------------------------- from files
_PREFIX = re.compile(r"^(label|labels|img|image|pred|prediction|seg|mask)[_-]?", re.IGNORECASE)


def _match_key(name: str) -> str:
    return _PREFIX.sub("", name)


def match_files(pred_dir: Path, label_dir: Path) -> list[tuple[str, Path, Path]]:
    """Pair each prediction file with its label file by case name (exact stem, else stem
    without a ``label``/``img``/``pred``... prefix: ``img0001`` ↔ ``label0001``).

    Predictions drive: every prediction needs a label (else :class:`EvalError`); label files
    without a prediction (e.g. the training cases of a full label folder) are not scored.
    """
    from medseg_dpl.data.io import list_nifti, nifti_stem
    for d in (pred_dir, label_dir):
        if not Path(d).is_dir():
            raise EvalError(f"{d}: not a folder")
    labels = {nifti_stem(p): p for p in list_nifti(label_dir)}
    preds = {nifti_stem(p): p for p in list_nifti(pred_dir)}
    if not preds:
        raise EvalError(f"{pred_dir}: no NIfTI prediction files")
    lkeys = {_match_key(k): p for k, p in labels.items()}
    pairs, missing = [], []
    for stem, pp in preds.items():
        lp = labels.get(stem) or lkeys.get(_match_key(stem))
        if lp is None:
            missing.append(pp.name)
        else:
            pairs.append((_match_key(stem) or stem, pp, lp))
    if missing:
        raise EvalError(f"{label_dir}: no label file for prediction(s) {', '.join(missing[:5])}"
                        f"{' ...' if len(missing) > 5 else ''} from {pred_dir}")
    if len(pairs) < len(labels):
        log.info("scoring %d of the %d label files in %s (those with a prediction)",
                 len(pairs), len(labels), label_dir)
    return pairs


def evaluate_predictions(pred_dir: str | os.PathLike, label_dir: str | os.PathLike,
                         out_dir: str | os.PathLike, classes: Sequence[str] | str | None = None,
                         protocol: str = "standard", num_overlays: int = 2,
                         image_dir: str | os.PathLike | None = None, method: str = "predictions",
                         progress: bool = True) -> dict:
    """Score existing prediction files against label files (same grids), write the report.

    ``classes``: class names with background first, a dataset name (``"synapse"``,
    ``"amos"``), a PREP_DIR whose ``dataset.json`` lists them, or None (``class_1 ...`` up to
    the largest label found). ``image_dir``: optional CT volumes (same case names) drawn under
    the overlays. Spacing is read from each label file's affine.
    """
    from medseg_dpl.data.labels import DATASET_CLASSES

    if protocol not in PROTOCOLS:
        raise EvalError(f"--protocol must be one of {PROTOCOLS}, got {protocol!r}")
    pairs = match_files(Path(pred_dir), Path(label_dir))
    loaded = None
    if classes is None:  # need the largest label first
        loaded = [(k, *read_labels(pp), *read_labels(lp)) for k, pp, lp in pairs]
        top = max(max(int(p.max()), int(t.max())) for _, p, _, t, _ in loaded)
        names = ["background"] + [f"class_{i}" for i in range(1, top + 1)]
    elif isinstance(classes, str) and classes in DATASET_CLASSES:
        names = list(DATASET_CLASSES[classes])
    elif isinstance(classes, (str, os.PathLike)):
        from medseg_dpl.data.manifest import load_manifest
        names = list(load_manifest(classes)["classes"])
    else:
        names = list(classes)
    organs = names[1:]
    rows = []
    it = loaded if loaded is not None else ((k, *read_labels(pp), *read_labels(lp)) for k, pp, lp in pairs)
    for n, (key, pred, paff, truth, taff) in enumerate(tqdm(it, total=len(pairs), desc="eval", unit="case",
                                                            disable=not progress)):
        pp, lp = pairs[n][1], pairs[n][2]
        if pred.shape != truth.shape:
            raise EvalError(f"{pp}: shape {pred.shape} differs from label {lp} shape {truth.shape}")
        if not np.allclose(paff, taff, atol=1e-3):
            log.warning("%s: affine differs from %s; scoring voxel-wise anyway", pp, lp)
        if max(int(pred.max()), int(truth.max())) >= len(names):
            raise EvalError(f"{pp if pred.max() >= len(names) else lp}: label "
                            f"{max(int(pred.max()), int(truth.max()))} beyond the {len(names)} classes")
        rows += score_case(key, pred, truth, organs, np.linalg.norm(taff[:3, :3], axis=0), protocol)
        if n < num_overlays:
            image = None
            if image_dir is not None:
                from medseg_dpl.data.io import list_nifti, nifti_stem, read_image
                cands = [p for p in list_nifti(image_dir) if _match_key(nifti_stem(p)) == key]
                if cands:
                    image = read_image(cands[0], dtype=np.float32)[0]
            plot_overlay(Path(out_dir) / "overlays" / f"{key}.png", truth, pred, image,
                         num_classes=len(names), title=f"case {key}", affine=taff, class_names=names)
    return write_report(rows, organs, out_dir, protocol, method,
                        {"pred_dir": str(pred_dir), "label_dir": str(label_dir)})
