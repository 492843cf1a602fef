"""Prediction writes label maps in each input's exact geometry (NIfTI RAS/LPS, DICOM series)."""
from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest

from eval_helpers import make_checkpoint, real_ct_dir, write_dicom_series
from medseg_dpl.cli import main
from medseg_dpl.evaluation.metrics import dice_per_class
from medseg_dpl.evaluation.predict import PredictError, predict, probs_to_original


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("run") / "checkpoints" / "best.pt")


@pytest.fixture(scope="module")
def ct_pair(tmp_path_factory):
    """The real CT (RAS) and an LPS-oriented copy of it (same voxels, flipped axes 0 and 1)."""
    src = real_ct_dir() / "ct.nii.gz"
    d = tmp_path_factory.mktemp("cts")
    shutil.copy(src, d / "ct_ras.nii.gz")
    img = nib.load(str(src))
    lps = img.as_reoriented(nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt("RAS"), nib.orientations.axcodes2ornt("LPS")))
    assert nib.aff2axcodes(lps.affine) == ("L", "P", "S")
    nib.save(lps, str(d / "ct_lps.nii.gz"))
    return d


def test_predict_roundtrips_geometry_ras_and_lps(ckpt, ct_pair, tmp_path):
    out = tmp_path / "pred"
    written = predict(ckpt, ct_pair, out, device="cpu", progress=False)  # folder input
    assert sorted(p.name for p in written) == ["ct_lps.nii.gz", "ct_ras.nii.gz"]
    results = {}
    for name in ("ct_ras", "ct_lps"):
        src = nib.load(str(ct_pair / f"{name}.nii.gz"))
        pred = nib.load(str(out / f"{name}.nii.gz"))
        assert pred.shape == src.shape
        np.testing.assert_allclose(pred.affine, src.affine, rtol=0, atol=1e-5)
        assert pred.get_data_dtype() == np.uint8
        results[name] = np.asarray(pred.dataobj)
    # The two inputs hold the same voxels, so the predictions are the same up to the flip.
    assert len(np.unique(results["ct_ras"])) > 1  # untrained but not constant
    agree = (results["ct_lps"][::-1, ::-1, :] == results["ct_ras"]).mean()
    assert agree > 0.999


@pytest.mark.parametrize("orientation,interpolation,spacing", [
    ("RAS", "linear", (3.0, 3.0, 3.0)), ("LPS", "nearest", (3.0, 3.0, 3.0)),
    ("LPS", "linear", (4.5, 4.5, 5.0)), ("RAS", "nearest", (4.5, 4.5, 5.0))])
def test_back_mapping_puts_labels_on_the_source_voxels(orientation, interpolation, spacing):
    """Labels carried to the preprocessed grid (prep's math) and back land where they were:
    exactly at the source's own 3 mm spacing (reorientation and crop only), and up to the
    resolution loss at a coarser one."""
    from medseg_dpl.data.preprocess import preprocess_arrays

    d = real_ct_dir()
    ct, lab = nib.load(str(d / "ct.nii.gz")), nib.load(str(d / "label_synapse13.nii.gz"))
    if orientation == "LPS":
        t = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                            nib.orientations.axcodes2ornt("LPS"))
        ct, lab = ct.as_reoriented(t), lab.as_reoriented(t)
    # Pad with 12 voxels of air around X and Y so that prep's body crop has something to cut.
    pad = ((12, 12), (12, 12), (0, 0))
    truth = np.pad(np.asarray(lab.dataobj).astype(np.uint8), pad)
    hu = np.pad(np.asarray(ct.dataobj, np.float32), pad, constant_values=-1024.0)
    affine = ct.affine.copy()
    affine[:3, 3] -= ct.affine[:3, :3] @ [12, 12, 0]
    _, plab, paff, meta = preprocess_arrays(hu, affine, spacing, label=truth)
    assert list(meta["shape"]) != list(meta["resampled_shape"])  # the crop did cut
    probs = np.eye(14, dtype=np.float32)[plab].transpose(3, 0, 1, 2)  # one-hot (C, x, y, z)
    back = probs_to_original(probs, paff, truth.shape, affine, meta, interpolation)
    assert back.shape == truth.shape
    if spacing[0] == 3.0:
        np.testing.assert_array_equal(back, truth)
        return
    d = dice_per_class(back, truth, 14)
    big = [0, 1, 2, 5]  # spleen, kidneys, liver: resolution loss alone must not cost much
    assert np.all(d[big] > 0.85), d
    assert np.nanmean(d) > 0.75, d


def test_dicom_series_input_matches_series_geometry(ckpt, tmp_path):
    import SimpleITK as sitk

    d = real_ct_dir()
    img = nib.load(str(d / "ct.nii.gz"))
    block = np.asarray(img.dataobj)[:, :, 40:72]
    aff = img.affine.copy()
    aff[:3, 3] = img.affine[:3, :3] @ [0, 0, 40] + img.affine[:3, 3]
    series = write_dicom_series(block, aff, tmp_path / "series_001")
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(ckpt), "--input", str(series), "--out", str(out),
                 "--device", "cpu", "--tta"]) == 0
    written = out / "series_001.nii.gz"
    assert written.exists()
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series)))
    ref = reader.Execute()
    got = sitk.ReadImage(str(written))
    assert got.GetSize() == ref.GetSize()
    np.testing.assert_allclose(got.GetSpacing(), ref.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(got.GetOrigin(), ref.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(got.GetDirection(), ref.GetDirection(), atol=1e-5)
    # and in nibabel's terms: the RAS affine of the series
    np.testing.assert_allclose(nib.load(str(written)).affine, aff, atol=1e-3)


def test_predict_errors_name_the_file(ckpt, tmp_path, capsys):
    bad = tmp_path / "notes.txt"
    bad.write_text("x")
    with pytest.raises(PredictError, match="notes.txt"):
        predict(ckpt, bad, tmp_path / "o", device="cpu", progress=False)
    assert main(["predict", "--checkpoint", str(tmp_path / "missing.pt"), "--input", str(bad),
                 "--out", str(tmp_path / "o")]) == 1
    assert "missing.pt" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(PredictError, match="junk.pt"):
        predict(junk, bad, tmp_path / "o", device="cpu", progress=False)
