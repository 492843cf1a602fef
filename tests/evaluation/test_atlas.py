"""Atlas baseline: body-box alignment, choice on eval, report format (tiny volumes)."""
from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from medseg_dpl.data.manifest import read_split
from medseg_dpl.evaluation.atlas import (atlas_predict, body_box, body_centre, evaluate_atlas,
                                         select_atlas, shift_labels)
from medseg_dpl.evaluation.evaluate import CSV_COLUMNS

SPACING = [4.0, 4.0, 5.0]
CLASSES = ["background", "a", "b"]


def _case(shape, body_lo, body_hi, organs):
    """Prep-like image (X, Y, Z) in [0, 1]: air 0, body 0.3 inside [body_lo, body_hi), and its
    label map with each organ ``(k, lo, hi)`` a box given relative to ``body_lo``."""
    img = np.zeros(shape, np.float32)
    lab = np.zeros(shape, np.uint8)
    img[tuple(slice(a, b) for a, b in zip(body_lo, body_hi))] = 0.3
    for k, lo, hi in organs:
        lab[tuple(slice(b0 + a, b0 + b) for b0, a, b in zip(body_lo, lo, hi))] = k
    return img, lab


def test_body_box_is_the_largest_component_above_the_clip_floor():
    img, _ = _case((40, 36, 32), (5, 8, 0), (25, 30, 32), [])
    img[30:33, 2:5, 3:6] = 0.9                   # a separate bright blob (a scanner table)
    img[0, 0, 0] = 0.01                          # noise just above air, below the level
    np.testing.assert_array_equal(body_box(img), [[5, 25], [8, 30], [0, 32]])
    np.testing.assert_allclose(body_centre(img), [14.5, 18.5, 15.5])
    np.testing.assert_array_equal(body_box(np.zeros((4, 5, 6))), [[0, 4], [0, 5], [0, 6]])
    np.testing.assert_array_equal(body_box(img, None), [[0, 40], [0, 36], [0, 32]])


def test_centre_alignment_is_exact_for_a_shifted_copy():
    organs = [(1, (2, 3, 4), (12, 10, 20)), (2, (13, 5, 2), (17, 9, 6))]
    src_img, src_lab = _case((40, 36, 32), (5, 8, 0), (25, 30, 32), organs)
    # the same body elsewhere in a grid of another shape (in-plane shift, same z extent)
    dst_img, dst_lab = _case((44, 40, 32), (17, 2, 0), (37, 24, 32), organs)
    out = shift_labels(src_lab, body_centre(src_img), body_centre(dst_img), dst_img.shape)
    assert out.shape == dst_lab.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out, dst_lab)
    # what falls outside the target grid is dropped, nothing wraps around
    cut = shift_labels(src_lab, np.array([0, 0, 0]), np.array([-10, 0, 0]), src_lab.shape)
    np.testing.assert_array_equal(cut[:30], src_lab[10:])
    assert not cut[30:].any()


def _write_prep(root, cases, splits):
    """A minimal PREP_DIR (dataset.json, imagesTr, labelsTr, splits) of ``{id: (img, lab)}``."""
    aff = np.diag(SPACING + [1.0])
    entries = []
    for cid, (img, lab) in cases.items():
        for sub, arr in (("imagesTr", img), ("labelsTr", lab)):
            (root / sub).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(arr, aff), str(root / sub / f"{cid}.nii.gz"))
        entries.append({"id": cid, "image": f"imagesTr/{cid}.nii.gz", "label": f"labelsTr/{cid}.nii.gz",
                        "shape": list(img.shape), "spacing": SPACING, "affine": aff.tolist()})
    manifest = {"dataset": "nifti", "classes": CLASSES, "spacing": SPACING, "orientation": "RAS",
                "intensity": {"modality": "ct", "clip": [-175.0, 250.0]}, "cases": entries}
    (root / "dataset.json").write_text(json.dumps(manifest), encoding="utf-8")
    (root / "splits").mkdir()
    for name, ids in splits.items():
        (root / "splits" / f"{name}.txt").write_text("\n".join(ids) + "\n", encoding="utf-8")
    return root


