"""prep -> split -> read on the phantom (both layouts), the real CT (Synapse and AMOS layouts),
a DICOM series written from it; the resampling/affine math against analytic expectations."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg_dpl.data import load_manifest, preprocess_image, read_image, read_split, restore_to_original
from medseg_dpl.data.labels import AMOS_CLASSES, SYNAPSE_CLASSES
from medseg_dpl.data.preprocess import (DEFAULT_CLIP, preprocess_arrays, preprocess_dataset, reorient_ras,
                                        resample)
from medseg_dpl.data.splits import make_splits

from data_helpers import write_dicom_series

QUIET = dict(workers=1, progress=False)


def _prep(*args, **kw):
    buf = io.StringIO()
    m = preprocess_dataset(*args, **{**QUIET, **kw}, stream=buf)
    return m, buf.getvalue()


def _dice(a, b):
    s = a.sum() + b.sum()
    return 2.0 * np.logical_and(a, b).sum() / s if s else 1.0


# ----------------------------------------------------------------------------- geometry math
def test_resample_keeps_world_coordinates_exact():
    """A field linear in world mm is reproduced exactly by linear resampling at the new affine's
    voxel centres (away from the replicated edge), for any orientation: the affine is true."""
    rng = np.random.default_rng(0)
    shape = (23, 19, 11)
    # LPS-like axes, permuted (first array axis runs along world z), anisotropic spacing
    aff = np.array([[0, -0.9, 0, 40.0], [0, 0, -1.3, -7.0], [2.7, 0, 0, -100.0], [0, 0, 0, 1]])
    g = rng.normal(size=3)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    world = idx @ aff[:3, :3].T + aff[:3, 3]
    field = (world @ g).reshape(shape).astype(np.float32)
    arr, a_ras = reorient_ras(np.asfortranarray(field), aff)
    assert np.all(np.diag(a_ras[:3, :3]) > 0) and np.allclose(a_ras[:3, :3], np.diag(np.diag(a_ras[:3, :3])))
    out, a_out = resample(arr, a_ras, (1.7, 1.1, 2.0), order=1)
    assert np.allclose(np.diag(a_out[:3, :3]), (1.7, 1.1, 2.0))
    oidx = np.stack(np.meshgrid(*[np.arange(n) for n in out.shape], indexing="ij"), -1).reshape(-1, 3)
    expect = ((oidx @ a_out[:3, :3].T + a_out[:3, 3]) @ g).reshape(out.shape)
    # inside: source coordinate within [0, n-1] on every axis (no edge clamping)
    src = (oidx + 0.5) * (np.array([1.7, 1.1, 2.0]) / np.diag(a_ras[:3, :3])) - 0.5
    inside = np.all((src >= 0) & (src <= np.array(arr.shape) - 1), axis=1).reshape(out.shape)
    assert inside.sum() > 0.5 * inside.size
    np.testing.assert_allclose(out[inside], expect[inside], atol=1e-3)
    # nearest: every output voxel takes the source voxel whose centre is nearest in world
    lab = np.arange(arr.size, dtype=np.int32).reshape(arr.shape)
    near, a_near = resample(lab, a_ras, (1.7, 1.1, 2.0), order=0)
    assert np.allclose(a_near, a_out)
    src_vox = np.rint(np.linalg.solve(a_ras, np.c_[oidx @ a_out[:3, :3].T + a_out[:3, 3],
                                                    np.ones(len(oidx))].T)[:3].T).astype(int)
    src_vox = np.clip(src_vox, 0, np.array(arr.shape) - 1)
    assert np.array_equal(near.reshape(-1), lab[tuple(src_vox.T)])


def test_preprocess_arrays_clip_scale_and_crop():
    img = np.full((40, 30, 20), -1000, np.int16)
    img[10:30, 5:25, 4:16] = 40                  # body
    img[12, 10, 8] = 3000                        # bone above the window
    img[2, 2, 2] = 200                           # one bright voxel outside the body: not kept
    aff = np.diag([2.0, 2.0, 3.0, 1.0])
    img = img.astype(np.float32)
    before = img.copy()
    out, _, a, meta = preprocess_arrays(img, aff, (2.0, 2.0, 3.0), clip=(-100, 100))
    assert np.array_equal(img, before)           # the caller's array is not modified
    # margin BODY_MARGIN_MM = 10 mm: 5 voxels at 2 mm, 4 at 3 mm; the lone voxel is not the body
    assert meta["crop_box"] == [[5, 35], [0, 30], [0, 20]]
    assert out.dtype == np.float32 and out.shape == (30, 30, 20)
    assert out.min() == 0.0 and out.max() == 1.0
    assert np.isclose(out[12 - 5, 10, 8], 1.0) and np.isclose(out[15 - 5, 10, 8], 0.7)
    assert np.allclose(a[:3, 3], [10.0, 0.0, 0.0])


# ----------------------------------------------------------------------------- phantom
def test_phantom_prep_manifest_and_files(phantom_prep, phantom_raw):
    man = load_manifest(phantom_prep)
    assert man["dataset"] == "synapse" and man["classes"] == list(SYNAPSE_CLASSES)
    assert man["orientation"] == "RAS" and man["intensity"]["clip"] == list(DEFAULT_CLIP)
    assert len(man["cases"]) == 8 and [c["id"] for c in man["cases"]] == [f"{i:04d}" for i in range(1, 9)]
    totals = np.zeros(len(SYNAPSE_CLASSES), np.int64)
    for c in man["cases"]:
        img = nib.load(phantom_prep / c["image"])
        lab = nib.load(phantom_prep / c["label"])
        x = np.asanyarray(img.dataobj)
        y = np.asanyarray(lab.dataobj)
        assert x.dtype == np.float32 and y.dtype == np.uint8
        assert 0.0 <= x.min() and x.max() <= 1.0
        assert list(x.shape) == c["shape"] == list(y.shape)
        assert np.allclose(img.affine, lab.affine) and np.allclose(img.affine, c["affine"])
        # RAS, target spacing
        assert np.allclose(img.affine[:3, :3], np.diag(man["spacing"]), atol=1e-4)
        assert {"shape", "affine", "spacing"} <= set(c["original"])
        assert c["source_image"].endswith(f"img{c['id']}.nii.gz")
        totals += np.bincount(y.ravel(), minlength=len(SYNAPSE_CLASSES))
        # the crop box lies in the resampled grid and has the written shape
        assert [b - a for a, b in c["crop_box"]] == c["shape"]
        assert all(0 <= a < b <= n for (a, b), n in zip(c["crop_box"], c["resampled_shape"]))
    assert [man["label_counts"][n] for n in SYNAPSE_CLASSES] == totals.tolist()
    assert all(man["label_counts"][n] > 0 for n in SYNAPSE_CLASSES)   # every organ in the phantom
    # splits at 25 %: 8 -> 2 test, 1 eval, 5 train -> 1 labeled + 4 unlabeled
    tr, ev, te = (read_split(phantom_prep, n) for n in ("train", "eval", "test"))
    lab, unl = read_split(phantom_prep, "labeled_25p"), read_split(phantom_prep, "unlabeled_25p")
    assert (len(tr), len(ev), len(te), len(lab), len(unl)) == (5, 1, 2, 1, 4)
    assert sorted(tr + ev + te) == [c["id"] for c in man["cases"]]
    assert set(lab) | set(unl) == set(tr)


def test_phantom_restore_to_original(phantom_prep):
    """Prepped labels mapped back onto the source grid agree with the source labels."""
    man = load_manifest(phantom_prep)
    c = man["cases"][0]
    lab, _ = read_image(phantom_prep / c["label"])
    src, src_aff = read_image(c["source_label"])
    back = restore_to_original(lab, c)
    assert back.shape == src.shape
    liver = SYNAPSE_CLASSES.index("liver")
    assert _dice(back == liver, src == liver) > 0.85
    assert np.mean(back == src) > 0.9


def test_preprocess_image_is_prep(phantom_prep):
    """predict's entry point gives exactly the written image (same math, same affine)."""
    man = load_manifest(phantom_prep)
    for c in man["cases"][:2]:
        img, aff, meta = preprocess_image(c["source_image"], man["spacing"], man["intensity"]["clip"])
        ref = nib.load(phantom_prep / c["image"])
        assert np.array_equal(img, np.asanyarray(ref.dataobj))
        assert np.allclose(aff, ref.affine) and meta["crop_box"] == c["crop_box"]


