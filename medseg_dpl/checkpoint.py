"""The one place checkpoints are written and read.

A checkpoint is a ``torch.save`` dict of plain types (loadable with ``weights_only=True``):

- ``format_version`` (:data:`FORMAT_VERSION`) and ``kind``: ``segmentation`` (``medseg-dpl
  train``) or ``classification`` (``medseg-dpl classify``);
- ``config`` (the merged config), ``model`` (the inference network's state dict), ``step``,
  ``best_metric``;
- segmentation: ``dataset`` (classes, spacing, orientation, intensity record), the trained
  networks by name (``student``, ``student2``), ``teacher``, ``optimizer``, ``scaler``,
  ``method`` (q̂, π, class weights), ``rng``, ``best_step`` and, once decided,
  ``postprocessing``; classification: ``classes``.

Checkpoints written before ``format_version`` existed are read as version 0; their kind is
inferred (a ``dataset`` record: segmentation; ``classes`` only: classification).
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from medseg_dpl.errors import MedsegError
from medseg_dpl.utils import atomic_path

FORMAT_VERSION = 1
KINDS = ("segmentation", "classification")
REQUIRED = {"segmentation": ("config", "model", "dataset"), "classification": ("config", "model", "classes")}
_WRITER = {"segmentation": "medseg-dpl train", "classification": "medseg-dpl classify"}


class CheckpointError(MedsegError, RuntimeError):
    """A checkpoint that is missing, unreadable, of another kind or version, or incomplete."""


def plain(x):
    """numpy scalars -> python numbers, tuples -> lists (``weights_only=True`` loads them)."""
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def save_checkpoint(path: str | os.PathLike, state: dict, kind: str) -> Path:
    """Write ``state`` (see the module doc) as a ``kind`` checkpoint, atomically."""
    if kind not in KINDS:
        raise ValueError(f"checkpoint kind: expected one of {KINDS}, got {kind!r}")
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(plain({**state, "format_version": FORMAT_VERSION, "kind": kind}), tmp)
    return path


def checkpoint_kind(ckpt: dict) -> str | None:
    """The kind a checkpoint dict declares, or infers for version 0; None if neither."""
    if "kind" in ckpt:
        return ckpt["kind"]
    if "dataset" in ckpt:
        return "segmentation"
    if "classes" in ckpt:
        return "classification"
    return None


def _unreadable(path: Path, exc: Exception) -> str:
    import zipfile

    with open(path, "rb") as f:
        head = f.read(2)
    if head != b"PK":  # torch.save writes a zip archive
        return "not a torch checkpoint (the file is not a zip archive)"
    if not zipfile.is_zipfile(path):
        return "truncated or corrupt file (its zip archive is broken)"
    return str(exc)


def load_checkpoint(path: str | os.PathLike, kind: str = "segmentation",
                    map_location="cpu") -> dict:
    """Read a ``kind`` checkpoint (``weights_only``). Raises :class:`CheckpointError`, naming the
    file and the cause: not found, unreadable, another kind (named by the verb that writes it),
    a newer format, or a required key missing."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt file, not a torch pickle, or non-plain types
        raise CheckpointError(f"{path}: cannot read checkpoint: {_unreadable(path, exc)}") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a medseg-dpl checkpoint (a {type(ckpt).__name__}, not a dict)")
    found = checkpoint_kind(ckpt)
    if found in KINDS and found != kind:
        what = {"segmentation": "a 3D segmentation", "classification": "an image-classification"}
        raise CheckpointError(f"{path}: {what[found]} checkpoint ({_WRITER[found]}); this verb takes "
                              f"{what[kind]} checkpoints ({_WRITER[kind]})")
    version = ckpt.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {version!r} is newer than this medseg-dpl "
                              f"reads ({FORMAT_VERSION}); upgrade medseg-dpl")
    for key in REQUIRED[kind]:
        if key not in ckpt:
            raise CheckpointError(f"{path}: not a medseg-dpl {kind} checkpoint (missing {key!r})")
    return ckpt


def update_checkpoint(path: str | os.PathLike, kind: str = "segmentation", **fields) -> None:
    """Add or replace top-level ``fields`` of a checkpoint, atomically (e.g. ``postprocessing``)."""
    ckpt = load_checkpoint(path, kind)
    ckpt.update(fields)
    with atomic_path(path) as tmp:
        torch.save(plain(ckpt), tmp)


# ----------------------------------------------------------------------------- RNG state
def rng_state() -> dict:
    """The global torch / numpy / python (and CUDA) RNG states as plain types."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
             "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