# three anatomies: organ "a" high, in the middle, low (z) in the body; organ "b" fixed
ANATOMY = {z: [(1, (4, 4, z), (14, 14, z + 8)), (2, (15, 15, 10), (19, 19, 14))] for z in (2, 12, 22)}


@pytest.fixture
def tiny_prep(tmp_path):
    body = ((4, 4, 0), (24, 24, 32))
    cases = {"L_high": _case((28, 28, 32), *body, ANATOMY[22]),
             "L_mid": _case((30, 28, 32), *body, ANATOMY[12]),
             "L_low": _case((28, 30, 32), *body, ANATOMY[2]),
             # eval cases look like "mid" (shifted in their grid), test cases like "low"
             "E1": _case((32, 32, 32), (8, 6, 0), (28, 26, 32), ANATOMY[12]),
             "E2": _case((28, 28, 32), *body, ANATOMY[12]),
             "T1": _case((28, 28, 32), *body, ANATOMY[2])}
    return _write_prep(tmp_path / "prep", cases, {"labeled_50p": ["L_high", "L_mid", "L_low"],
                                                  "eval": ["E1", "E2"], "test": ["T1"]})


def test_best_atlas_is_chosen_on_eval_not_on_test(tiny_prep, tmp_path):
    chosen, scores = select_atlas(tiny_prep, "labeled_50p", "eval", geometry="prep")
    assert chosen == "L_mid" and scores["L_mid"] == pytest.approx(1.0)
    assert max(scores["L_high"], scores["L_low"]) < 1.0
    summary = evaluate_atlas(tiny_prep, ["L_high", "L_mid", "L_low"], ["E1", "E2"], ["T1"],
                             tmp_path / "out", geometry="prep")
    assert summary["atlas_case"] == "L_mid" and summary["method"] == "atlas"
    # L_low would have scored 1.0 on the test case: the choice did not look at it
    assert summary["per_organ"]["a"]["dice"]["mean"] == 0.0
    assert summary["per_organ"]["b"]["dice"]["mean"] == pytest.approx(1.0)
    np.testing.assert_array_equal(atlas_predict(tiny_prep, "L_low", "T1"),
                                  np.asarray(nib.load(str(tiny_prep / "labelsTr/T1.nii.gz")).dataobj))


def test_report_has_the_eval_format(tiny_prep, tmp_path):
    out = tmp_path / "atlas"
    summary = evaluate_atlas(tiny_prep, "labeled_50p", "eval", "test", out, geometry="prep")
    for name in ("per_case.csv", "summary.json", "results.md", "dice_per_organ.png"):
        assert (out / name).exists(), name
    with open(out / "per_case.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_COLUMNS and [r["organ"] for r in rows] == ["a", "b"]
    on_disk = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert on_disk["overall"] == summary["overall"] and on_disk["atlas_case"] == "L_mid"
    assert set(on_disk["atlas_selection"]["mean_dice"]) == {"L_high", "L_mid", "L_low"}


def test_original_geometry_on_the_phantom(phantom_prep, tmp_path):
    """Scored like `medseg-dpl eval`: in each test case's source geometry, against its source label."""
    labeled = read_split(phantom_prep, "labeled_25p")
    summary = evaluate_atlas(phantom_prep, labeled, "eval", "test", tmp_path / "atlas")
    assert summary["atlas_case"] in labeled and summary["geometry"] == "original"
    assert summary["num_cases"] == len(read_split(phantom_prep, "test"))
    assert 0.0 < summary["overall"]["dice"]["mean"] < 1.0
    case = json.loads((phantom_prep / "dataset.json").read_text(encoding="utf-8"))["cases"][0]
    pred = atlas_predict(phantom_prep, labeled[0], case["id"], geometry="original")
    assert list(pred.shape) == case["original"]["shape"]


def test_bad_arguments(tiny_prep, tmp_path):
    from medseg_dpl.evaluation.evaluate import EvalError
    with pytest.raises(EvalError, match="geometry"):
        select_atlas(tiny_prep, "labeled_50p", "eval", geometry="world")
    with pytest.raises(EvalError, match="protocol"):
        evaluate_atlas(tiny_prep, "labeled_50p", "eval", "test", tmp_path / "x", protocol="nnunet")
    with pytest.raises(EvalError, match="no case"):
        select_atlas(tiny_prep, ["nope"], "eval", geometry="prep")
