"""Train/eval/test and labeled/unlabeled splits of a PREP_DIR, DHC-style (one id per line).

Sizes follow the published semi-supervised protocol (DHC, MICCAI 2023) and scale with the
number of cases ``n`` (``⌊·⌋`` = floor, as DHC's ``int()``):

* test: the cases whose subset is "test" (AMOS ``imagesVa``: 120) if there are any, otherwise
  ``n - ⌊0.8 n⌋`` random labeled cases (Synapse 30 -> 6);
* eval: ``m - ⌊(1 - f) m⌋`` of the remaining ``m`` labeled cases, with ``f = 0.1`` when the
  test set is predefined (AMOS 240 -> 24) and ``f = 1/6`` otherwise (Synapse 24 -> 4);
* train: the rest (AMOS 216, Synapse 20), including any unlabeled cases;
* labeled at fraction ``p``: ``⌊p · |train|⌋`` train cases with labels (Synapse 20 % -> 4,
  AMOS 5 % -> 10); unlabeled: the other train cases.

Every set has at least one case (and the split fails when there are too few labeled cases for
that). Each list is drawn by its own generator seeded by ``(seed, list)``, so importing some
lists (``from_lists``, e.g. the DHC Synapse ``test.txt``) leaves the others' draws unchanged.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from medseg_dpl.data.io import DataError
from medseg_dpl.data.manifest import load_manifest, read_id_list

DEFAULT_LABELED = {"synapse": 0.2, "amos": 0.05}
TEST_FRACTION = 0.2
EVAL_FRACTION = {"predefined_test": 0.1, "random_test": 1.0 / 6.0}
_LIST_NAME = re.compile(r"^(train|eval|test|(?:un)?labeled_\d+p)$")


def _floor(x: float) -> int:
    return int(math.floor(x + 1e-9))  # 20 * 0.2 must be 4, not 3


def fraction_tag(fraction: float) -> str:
    """0.2 -> ``"20p"`` (the DHC file-name suffix)."""
    p = int(round(100 * float(fraction)))
    if not 0 < fraction < 1 or p < 1:
        raise ValueError(f"labeled fraction must be in (0, 1) and at least 0.005, got {fraction}")
    return f"{p}p"


def _draw(ids: Sequence[str], k: int, seed: int, stream: int, *extra: int) -> list[str]:
    rng = np.random.default_rng([int(seed), stream, *extra])
    ids = sorted(ids)
    return sorted(ids[i] for i in rng.permutation(len(ids))[:k])


def import_lists(folder: str | os.PathLike, known: Iterable[str]) -> dict[str, list[str]]:
    """Read ``train.txt``, ``labeled_5p.txt``, ... from ``folder``; unknown ids are an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: split list folder not found")
    known = set(known)
    lists, problems = {}, []
    for path in sorted(folder.glob("*.txt")):
        if not _LIST_NAME.match(path.stem):
            continue
        ids = read_id_list(path)
        unknown = [i for i in ids if i not in known]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if unknown:
            shown = ", ".join(unknown[:10]) + (f" ... ({len(unknown)} in all)" if len(unknown) > 10 else "")
            problems.append(f"{path}: unknown case id(s) not in the prepped data: {shown}")
        if dup:
            problems.append(f"{path}: duplicate case id(s): {', '.join(dup[:10])}")
        lists[path.stem] = ids
    if problems:
        raise DataError("\n".join(problems))
    if not lists:
        raise DataError(f"{folder}: no split lists (train.txt, eval.txt, test.txt, "
                        "labeled_<P>p.txt, unlabeled_<P>p.txt)")
    return lists


