"""Reading a PREP_DIR: its ``dataset.json`` manifest and its split lists (cheap imports only)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from medseg_dpl.data.io import DataError


def load_manifest(prep_dir: str | os.PathLike) -> dict:
    """``PREP_DIR/dataset.json`` as a dict (see ``contracts.md`` for its fields)."""
    path = Path(prep_dir) / "dataset.json"
    if not path.exists():
        raise DataError(f"{path}: not found; is {prep_dir} a folder written by `medseg-dpl prep`?")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    for key in ("dataset", "classes", "spacing", "cases"):
        if key not in manifest:
            raise DataError(f"{path}: missing field {key!r}")
    return manifest


def read_id_list(path: str | os.PathLike) -> list[str]:
    """One case id per line (DHC format); blank lines and ``#`` comments ignored."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"{path}: cannot read id list ({exc.strerror or exc})") from exc
    ids = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
    return [i for i in ids if i]


def read_split(prep_dir: str | os.PathLike, name: str) -> list[str]:
    """Case ids of split ``name`` ("train", "eval", "test", "labeled_20p", "unlabeled_20p"),
    read from ``PREP_DIR/splits/``; a name that is a path to a ``.txt`` file is read as is."""
    if name.endswith(".txt") and (os.sep in name or "/" in name):
        return read_id_list(name)
    name = name[:-4] if name.endswith(".txt") else name
    path = Path(prep_dir) / "splits" / f"{name}.txt"
    if not path.exists():
        have = sorted(p.stem for p in (Path(prep_dir) / "splits").glob("*.txt"))
        hint = f" (have: {', '.join(have)})" if have else " (run `medseg-dpl split` first)"
        raise DataError(f"{path}: split {name!r} not found{hint}")
    return read_id_list(path)