def test_prep_skips_done_cases_and_rewrites_nothing(phantom_raw, phantom_prep):
    before = {p: p.stat().st_mtime_ns for p in (phantom_prep / "imagesTr").iterdir()}
    man, out = _prep("synapse", phantom_raw, phantom_prep)
    assert "skipped 8 already done" in out
    assert {p: p.stat().st_mtime_ns for p in (phantom_prep / "imagesTr").iterdir()} == before
    assert "right_adrenal_gland" in out  # the imbalance table
    assert not list(phantom_prep.rglob(".*.tmp*"))  # no temp files left by atomic writes
    umask = os.umask(0)
    os.umask(umask)
    for p in [phantom_prep / "dataset.json", *(phantom_prep / "imagesTr").iterdir()]:
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p   # not mkstemp's 0600


def test_amos_phantom_layout_two_workers(tmp_path):
    from medseg_dpl.data.phantom import make_phantom

    raw = tmp_path / "amos"
    make_phantom(raw, layout="amos", cases=4, seed=3, shape=(32, 32, 24))
    prep = tmp_path / "prep"
    man, out = _prep("amos", raw, prep, workers=2)
    assert man["classes"] == list(AMOS_CLASSES)
    va = sorted(p.name[:-7] for p in (raw / "imagesVa").glob("*.nii.gz"))
    assert va and sorted(c["id"] for c in man["cases"] if c["subset"] == "test") == va
    make_splits(prep, labeled=0.5, seed=1)
    assert read_split(prep, "test") == va        # imagesVa is the test set
    assert len(read_split(prep, "eval")) == 1 and len(read_split(prep, "labeled_50p")) == 1


