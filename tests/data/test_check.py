"""Integrity check: every problem at once, each naming its file; prep refuses and writes nothing."""
from __future__ import annotations

import gzip
import json
import shutil

import numpy as np
import pytest

from medseg_dpl.cli import main
from medseg_dpl.data import CheckError, check_dataset, preprocess_dataset
from medseg_dpl.data.readers import scan_dataset

from data_helpers import body_volume, save, write_dicom_series


def _synapse_case(raw, num, img=None, lab=None, img_aff=None, lab_aff=None, seed=0, label=True,
                  suffix=".nii.gz"):
    i, l_ = body_volume(seed=seed)
    img = i if img is None else img
    lab = l_ if lab is None else lab
    ip = save(img, raw / "RawData/Training/img" / f"img{num:04d}{suffix}", img_aff)
    lp = save(lab, raw / "RawData/Training/label" / f"label{num:04d}.nii.gz", lab_aff) if label else None
    return ip, lp


@pytest.fixture()
def bad_synapse(tmp_path):
    raw = tmp_path / "raw"
    _synapse_case(raw, 1)
    ip, _ = _synapse_case(raw, 2)                                   # truncated image
    data = ip.read_bytes()
    ip.write_bytes(data[: len(data) // 2])
    _synapse_case(raw, 3, lab=np.zeros((16, 16, 10), np.uint8))     # label shape mismatch
    shifted = np.diag([2.0, 2.0, 3.0, 1.0])
    shifted[0, 3] = 5.0
    _synapse_case(raw, 4, lab_aff=shifted)                          # label affine mismatch
    lab = body_volume()[1]
    lab[0, 0, 0], lab[1, 0, 0] = 20, 99
    _synapse_case(raw, 5, lab=lab)                                  # values outside 0..13
    img = body_volume()[0].astype(np.float32)
    img[4, 4, 4], img[5, 5, 5] = np.nan, np.inf
    _synapse_case(raw, 6, img=img)                                  # NaN/inf intensities
    _synapse_case(raw, 7, img=np.zeros((16, 16, 12, 2), np.int16))  # not 3D
    _synapse_case(raw, 8, label=False)                              # missing label
    _synapse_case(raw, 1, suffix=".nii", label=False)               # duplicate id 0001
    return raw


EXPECTED = [  # (file name, words of the reason)
    ("img0002.nii.gz", "truncated"),
    ("label0003.nii.gz", "shape"),
    ("label0004.nii.gz", "affine"),
    ("label0005.nii.gz", "20, 99"),
    ("img0006.nii.gz", "2 NaN/inf"),
    ("img0007.nii.gz", "not 3D"),
    ("img0008.nii.gz", "missing label"),
    ("img0001.nii", "duplicate case id '0001'"),
]


def test_check_reports_every_problem_with_file_and_reason(bad_synapse):
    problems = check_dataset("synapse", bad_synapse, workers=1, progress=False)
    for name, reason in EXPECTED:
        hits = [p for p in problems if name in p and reason in p]
        assert hits, f"no problem naming {name} with {reason!r} in:\n" + "\n".join(problems)
    assert not [p for p in problems if "img0001.nii.gz:" in p or "label0001" in p]  # case 1 is fine
    assert len(problems) == len(EXPECTED)


def test_check_parallel_equals_serial(bad_synapse):
    assert (sorted(check_dataset("synapse", bad_synapse, workers=2, progress=False))
            == sorted(check_dataset("synapse", bad_synapse, workers=1, progress=False)))


def test_prep_refuses_bad_input_and_creates_nothing(bad_synapse, tmp_path, capsys):
    out = tmp_path / "prep"
    with pytest.raises(CheckError) as err:
        preprocess_dataset("synapse", bad_synapse, out, workers=1, progress=False)
    assert len(err.value.problems) == len(EXPECTED) and not out.exists()
    assert main(["prep", "--dataset", "synapse", "--raw", str(bad_synapse), "--out", str(out),
                 "--workers", "1"]) == 1
    cap = capsys.readouterr()
    assert not out.exists()
    assert "error: 8 problem(s)" in cap.err and "Traceback" not in cap.err
    for name, reason in EXPECTED:
        assert any(name in ln and reason in ln for ln in cap.err.splitlines()), name
    assert main(["check", "--dataset", "synapse", "--raw", str(bad_synapse), "--workers", "1"]) == 1
    assert "img0002.nii.gz" in capsys.readouterr().err


def test_check_clean_dataset_ok(tmp_path, capsys):
    raw = tmp_path / "raw"
    for n in (1, 2):
        _synapse_case(raw, n, seed=n)
    assert check_dataset("synapse", raw, workers=1, progress=False) == []
    assert main(["check", "--dataset", "synapse", "--raw", str(raw), "--workers", "1"]) == 0
    assert "ok: 2 case(s)" in capsys.readouterr().out


def test_synapse_imagesTr_variant_and_layout_errors(tmp_path):
    raw = tmp_path / "raw"
    img, lab = body_volume()
    save(img, raw / "imagesTr/img0001.nii.gz")
    save(lab, raw / "labelsTr/label0001.nii.gz")
    save(lab, raw / "labelsTr/label0002.nii.gz")              # no image
    save(img, raw / "imagesTr/scan_a.nii.gz")                 # bad name
    cases, problems = scan_dataset("synapse", raw)
    assert [c.id for c in cases] == ["0001"] and cases[0].label.name == "label0001.nii.gz"
    assert any("label0002.nii.gz" in p and "without an image" in p for p in problems)
    assert any("scan_a.nii.gz" in p and "img<NNNN>" in p for p in problems)
    assert "not a Synapse" in scan_dataset("synapse", tmp_path / "raw" / "labelsTr")[1][0]
    assert "not found" in scan_dataset("synapse", tmp_path / "nowhere")[1][0]


def test_amos_layout_problems_and_ct_only(tmp_path):
    raw = tmp_path / "amos"
    img, lab = body_volume()
    save(img, raw / "imagesTr/amos_0001.nii.gz")
    save(lab, raw / "labelsTr/amos_0001.nii.gz")
    save(img, raw / "imagesVa/amos_0008.nii.gz")               # test case without labelsVa
    mri = save(img, raw / "imagesTr/amos_0540.nii.gz")         # MRI, label values too big
    bad = lab.copy()
    bad[0, 0, 0] = 16
    save(bad, raw / "labelsTr/amos_0540.nii.gz")
    (raw / "dataset.json").write_text(json.dumps(
        {"labels": {str(i): f"c{i}" for i in range(16)},
         "training": [{"image": "./imagesTr/amos_0001.nii.gz", "label": "./labelsTr/amos_0001.nii.gz"},
                      {"image": "./imagesTr/amos_0002.nii.gz", "label": "./labelsTr/amos_0002.nii.gz"}]}))
    problems = check_dataset("amos", raw, workers=1, progress=False)
    assert any("amos_0008.nii.gz" in p and "missing label" in p and "labelsVa" in p for p in problems)
    assert any("amos_0540.nii.gz" in p and "16" in p for p in problems)
    assert any("dataset.json" in p and "amos_0002.nii.gz" in p for p in problems)
    assert len(problems) == 4, problems   # dataset.json lists image and label of amos_0002
    ct = check_dataset("amos", raw, ct_only=True, workers=1, progress=False)
    assert not any(str(mri.name) in p for p in ct) and len(ct) == 3
    cases, _ = scan_dataset("amos", raw, ct_only=True)
    assert {c.id: c.subset for c in cases} == {"amos_0001": "train", "amos_0008": "test"}


def test_nifti_and_dicom_layouts(tmp_path):
    img, lab = body_volume()
    folder = tmp_path / "nii"
    save(img, folder / "a.nii.gz")
    save(img, folder / "b.nii")
    save(img, folder / "a.nii")                                # duplicate id a
    save(lab, tmp_path / "labs" / "a.nii.gz")
    save(lab, tmp_path / "labs" / "zzz.nii.gz")                # label for no image
    problems = check_dataset("nifti", folder, labels=tmp_path / "labs", workers=1, progress=False)
    assert any("duplicate case id 'a'" in p for p in problems)
    assert any("zzz.nii.gz" in p and "without an image" in p for p in problems)
    # DICOM: a folder holding two series is an error naming the folder
    src = save(img, tmp_path / "small.nii.gz")
    mixed = tmp_path / "dicom" / "mixed"
    write_dicom_series(src, mixed, series_uid="1.2.3.4.1")
    write_dicom_series(src, mixed / "tmp2", series_uid="1.2.3.4.2")
    for f in (mixed / "tmp2").iterdir():
        shutil.move(str(f), mixed / f"b_{f.name}")
    (mixed / "tmp2").rmdir()
    problems = check_dataset("dicom", mixed, workers=1, progress=False)
    assert len(problems) == 1 and str(mixed) in problems[0] and "2 DICOM series" in problems[0]
    write_dicom_series(src, tmp_path / "dicom" / "good")
    problems = check_dataset("dicom", tmp_path / "dicom", workers=1, progress=False)
    assert len(problems) == 1 and "mixed" in problems[0] and "2 DICOM series" in problems[0]
    assert main(["prep", "--dataset", "dicom", "--raw", str(tmp_path / "dicom"),
                 "--out", str(tmp_path / "p"), "--workers", "1"]) == 1
    assert not (tmp_path / "p").exists()
    assert check_dataset("dicom", tmp_path / "dicom" / "good", workers=1, progress=False) == []


def test_gzip_with_garbage_and_non_nifti(tmp_path):
    raw = tmp_path / "raw"
    _synapse_case(raw, 1)
    p = raw / "RawData/Training/img/img0002.nii.gz"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(gzip.compress(b"this is not a nifti header" * 20))
    save(body_volume()[1], raw / "RawData/Training/label/label0002.nii.gz")
    problems = check_dataset("synapse", raw, workers=1, progress=False)
    assert len(problems) == 1 and "img0002.nii.gz" in problems[0] and "unreadable" in problems[0]
