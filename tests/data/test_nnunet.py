"""nnU-Net v2 raw datasets as input, modality-aware intensity normalisation, and the real-MR
path (CHAOS: prep -> train -> eval -> predict) on two cases of ``../shared/data/chaos_mr``."""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg_dpl.cli import main
from medseg_dpl.data.check import run_check
from medseg_dpl.data.preprocess import (MR_PERCENTILES, intensity_kwargs, mr_body_mask, normalize_mr,
                                        preprocess_arrays, preprocess_dataset)
from medseg_dpl.data.readers import scan_dataset

from conftest import shared_data_dir

CLASSES = {"background": 0, "liver": 1, "spleen": 2}


def _mr_case(shape=(24, 24, 12), seed=0) -> tuple[np.ndarray, np.ndarray]:
    """(int16 MR-like volume: noisy air ~5, body ~300 with a dark fat hole ~20, organs; uint8 label)."""
    rng = np.random.default_rng(seed)
    img = rng.uniform(0, 10, shape)
    img[3:-3, 3:-3, :] = 300 + rng.normal(0, 20, (shape[0] - 6, shape[1] - 6, shape[2]))
    img[10:13, 4:7, :] = 20                         # fat-suppressed fat inside the body
    lab = np.zeros(shape, np.uint8)
    lab[6:11, 8:14, 2:9] = 1
    lab[14:18, 14:18, 3:7] = 2
    img[lab == 1] += 200
    img[lab == 2] += 400
    return img.astype(np.int16), lab


