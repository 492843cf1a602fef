"""Post-processing (connected components decided on eval), flip TTA, saved probabilities."""
from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from eval_helpers import make_checkpoint
from medseg_dpl.cli import main
from medseg_dpl.evaluation.postprocess import (PostprocessError, apply_postprocessing,
                                               determine_postprocessing, keep_largest, load_decision,
                                               remove_small)


def _box(a, lo, hi, value):
    a[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = value


# --------------------------------------------------------------------------- operations
def test_keep_largest_and_remove_small_on_known_components():
    lab = np.zeros((30, 30, 30), np.uint8)
    _box(lab, (2, 2, 2), (12, 12, 12), 1)      # 1000 voxels: the organ
    _box(lab, (20, 20, 20), (25, 25, 25), 1)   # 125: a second large piece (12.5 %)
    _box(lab, (27, 2, 2), (29, 4, 4), 1)       # 8: a stray blob (0.8 %)
    _box(lab, (2, 20, 2), (6, 24, 6), 2)       # another organ, untouched
    lab[12, 12, 12] = 1                        # touches the organ's corner: 26-connected, kept
    kept = keep_largest(lab, 1)
    assert (kept == 1).sum() == 1001 and (kept == 2).sum() == 64
    assert kept[22, 22, 22] == 0 and kept[27, 2, 2] == 0  # removed voxels become background
    small = remove_small(lab, 1, 0.1)          # drops < 100.1 voxels: the blob, not the piece
    assert (small == 1).sum() == 1001 + 125 and small[27, 2, 2] == 0
    assert (remove_small(lab, 1, 0.2) == 1).sum() == 1001
    assert np.array_equal(keep_largest(lab, 3), lab)  # absent label: unchanged
    assert lab[22, 22, 22] == 1                       # inputs are not modified

    decision = {"format": "medseg-dpl-postprocessing", "organs": {
        "a": {"label": 1, "op": "remove_small", "min_fraction": 0.1},
        "b": {"label": 2, "op": "none", "min_fraction": None}}}
    assert np.array_equal(apply_postprocessing(lab, decision), small)
    assert np.array_equal(apply_postprocessing(lab, None), lab)
    with pytest.raises(PostprocessError, match="op"):
        apply_postprocessing(lab, {"format": "medseg-dpl-postprocessing",
                                   "organs": {"a": {"label": 1, "op": "erode"}}})


def _eval_set():
    """Three eval cases, three organs: organ 1 predicted with stray blobs (keep_largest helps),
    organ 2 truly in two large pieces plus a stray blob (keep_largest hurts, drop-small helps),
    organ 3 predicted cleanly (nothing helps: stays raw)."""
    preds, truths = [], []
    for k in range(3):
        t = np.zeros((40, 40, 40), np.uint8)
        _box(t, (2, 2, 2), (14, 14, 14), 1)
        _box(t, (20, 2, 2), (28, 10, 10), 2)
        _box(t, (20, 20, 2), (28, 28, 10), 2)
        _box(t, (2, 25, 25), (8, 31, 31), 3)
        p = t.copy()
        _box(p, (30 + k, 30, 30), (33 + k, 33, 33), 1)   # stray blob of organ 1
        _box(p, (35, 2, 30), (37, 4, 32), 2)             # stray blob of organ 2
        preds.append(p)
        truths.append(t)
    return preds, truths


def test_determine_postprocessing_per_organ_on_a_hand_made_eval_set(tmp_path):
    preds, truths = _eval_set()
    d = determine_postprocessing(preds, truths, 4, classes=["bg", "one", "two", "three"])
    o = d["organs"]
    assert o["one"]["op"] == "keep_largest" and o["one"]["dice"] == pytest.approx(1.0)
    assert o["one"]["dice_raw"] < 1.0
    assert o["two"]["op"] == "remove_small" and o["two"]["min_fraction"] == 0.1
    assert o["two"]["candidates"]["keep_largest"] < o["two"]["dice_raw"] < o["two"]["dice"]
    assert o["three"]["op"] == "none" and o["three"]["dice"] == o["three"]["dice_raw"] == 1.0
    assert d["dice_mean"] == pytest.approx(1.0) and d["dice_mean"] > d["dice_raw_mean"]
    for p, t in zip(preds, truths):
        assert np.array_equal(apply_postprocessing(p, d), t)
    # a rule that would lower an organ's Dice is never chosen
    only_truth_pieces = [t.copy() for t in truths]
    d2 = determine_postprocessing(only_truth_pieces, truths, 4)
    assert all(r["op"] == "none" for r in d2["organs"].values())
    # the decision survives JSON; a bad file is named
    path = tmp_path / "postprocessing.json"
    path.write_text(json.dumps(d))
    assert load_decision(path)["organs"] == d["organs"]
    path.write_text("{not json")
    with pytest.raises(PostprocessError, match="postprocessing.json"):
        load_decision(path)


# --------------------------------------------------------------------------- TTA
class _SymmetricConv(torch.nn.Module):
    """One 3x3x3 convolution whose kernels are symmetric under every axis flip, zero padding:
    flip-equivariant by construction (on a volume that is a single window)."""

    def __init__(self, classes=3):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(1, classes, 3, padding=1)
        with torch.no_grad():
            w = self.conv.weight
            for dims in [(2,), (3,), (4,)]:
                w.copy_((w + w.flip(dims)) / 2)

    def forward(self, x):
        return self.conv(x)


def test_tta_equals_plain_inference_for_a_flip_equivariant_network():
    from medseg_dpl.evaluation.inference import sliding_window_predict
    x = torch.rand(1, 1, 16, 12, 10)
    net = _SymmetricConv().eval()
    plain = sliding_window_predict(net, x, (16, 12, 10), tta_flip=False)
    tta = sliding_window_predict(net, x, (16, 12, 10), tta_flip=True)
    torch.testing.assert_close(tta, plain, atol=1e-5, rtol=1e-5)
    # a network that is not equivariant gives a different average: TTA does flip
    skew = torch.nn.Conv3d(1, 3, 3, padding=1).eval()
    assert not torch.allclose(sliding_window_predict(skew, x, (16, 12, 10), tta_flip=True),
                              sliding_window_predict(skew, x, (16, 12, 10), tta_flip=False), atol=1e-4)


# --------------------------------------------------------------------------- saved probabilities
def test_probs_on_grid_round_trips_between_grids():
    from medseg_dpl.evaluation.probabilities import probs_on_grid
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 6, 5, 4))
    probs = np.exp(logits) / np.exp(logits).sum(0)
    src = np.diag([2.0, 2.0, 3.0, 1.0])
    src[:3, 3] = [10, -4, 7]
    # the destination: the same voxels seen through an LPS-flipped, 2x finer grid
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    dst = src @ np.diag([0.5, 0.5, 0.5, 1.0])
    dst = dst @ np.linalg.inv(flip) @ np.array([[1, 0, 0, -11], [0, 1, 0, -9], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    fine = probs_on_grid(probs, src, (12, 10, 8), dst)
    assert fine.dtype == np.float16 and fine.shape == (3, 12, 10, 8)
    np.testing.assert_allclose(fine.astype(np.float32).sum(0), 1.0, atol=2e-3)
    # the fine voxel at the centre of source voxel (2, 3, 1) carries that voxel's probabilities
    ijk = np.rint(np.linalg.inv(dst) @ src @ np.array([2, 3, 1, 1.0]))[:3].astype(int)
    np.testing.assert_allclose(fine[(slice(None), *ijk)], probs[:, 2, 3, 1], atol=2e-3)
    back = probs_on_grid(fine, dst, probs.shape[1:], src, order=0)
    np.testing.assert_allclose(back.astype(np.float32), probs, atol=2e-3)


@pytest.fixture(scope="module")
def run_on_phantom(phantom_prep, tmp_path_factory):
    """An untrained tiny network as RUN/checkpoints/best.pt for the phantom prep."""
    m = json.loads((phantom_prep / "dataset.json").read_text(encoding="utf-8"))
    run = tmp_path_factory.mktemp("pp_run")
    make_checkpoint(run / "checkpoints" / "best.pt", classes=m["classes"], spacing=m["spacing"])
    return run, m


def test_predict_save_probs_round_trip_to_the_input_geometry(run_on_phantom, phantom_prep, tmp_path):
    from medseg_dpl.engine.data import TeacherVolumes

    run, m = run_on_phantom
    case = m["cases"][0]
    src = nib.load(case["source_image"])
    out = tmp_path / "pred"
    rc = main(["predict", "--checkpoint", str(run / "checkpoints" / "best.pt"), "--input",
               case["source_image"], "--out", str(out), "--device", "cpu", "--save-probs",
               "--no-postprocess"])
    assert rc == 0
    labels = next(out.glob("*.nii.gz"))
    probs_file = out / labels.name.replace(".nii.gz", "_probs.npz")
    with np.load(probs_file) as z:
        probs, affine = z["probs"], z["affine"]
    assert probs.dtype == np.float16 and probs.shape == (len(m["classes"]), *src.shape)
    np.testing.assert_allclose(affine, src.affine, atol=1e-5)
    np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1.0, atol=5e-3)
    agree = (probs.astype(np.float32).argmax(0) == np.asarray(nib.load(str(labels)).dataobj)).mean()
    assert agree > 0.99  # float16 ties aside, the label map is the argmax of the saved softmax

    # teacher mode reads the npz (input geometry) back onto the case's preprocessed grid
    teacher_dir = tmp_path / "teacher"
    teacher_dir.mkdir()
    probs_file.rename(teacher_dir / f"{case['id']}_probs.npz")
    prep_img = nib.load(str(phantom_prep / case["image"]))
    tv = TeacherVolumes(str(teacher_dir), str(phantom_prep), m, len(m["classes"]), 0.1)
    tv.check([case["id"]])
    arr, aff, is_labels = tv.volume(case["id"])
    assert not is_labels and arr.shape == (len(m["classes"]), *prep_img.shape)
    np.testing.assert_allclose(aff, prep_img.affine)
    np.testing.assert_allclose(arr.astype(np.float32).sum(0), 1.0, atol=5e-3)
    # a malformed file is named
    with open(teacher_dir / f"{case['id']}_probs.npz", "wb") as f:
        np.savez(f, wrong=np.zeros(3))
    tv2 = TeacherVolumes(str(teacher_dir), str(phantom_prep), m, len(m["classes"]), 0.1)
    with pytest.raises(ValueError, match=f"{case['id']}_probs.npz"):
        tv2.volume(case["id"])


# --------------------------------------------------------------------------- a run, eval, predict
def _rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_postprocess_verb_then_eval_applies_it_and_reports_raw(run_on_phantom, phantom_prep, tmp_path):
    run, m = run_on_phantom
    ck = run / "checkpoints" / "best.pt"
    assert main(["postprocess", "--run", str(run), "--data", str(phantom_prep), "--split", "eval",
                 "--device", "cpu"]) == 0
    decision = load_decision(run / "postprocessing.json")
    assert set(decision["organs"]) == set(m["classes"][1:]) and decision["split"] == "eval"
    stored = torch.load(ck, map_location="cpu", weights_only=True)["postprocessing"]
    assert stored["organs"] == decision["organs"]
    # to test eval's plumbing with a known rule: keep the largest component of every organ
    for r in stored["organs"].values():
        r.update(op="keep_largest", min_fraction=None)
    ckd = torch.load(ck, map_location="cpu", weights_only=True)
    ckd["postprocessing"] = stored
    torch.save(ckd, ck)

    raw_out, pp_out = tmp_path / "raw", tmp_path / "pp"
    base = ["eval", "--checkpoint", str(ck), "--data", str(phantom_prep), "--split", "test",
            "--device", "cpu", "--overlays", "0"]
    assert main(base + ["--out", str(raw_out), "--no-postprocess"]) == 0
    assert main(base + ["--out", str(pp_out)]) == 0
    raw_rows, pp_rows = _rows(raw_out / "per_case.csv"), _rows(pp_out / "per_case.csv")
    assert list(pp_rows[0]) == ["case", "organ", "dice", "hd95", "asd", "dice_raw", "hd95_raw", "asd_raw"]
    for r, p in zip(raw_rows, pp_rows):
        assert (r["case"], r["organ"]) == (p["case"], p["organ"])
        for k in ("dice", "hd95", "asd"):
            assert p[f"{k}_raw"] == r[k] == r[f"{k}_raw"]  # raw scores beside the headline
    from medseg_dpl.evaluation.metrics import dice_per_class
    changed = False
    for cid in {r["case"] for r in pp_rows}:
        raw = np.asarray(nib.load(str(raw_out / "predictions" / f"{cid}.nii.gz")).dataobj)
        pp = np.asarray(nib.load(str(pp_out / "predictions" / f"{cid}.nii.gz")).dataobj)
        np.testing.assert_array_equal(pp, apply_postprocessing(raw, stored))
        changed |= not np.array_equal(pp, raw)
        truth = np.asarray(nib.load(next(c["source_label"] for c in m["cases"] if c["id"] == cid)).dataobj)
        np.testing.assert_allclose([float(r["dice"]) for r in pp_rows if r["case"] == cid],
                                   dice_per_class(pp, truth, len(m["classes"])), atol=1e-6)
    assert changed  # an untrained network scatters organ voxels: the rule removed some
    s = json.loads((pp_out / "summary.json").read_text(encoding="utf-8"))
    assert s["postprocessing"]["applied"] and set(s["raw"]) == {"overall", "per_organ", "per_case"}
    assert s["raw"]["overall"]["dice"]["mean"] == pytest.approx(
        json.loads((raw_out / "summary.json").read_text(encoding="utf-8"))["overall"]["dice"]["mean"])
    assert not json.loads((raw_out / "summary.json").read_text(encoding="utf-8"))["postprocessing"]["applied"]

    # predict applies the same decision on a new image; --no-postprocess gives the raw labels
    case = next(c for c in m["cases"] if c["id"] == pp_rows[0]["case"])
    for flag, ref in (([], pp_out), (["--no-postprocess"], raw_out)):
        out = tmp_path / f"pred{len(flag)}"
        assert main(["predict", "--checkpoint", str(ck), "--input", case["source_image"], "--out", str(out),
                     "--device", "cpu", *flag]) == 0
        got = np.asarray(nib.load(str(next(out.glob("*.nii.gz")))).dataobj)
        want = np.asarray(nib.load(str(ref / "predictions" / f"{case['id']}.nii.gz")).dataobj)
        assert (got == want).mean() > 0.999  # same network, prep and rule (eval reads the prepped image)


def test_postprocess_errors_name_the_file(tmp_path, capsys):
    assert main(["postprocess", "--run", str(tmp_path)]) == 1
    assert str(tmp_path) in capsys.readouterr().err
    ck = make_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    d = torch.load(ck, weights_only=True)
    d["postprocessing"] = {"format": "something else"}
    torch.save(d, ck)
    assert main(["predict", "--checkpoint", str(ck), "--input", str(tmp_path / "x.nii.gz"),
                 "--out", str(tmp_path / "o")]) == 1
    assert "best.pt" in capsys.readouterr().err


def test_training_ends_by_deciding_post_processing(tmp_path_factory):
    from train_helpers import make_tiny_prep, tiny_cfg

    from medseg_dpl.engine.trainer import train
    prep = make_tiny_prep(tmp_path_factory.mktemp("tinyprep_pp"))
    run = tmp_path_factory.mktemp("pp_train")
    train(tiny_cfg(prep, "supervised"), run)
    decision = load_decision(run / "postprocessing.json")
    assert decision["split"] == "eval" and len(decision["cases"]) == 2
    for name in ("best.pt", "last.pt"):
        ck = torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=True)
        assert ck["postprocessing"]["organs"] == decision["organs"]
    run2 = tmp_path_factory.mktemp("pp_train_off")
    train(tiny_cfg(prep, "supervised", "eval.postprocess=false"), run2)
    assert not (run2 / "postprocessing.json").exists()