def test_cli_prep_and_split(tmp_path, capsys):
    from medseg_dpl.cli import main
    from medseg_dpl.data.phantom import make_phantom

    raw = tmp_path / "raw"
    make_phantom(raw, layout="synapse", cases=3, seed=1, shape=(24, 24, 20))
    prep = tmp_path / "prep"
    assert main(["prep", "--dataset", "synapse", "--raw", str(raw), "--out", str(prep),
                 "--spacing", "12", "12", "15", "--clip", "-100", "200", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "liver" in out and "prepped 3 case(s)" in out
    man = load_manifest(prep)
    assert man["spacing"] == [12.0, 12.0, 15.0] and man["intensity"]["clip"] == [-100.0, 200.0]
    assert main(["split", "--data", str(prep), "--labeled", "0.5", "--seed", "0"]) == 0
    assert len(read_split(prep, "test")) == 1 and len(read_split(prep, "labeled_50p")) == 1


# ----------------------------------------------------------------------------- real CT
def _layout(tmp: Path, shared: Path, kind: str) -> Path:
    ct = shared / "real_ct" / "ct.nii.gz"
    if kind == "synapse":
        raw = tmp / "synapse"
        (raw / "RawData/Training/img").mkdir(parents=True)
        (raw / "RawData/Training/label").mkdir(parents=True)
        os.symlink(ct, raw / "RawData/Training/img/img0001.nii.gz")
        os.symlink(shared / "real_ct/label_synapse13.nii.gz", raw / "RawData/Training/label/label0001.nii.gz")
    else:
        raw = tmp / "amos"
        (raw / "imagesTr").mkdir(parents=True)
        (raw / "labelsTr").mkdir(parents=True)
        os.symlink(ct, raw / "imagesTr/amos_0001.nii.gz")
        os.symlink(shared / "real_ct/label_amos15.nii.gz", raw / "labelsTr/amos_0001.nii.gz")
    return raw


# voxel counts from shared/data/real_ct/README.md (Synapse numbering)
REAL_COUNTS = {"liver": 41602, "spleen": 9677, "right_kidney": 6993, "left_kidney": 5144,
               "stomach": 4977, "aorta": 1786, "gallbladder": 1300, "pancreas": 818,
               "left_adrenal_gland": 223, "right_adrenal_gland": 174}


@pytest.mark.parametrize("kind", ["synapse", "amos"])
def test_real_ct_native_spacing_is_exact(tmp_path, shared_data, kind):
    raw = _layout(tmp_path, shared_data, kind)
    prep = tmp_path / "prep"
    man, _ = _prep(kind, raw, prep, spacing=(3.0, 3.0, 3.0))
    c = man["cases"][0]
    assert c["id"] == ("0001" if kind == "synapse" else "amos_0001")
    for name, n in REAL_COUNTS.items():
        assert man["label_counts"][name] == n, name
    ct, ct_aff = read_image(shared_data / "real_ct/ct.nii.gz")
    lab_name = "label_synapse13.nii.gz" if kind == "synapse" else "label_amos15.nii.gz"
    lab_src, _ = read_image(shared_data / "real_ct" / lab_name)
    lab, _ = read_image(prep / c["label"])
    # the source is RAS at 3 mm: prep is a crop + the intensity map, voxel for voxel
    crop = tuple(slice(a, b) for a, b in c["crop_box"])
    x, x_aff = read_image(prep / c["image"])
    expect = (np.clip(ct[crop].astype(np.float64), -175, 250) + 175) / 425
    np.testing.assert_allclose(x, expect, atol=1e-6)
    assert np.array_equal(lab, lab_src[crop])
    assert np.allclose(x_aff[:3, 3], ct_aff[:3, :3] @ [a for a, _ in c["crop_box"]] + ct_aff[:3, 3])
    assert np.array_equal(restore_to_original(lab, c), lab_src)   # exact way back


def test_real_ct_resampled_and_mapped_back(tmp_path, shared_data):
    raw = _layout(tmp_path, shared_data, "synapse")
    prep = tmp_path / "prep"
    man, _ = _prep("synapse", raw, prep, spacing=(4.0, 4.5, 5.0))
    c = man["cases"][0]
    lab, aff = read_image(prep / c["label"])
    assert np.allclose(np.diag(aff[:3, :3]), (4.0, 4.5, 5.0))
    src, _ = read_image(shared_data / "real_ct/label_synapse13.nii.gz")
    back = restore_to_original(lab, c)
    for organ, min_dice in (("liver", 0.93), ("spleen", 0.9), ("right_kidney", 0.85)):
        k = SYNAPSE_CLASSES.index(organ)
        assert _dice(back == k, src == k) > min_dice, organ
    # organ volumes (mm^3) are preserved by nearest resampling within a few per cent
    vol = lambda n, sp: n * np.prod(sp)  # noqa: E731
    assert abs(vol(man["label_counts"]["liver"], (4, 4.5, 5)) / vol(41602, (3, 3, 3)) - 1) < 0.05


# ----------------------------------------------------------------------------- DICOM
@pytest.fixture(scope="module")
def dicom_series(tmp_path_factory, shared_data) -> Path:
    root = tmp_path_factory.mktemp("dicom")
    write_dicom_series(shared_data / "real_ct/ct.nii.gz", root / "series" / "ct1")
    return root / "series"


def test_dicom_series_geometry_matches_nifti(dicom_series, shared_data):
    arr, aff = read_image(dicom_series / "ct1")
    ref, ref_aff = read_image(shared_data / "real_ct/ct.nii.gz")
    assert arr.shape == ref.shape
    np.testing.assert_allclose(aff, ref_aff, atol=1e-3)
    assert np.array_equal(arr.astype(np.int32), ref.astype(np.int32))


def test_dicom_prep_equals_nifti_prep(tmp_path, dicom_series, shared_data):
    labels = tmp_path / "labels"
    labels.mkdir()
    os.symlink(shared_data / "real_ct/label_synapse13.nii.gz", labels / "ct1.nii.gz")
    man, _ = _prep("dicom", dicom_series, tmp_path / "prep_dicom", spacing=(4.0, 4.0, 4.0),
                   labels=labels, classes="synapse")
    ref_img, ref_aff, ref_meta = preprocess_image(shared_data / "real_ct/ct.nii.gz", (4.0, 4.0, 4.0), DEFAULT_CLIP)
    c = man["cases"][0]
    assert c["id"] == "ct1" and man["classes"] == list(SYNAPSE_CLASSES)
    x, aff = read_image(tmp_path / "prep_dicom" / c["image"])
    assert np.allclose(aff, ref_aff, atol=1e-3) and np.allclose(x, ref_img, atol=1e-6)
    assert man["label_counts"]["liver"] > 0
    # one series folder given directly (not a folder of series folders)
    img2, aff2, _ = preprocess_image(dicom_series / "ct1", (4.0, 4.0, 4.0), DEFAULT_CLIP)
    assert np.allclose(img2, ref_img, atol=1e-6)


def test_nifti_single_file_with_label(tmp_path, shared_data):
    man, _ = _prep("nifti", shared_data / "real_ct/ct.nii.gz", tmp_path / "p", spacing=(6.0, 6.0, 6.0),
                   labels=shared_data / "real_ct/label_amos15.nii.gz")
    assert [c["id"] for c in man["cases"]] == ["ct"]
    # classes inferred from the largest label value present (14 = bladder in AMOS numbering)
    assert man["classes"][0] == "background" and len(man["classes"]) >= 13
    json.dumps(man)
