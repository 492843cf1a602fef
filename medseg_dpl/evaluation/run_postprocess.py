"""A run's post-processing: decide it on the eval split and store it with the run.

The step ``medseg-dpl postprocess`` and the end of ``train`` (``eval.postprocess``) run: the
eval split is predicted as ``eval`` predicts it (:mod:`medseg_dpl.evaluation.cases`), the
per-organ rule is decided by :mod:`medseg_dpl.evaluation.postprocess`, and the decision is
written to ``RUN/postprocessing.json`` and into ``RUN/checkpoints/{best,last}.pt``, where
``eval``, ``predict`` and ``export`` read it.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Sequence

from medseg_dpl.checkpoint import CheckpointError, update_checkpoint
from medseg_dpl.evaluation.cases import split_predictions
from medseg_dpl.evaluation.postprocess import (DEFAULT_FRACTIONS, PostprocessError, case_dice_table,
                                               decide, describe)
from medseg_dpl.evaluation.predict import load_checkpoint_model
from medseg_dpl.utils import atomic_path

log = logging.getLogger(__name__)


def _run_paths(run: str | os.PathLike) -> tuple[Path, Path]:
    """(RUN dir, checkpoint to decide with) from a RUN dir or a checkpoint inside it."""
    p = Path(run)
    if p.is_file():
        if p.parent.name != "checkpoints":
            raise PostprocessError(f"{p}: expected RUN/checkpoints/<name>.pt or a RUN folder")
        return p.parent.parent, p
    for name in ("best.pt", "last.pt"):
        if (p / "checkpoints" / name).is_file():
            return p, p / "checkpoints" / name
    raise PostprocessError(f"{p}: no checkpoints/best.pt or checkpoints/last.pt (not a training run?)")


def _store_in_checkpoint(path: Path, decision: dict) -> None:
    """Add ``decision`` under ``"postprocessing"`` to a checkpoint, atomically."""
    try:
        update_checkpoint(path, postprocessing=decision)
    except CheckpointError as exc:  # names the file and the cause
        raise PostprocessError(str(exc)) from None


def postprocess_run(run: str | os.PathLike, data_dir: str | os.PathLike | None = None,
                    split: str | None = None, device=None, tta: bool | None = None,
                    fractions: Sequence[float] = DEFAULT_FRACTIONS, progress: bool = True) -> dict:
    """Decide a run's post-processing on its eval split and store it with the run.

    ``run``: a RUN folder (decides with ``checkpoints/best.pt``, else ``last.pt``) or one of its
    checkpoints. ``data_dir``/``split`` default to the run config's ``data.root`` and
    ``data.eval_split``; ``tta`` to its ``eval.tta``. Cases are predicted exactly as ``eval``
    does (original geometry, scored against ``source_label``; cases without one are scored on
    the preprocessed grid against their prepped label). Writes ``RUN/postprocessing.json`` and
    adds the decision to ``RUN/checkpoints/best.pt`` and ``last.pt``. Returns the decision.
    """
    run_dir, ckpt_path = _run_paths(run)
    lm = load_checkpoint_model(ckpt_path, device)
    dcfg = lm.config.get("data", {}) or {}
    data_dir = Path(data_dir or dcfg.get("root") or "")
    if not (data_dir / "dataset.json").is_file():
        raise PostprocessError(f"{data_dir / 'dataset.json'}: not found (give --data PREP_DIR)")
    split = split or dcfg.get("eval_split") or "eval"
    if tta is None:
        tta = bool((lm.config.get("eval") or {}).get("tta", False))
    tables, ids = [], []
    for cid, pred, truth, _affine in split_predictions(lm, ckpt_path, data_dir, split, tta=tta,
                                                       allow_prep_labels=True, progress=progress,
                                                       desc=f"postprocess {split}"):
        tables.append(case_dice_table(pred, truth, len(lm.classes), fractions))
        ids.append(cid)
    if not ids:
        raise PostprocessError(f"{data_dir}/splits/{split}.txt: no cases to decide on")
    decision = decide(tables, lm.classes, fractions)
    decision.update({"checkpoint": str(ckpt_path), "data": str(data_dir), "split": split,
                     "cases": ids, "tta": bool(tta)})
    with atomic_path(run_dir / "postprocessing.json") as tmp:
        tmp.write_text(json.dumps(decision, indent=1), encoding="utf-8")
    for name in ("best.pt", "last.pt"):
        if (run_dir / "checkpoints" / name).is_file():
            _store_in_checkpoint(run_dir / "checkpoints" / name, decision)
    log.info("post-processing decided on %d %s case(s):\n%s", len(ids), split, describe(decision))
    return decision