def make_splits(prep_dir: str | os.PathLike, labeled: float | Sequence[float] | None = None,
                seed: int = 0, from_lists: str | os.PathLike | None = None,
                write: bool = True, out_dir: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """Split the cases of PREP_DIR; write ``PREP_DIR/splits/<name>.txt``; return {name: ids}.

    ``out_dir``: write the lists there instead (e.g. one folder per benchmark seed; pass
    ``data.labeled_split=OUT_DIR/labeled_20p.txt`` etc. to train on them).

    ``labeled``: one fraction or several (default: Synapse 0.2, AMOS 0.05, others 0.2).
    ``from_lists``: a folder of existing lists to use as they are (every id must be a case of
    PREP_DIR; the result must be consistent: disjoint train/eval/test, labeled ⊆ train, labels
    on eval/test/labeled); train/eval/test and the lists of the requested fractions are taken
    from it, the lists it lacks are drawn as described in the module docstring.
    """
    from medseg_dpl.utils import atomic_path

    prep_dir = Path(prep_dir)
    manifest = load_manifest(prep_dir)
    cases = manifest["cases"]
    all_ids = [c["id"] for c in cases]
    has_label = {c["id"] for c in cases if c.get("label")}
    if labeled is None:
        labeled = DEFAULT_LABELED.get(manifest["dataset"], 0.2)
    fractions = [labeled] if isinstance(labeled, (int, float)) else list(labeled)
    tags = [fraction_tag(f) for f in fractions]
    given = import_lists(from_lists, all_ids) if from_lists is not None else {}
    out: dict[str, list[str]] = {}

    predefined = sorted(c["id"] for c in cases if c.get("subset") == "test")
    if "test" in given:
        out["test"] = given["test"]
    elif predefined:
        out["test"] = predefined
    else:
        pool = sorted(has_label)
        n_test = max(1, len(pool) - _floor(len(pool) * (1 - TEST_FRACTION)))
        if len(pool) < 3:
            raise DataError(f"{prep_dir}: {len(pool)} labeled case(s); a split needs at least 3 "
                            "(1 train, 1 eval, 1 test)")
        out["test"] = _draw(pool, n_test, seed, 0)
    test = set(out["test"])
    if "eval" in given:
        out["eval"] = given["eval"]
    else:
        pool = sorted(has_label - test - set(given.get("train", [])))
        trval = [i for i in all_ids if i not in test and i in has_label]
        frac = EVAL_FRACTION["predefined_test" if predefined and "test" not in given else "random_test"]
        n_eval = max(1, len(trval) - _floor(len(trval) * (1 - frac)))
        if len(pool) - n_eval < 1 and "train" not in given:
            raise DataError(f"{prep_dir}: too few labeled cases outside the test set "
                            f"({len(pool)}) for an eval set and a labeled train set")
        out["eval"] = _draw(pool, min(n_eval, len(pool)), seed, 1)
    evals = set(out["eval"])
    out["train"] = given.get("train") or sorted(i for i in all_ids if i not in test and i not in evals)
    train = out["train"]
    for frac, tag in zip(fractions, tags):
        lab_name, unl_name = f"labeled_{tag}", f"unlabeled_{tag}"
        if lab_name in given:
            out[lab_name] = given[lab_name]
        else:
            pool = [i for i in train if i in has_label]
            k = min(len(pool), max(1, _floor(frac * len(train))))
            if not pool:
                raise DataError(f"{prep_dir}: no labeled case in the train set")
            out[lab_name] = _draw(pool, k, seed, 2, int(tag[:-1]))
        labs = set(out[lab_name])
        out[unl_name] = given.get(unl_name) or sorted(i for i in train if i not in labs)
    # Lists in from_lists for fractions not asked for are neither checked nor written (the
    # published DHC AMOS labeled_20p.txt, for one, holds 3 eval cases and is rejected if asked).
    _validate(out, has_label, from_lists)
    if write:
        for name, ids in out.items():
            with atomic_path(Path(out_dir or prep_dir / "splits") / f"{name}.txt") as tmp:
                tmp.write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
    return out


def _validate(out: dict[str, list[str]], has_label: set, source) -> None:
    where = f" (lists from {source})" if source else ""
    problems = []
    sets = {k: set(v) for k, v in out.items()}
    for a, b in (("train", "eval"), ("train", "test"), ("eval", "test")):
        both = sorted(sets[a] & sets[b])
        if both:
            problems.append(f"{a} and {b} share case(s): {', '.join(both[:10])}")
    for name in ("eval", "test"):
        missing = sorted(sets[name] - has_label)
        if missing:
            problems.append(f"{name} case(s) without a label: {', '.join(missing[:10])}")
    for name in out:
        if name.startswith("labeled_"):
            tag = name[len("labeled_"):]
            lab, unl = sets[name], sets.get(f"unlabeled_{tag}", set())
            if not lab <= sets["train"]:
                problems.append(f"{name}: case(s) not in train: {', '.join(sorted(lab - sets['train'])[:10])}")
            if lab - has_label:
                problems.append(f"{name}: case(s) without a label: {', '.join(sorted(lab - has_label)[:10])}")
            if lab & unl:
                problems.append(f"{name} and unlabeled_{tag} share case(s): {', '.join(sorted(lab & unl)[:10])}")
    if any(len(out[k]) == 0 for k in ("train", "eval", "test")):
        problems.append("empty split: " + ", ".join(k for k in ("train", "eval", "test") if not out[k]))
    if problems:
        raise DataError("inconsistent splits" + where + ":\n  " + "\n  ".join(problems))


def format_split_table(splits: dict[str, list[str]]) -> str:
    width = max(len(k) for k in splits)
    order = sorted(splits, key=lambda k: (["train", "eval", "test"].index(k) if k in ("train", "eval", "test") else 3, k))
    return "\n".join(f"{k + '.txt':<{width + 4}}  {len(splits[k]):>5}" for k in order)