def write_nnunet(root: Path, n: int = 3, ending: str = ".nii.gz", channels=None, labels=None,
                 test_cases: int = 1) -> Path:
    """A tiny nnU-Net v2 raw dataset (MR channel) written by the test itself."""
    aff = np.diag([-3.0, 3.0, 6.0, 1.0])  # LAS, like CHAOS
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for k in range(n + test_cases):
        img, lab = _mr_case(seed=k)
        cid = f"case_{k:03d}"
        if k < n:
            nib.save(nib.Nifti1Image(img, aff), str(root / "imagesTr" / f"{cid}_0000{ending}"))
            nib.save(nib.Nifti1Image(lab, aff), str(root / "labelsTr" / f"{cid}{ending}"))
        else:
            nib.save(nib.Nifti1Image(img, aff), str(root / "imagesTs" / f"{cid}_0000{ending}"))
    meta = {"channel_names": channels or {"0": "T2"}, "labels": labels or CLASSES,
            "numTraining": n, "file_ending": ending}
    (root / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    return root


# ----------------------------------------------------------------------------- reader
def test_nnunet_reader_classes_modality_and_prep(tmp_path):
    raw = write_nnunet(tmp_path / "raw")
    cases, problems = scan_dataset("nnunet", raw)
    assert problems == []
    assert [(c.id, c.subset, c.label is not None, c.modality) for c in cases] == [
        ("case_000", "train", True, "mr"), ("case_001", "train", True, "mr"),
        ("case_002", "train", True, "mr"), ("case_003", "train", False, "mr")]  # imagesTs: unlabeled
    m = preprocess_dataset("nnunet", raw, tmp_path / "prep", workers=1, progress=False,
                           stream=io.StringIO())
    assert m["classes"] == ["background", "liver", "spleen"]
    assert m["intensity"]["modality"] == "mr" and m["intensity"]["percentiles"] == list(MR_PERCENTILES)
    assert "clip" not in m["intensity"]
    assert {c["modality"] for c in m["cases"]} == {"mr"}
    img = nib.load(str(tmp_path / "prep" / m["cases"][0]["image"])).get_fdata()
    assert img.shape == (24, 24, 12)                  # body + 12 mm margin: no crop here
    body = img[3:-3, 3:-3, :]                         # z-scored over the body, air below it
    assert abs(body.mean()) < 1e-3 and body.std() == pytest.approx(1.0, abs=1e-3)
    assert img[:2].max() < body.min() + 1e-6
    # --modality ct overrides the channel name: the HU window and [0, 1] scaling of CT
    m_ct = preprocess_dataset("nnunet", raw, tmp_path / "prep_ct", workers=1, progress=False,
                              stream=io.StringIO(), modality="ct")
    assert m_ct["intensity"] == {"modality": "ct", "clip": [-175.0, 250.0]}


def _problems(raw: Path) -> list[str]:
    return run_check("nnunet", raw, workers=1, progress=False)[1]


@pytest.mark.parametrize("defect", ["no_0000", "two_channels", "undeclared_label", "ending",
                                    "label_without_image"])
def test_nnunet_errors_name_the_file_and_write_nothing(tmp_path, capsys, defect):
    raw = write_nnunet(tmp_path / "raw", test_cases=0)
    img0 = raw / "imagesTr" / "case_000_0000.nii.gz"
    if defect == "no_0000":
        img0.rename(raw / "imagesTr" / "case_000_0001.nii.gz")
        expect = [f"{img0}: missing channel file _0000", "channel 0001 is not declared"]
    elif defect == "two_channels":
        meta = json.loads((raw / "dataset.json").read_text(encoding="utf-8"))
        meta["channel_names"] = {"0": "T2", "1": "ADC"}
        (raw / "dataset.json").write_text(json.dumps(meta))
        expect = [f"{raw / 'dataset.json'}: 2 input channels", "not supported yet"]
    elif defect == "undeclared_label":
        lab_path = raw / "labelsTr" / "case_001.nii.gz"
        lab = nib.load(str(lab_path))
        arr = np.asarray(lab.dataobj).copy()
        arr[0, 0, 0] = 7
        nib.save(nib.Nifti1Image(arr, lab.affine), str(lab_path))
        expect = [f"{lab_path}: label values not declared in the labels of {raw / 'dataset.json'}", ": 7"]
    elif defect == "ending":
        meta = json.loads((raw / "dataset.json").read_text(encoding="utf-8"))
        meta["file_ending"] = ".nii"
        (raw / "dataset.json").write_text(json.dumps(meta))
        expect = [f"{img0}: does not end with the file_ending '.nii'"]
    else:
        img0.unlink()
        expect = [f"{raw / 'labelsTr' / 'case_000.nii.gz'}: label without an image"]
    text = "\n".join(_problems(raw))
    for e in expect:
        assert e in text, text
    out = tmp_path / "prep"
    assert main(["prep", "--dataset", "nnunet", "--raw", str(raw), "--out", str(out), "--workers", "1"]) == 1
    err = capsys.readouterr().err
    assert "nothing written" in err and expect[0] in err
    assert not out.exists()


def test_nnunet_dataset_json_problems(tmp_path):
    raw = write_nnunet(tmp_path / "raw", test_cases=0, labels={"background": 0, "liver": 2})
    assert any("0..K without gaps" in p for p in _problems(raw))
    raw2 = write_nnunet(tmp_path / "raw2", test_cases=0, labels={"background": 0, "liver": [1, 2]})
    assert any("region labels (liver) are not supported" in p for p in _problems(raw2))
    meta = json.loads((raw2 / "dataset.json").read_text(encoding="utf-8"))
    meta.update(labels=CLASSES, numTraining=5)
    (raw2 / "dataset.json").write_text(json.dumps(meta))
    assert any("numTraining is 5" in p for p in _problems(raw2))


def test_amos_modality_follows_the_id(tmp_path):
    from data_helpers import body_volume, save

    for cid in ("amos_0001", "amos_0507"):
        img, lab = body_volume(seed=len(cid))
        save(img, tmp_path / "imagesTr" / f"{cid}.nii.gz")
        save(lab, tmp_path / "labelsTr" / f"{cid}.nii.gz")
    cases, problems = scan_dataset("amos", tmp_path)
    assert problems == [] and [(c.id, c.modality) for c in cases] == [("amos_0001", "ct"), ("amos_0507", "mr")]
    assert [c.id for c in scan_dataset("amos", tmp_path, ct_only=True)[0]] == ["amos_0001"]


# ----------------------------------------------------------------------------- MR math
def test_normalize_mr_clips_to_body_percentiles_then_zscores():
    rng = np.random.default_rng(0)
    img = rng.gamma(2.0, 100.0, (30, 20, 10)).astype(np.float32)
    mask = np.zeros(img.shape, bool)
    mask[5:25, 3:17, 2:8] = True
    img[~mask] = rng.uniform(0, 3, (~mask).sum())      # air: must not move the statistics
    body = img[mask].astype(np.float64)
    lo, hi = np.percentile(body, MR_PERCENTILES)
    clipped = np.clip(body, lo, hi)
    out = img.copy()
    stats = normalize_mr(out, mask)
    assert stats["clip"] == pytest.approx([lo, hi]) and stats["mean"] == pytest.approx(clipped.mean())
    assert stats["std"] == pytest.approx(clipped.std())
    assert out[mask].mean() == pytest.approx(0.0, abs=1e-5)
    assert out[mask].std() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(out, (np.clip(img, lo, hi) - clipped.mean()) / clipped.std(), atol=1e-5)
    const = np.full((4, 4, 4), 7.0, np.float32)       # no contrast: zeros, not NaN
    normalize_mr(const, np.ones(const.shape, bool))
    assert np.all(const == 0)


def test_mr_body_mask_excludes_noisy_air_keeps_dark_tissue():
    img, lab = _mr_case()
    mask = mr_body_mask(img)
    assert mask[lab > 0].all()                   # every organ voxel
    assert mask[10:13, 4:7, :].all()             # the dark fat inside the body (hole filled)
    assert not mask[:2].any() and not mask[:, -2:].any()   # noisy air (1-10 units, not zero)
    out, _, _, meta = preprocess_arrays(img, np.diag([3.0, 3.0, 6.0, 1.0]), (3.0, 3.0, 6.0), modality="mr")
    assert meta["modality"] == "mr" and meta["normalization"]["clip"][0] > 10   # air not in the stats


def test_intensity_kwargs_for_new_images():
    assert intensity_kwargs({"clip": [-100, 200]}) == {"modality": "ct", "clip": (-100, 200),
                                                       "percentiles": MR_PERCENTILES}
    assert intensity_kwargs({"modality": "mr", "percentiles": [1, 99]})["percentiles"] == (1, 99)
    with pytest.raises(ValueError, match="trained on CT and MR"):
        intensity_kwargs({"modality": "mixed", "clip": [-175, 250]})
    assert intensity_kwargs({"modality": "mixed", "clip": [-175, 250]}, "mr")["modality"] == "mr"
    with pytest.raises(ValueError, match="trained on MR images only"):
        intensity_kwargs({"modality": "mr"}, "ct")


# ----------------------------------------------------------------------------- CHAOS, end to end
@pytest.fixture(scope="module")
def chaos_two(tmp_path_factory) -> Path:
    """Two CHAOS cases as an nnU-Net raw folder of symlinks (the data stay in ../shared)."""
    src = shared_data_dir() / "chaos_mr"
    if not (src / "dataset.json").exists():
        pytest.skip(f"CHAOS MR data not found at {src} (set MEDSEG_DPL_SHARED to the folder holding chaos_mr/)")
    raw = tmp_path_factory.mktemp("chaos_raw")
    for sub in ("imagesTr", "labelsTr"):
        (raw / sub).mkdir()
    for cid in ("chaos_001", "chaos_002"):
        os.symlink(src / "imagesTr" / f"{cid}_0000.nii.gz", raw / "imagesTr" / f"{cid}_0000.nii.gz")
        os.symlink(src / "labelsTr" / f"{cid}.nii.gz", raw / "labelsTr" / f"{cid}.nii.gz")
    meta = json.loads((src / "dataset.json").read_text(encoding="utf-8"))
    meta["numTraining"] = 2
    (raw / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    return raw


def test_chaos_prep_train_eval_predict(chaos_two, tmp_path):
    prep, run = tmp_path / "prep", tmp_path / "run"
    # 7.5 x 7.5 x 7.7 mm keeps every volume under 48^3 (256 x 1.25 / 7.5 = 43 in-plane)
    assert main(["prep", "--dataset", "nnunet", "--raw", str(chaos_two), "--out", str(prep),
                 "--spacing", "7.5", "7.5", "7.7", "--workers", "1"]) == 0
    m = json.loads((prep / "dataset.json").read_text(encoding="utf-8"))
    assert m["classes"] == ["background", "liver", "right_kidney", "left_kidney", "spleen"]
    assert m["intensity"]["modality"] == "mr"
    assert all(max(c["shape"]) <= 48 and c["label_outside_crop"] == 0 for c in m["cases"])
    lists = tmp_path / "lists"   # 2 cases: one to train on, the other to validate and test
    lists.mkdir()
    for name, ids in {"train": ["chaos_001"], "labeled_20p": ["chaos_001"], "unlabeled_20p": [],
                      "eval": ["chaos_002"], "test": ["chaos_002"]}.items():
        (prep / "splits").mkdir(exist_ok=True)
        (prep / "splits" / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
    assert main(["train", "--config", "configs/chaos_mr.yaml", "--out", str(run), f"data.root={prep}",
                 "method.name=supervised", "data.patch_size=[32,32,16]", "model.channels=[8,16,32]",
                 "model.strides=[2,2]", "train.batch_size=1", "train.steps=3", "train.val_every=3",
                 "train.checkpoint_every=3", "train.progress=false", "data.cache=false"]) == 0
    ckpt = run / "checkpoints" / "best.pt"
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(prep), "--split", "test",
                 "--out", str(run / "eval"), "--overlays", "1"]) == 0
    with open(run / "eval" / "per_case.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["case"], r["organ"]) for r in rows] == [
        ("chaos_002", o) for o in ("liver", "right_kidney", "left_kidney", "spleen")]
    assert all(0.0 <= float(r["dice"]) <= 1.0 for r in rows)
    # predict on the raw MR file normalises it as prep did: the same labels as eval's
    src = chaos_two / "imagesTr" / "chaos_002_0000.nii.gz"
    assert main(["predict", "--checkpoint", str(ckpt), "--input", str(src), "--out", str(tmp_path / "pred")]) == 0
    pred = np.asarray(nib.load(str(tmp_path / "pred" / "chaos_002_0000.nii.gz")).dataobj)
    ev = np.asarray(nib.load(str(run / "eval" / "predictions" / "chaos_002.nii.gz")).dataobj)
    assert pred.shape == ev.shape == (256, 256, 31)
    assert np.mean(pred == ev) > 0.999
