"""Synthetic abdomen phantom: exact raw layouts, anatomy plausibility, geometry, determinism."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from medseg_dpl.data.labels import AMOS_CLASSES, SYNAPSE_CLASSES
from medseg_dpl.data.phantom import PhantomError, make_phantom, phantom_case

SMALL = (40, 40, 32)


@pytest.fixture(scope="module")
def default_cases():
    """Four default-size AMOS cases (AMOS has every organ of Synapse but the portal veins)."""
    return [phantom_case(7, i, "amos") for i in range(4)]


def _world_centroid(case, k):
    ijk = np.argwhere(case.label == k).mean(0)
    return case.affine[:3, :3] @ ijk + case.affine[:3, 3]


def test_synapse_layout_exact_paths(tmp_path):
    paths = make_phantom(tmp_path, "synapse", cases=2, seed=3, shape=SMALL)
    rel = sorted(str(p.relative_to(tmp_path)) for p in paths)
    assert rel == ["RawData/Training/img/img0001.nii.gz", "RawData/Training/img/img0002.nii.gz",
                   "RawData/Training/label/label0001.nii.gz", "RawData/Training/label/label0002.nii.gz"]
    img = nib.load(tmp_path / "RawData/Training/img/img0001.nii.gz")
    lab = nib.load(tmp_path / "RawData/Training/label/label0001.nii.gz")
    assert img.shape == lab.shape == SMALL
    assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(img.affine, lab.affine)
    values = np.unique(np.asarray(lab.dataobj))
    # every Synapse organ present, nothing outside the class list
    assert values.tolist() == list(range(len(SYNAPSE_CLASSES)))
    # no temp files left behind by the atomic writes
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]


def test_amos_layout_exact_paths_and_dataset_json(tmp_path):
    paths = make_phantom(tmp_path, "amos", cases=4, seed=3, shape=SMALL, va_fraction=0.25)
    assert all(p.exists() for p in paths)
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.nii.gz"))
    assert files == ["imagesTr/amos_0001.nii.gz", "imagesTr/amos_0002.nii.gz", "imagesTr/amos_0003.nii.gz",
                     "imagesVa/amos_0004.nii.gz", "labelsTr/amos_0001.nii.gz", "labelsTr/amos_0002.nii.gz",
                     "labelsTr/amos_0003.nii.gz", "labelsVa/amos_0004.nii.gz"]
    meta = json.loads((tmp_path / "dataset.json").read_text(encoding="utf-8"))
    assert meta["labels"] == {str(i): n for i, n in enumerate(AMOS_CLASSES)}
    assert meta["numTraining"] == 3 and len(meta["training"]) == 3
    assert meta["training"][0] == {"image": "./imagesTr/amos_0001.nii.gz", "label": "./labelsTr/amos_0001.nii.gz"}
    assert meta["validation"] == [{"image": "./imagesVa/amos_0004.nii.gz", "label": "./labelsVa/amos_0004.nii.gz"}]
    for entry in meta["training"] + meta["validation"]:
        assert (tmp_path / entry["image"]).exists() and (tmp_path / entry["label"]).exists()
    lab = np.asarray(nib.load(tmp_path / "labelsVa/amos_0004.nii.gz").dataobj)
    assert lab.max() <= len(AMOS_CLASSES) - 1


def test_every_organ_sampled_without_forcing_at_default_size(default_cases):
    for c in default_cases:
        assert c.info["forced_organs"] == []
        counts = np.bincount(c.label.ravel(), minlength=len(AMOS_CLASSES))
        assert len(counts) == len(AMOS_CLASSES) and (counts[1:] > 0).all()


def test_organ_volume_ordering(default_cases):
    i = {n: k for k, n in enumerate(AMOS_CLASSES)}
    for c in default_cases:
        ml = np.bincount(c.label.ravel(), minlength=len(AMOS_CLASSES)) * np.prod(c.info["spacing"]) / 1000
        assert ml[i["liver"]] > 2 * ml[i["spleen"]]
        assert ml[i["spleen"]] > ml[i["gallbladder"]]
        for side in ("right", "left"):
            assert ml[i["spleen"]] > 0.5 * ml[i[f"{side}_kidney"]]
            assert ml[i[f"{side}_kidney"]] > ml[i["gallbladder"]]   # a fasting gallbladder: up to ~60 ml
            assert ml[i["pancreas"]] > 4 * ml[i[f"{side}_adrenal_gland"]]
        # nominal published volumes, generous bounds (log-normal per-case variation)
        assert 900 < ml[i["liver"]] < 2300
        assert 1 < ml[i["left_adrenal_gland"]] < 15


def test_organ_intensities_overlap(default_cases):
    """Intensity alone must not separate organs: central HU ranges of neighbours overlap."""
    i = {n: k for k, n in enumerate(AMOS_CLASSES)}
    pairs = [("liver", "spleen"), ("liver", "pancreas"), ("spleen", "right_kidney"),
             ("liver", "left_kidney")]

    def overlap(c, a, b):
        va, vb = c.image[c.label == i[a]], c.image[c.label == i[b]]
        return min(np.percentile(va, 90), np.percentile(vb, 90)) > max(np.percentile(va, 10),
                                                                         np.percentile(vb, 10))
    for a, b in pairs:  # in most cases: a low-noise portal-venous scan may just separate a pair
        hits = [overlap(c, a, b) for c in default_cases]
        assert sum(hits) >= len(hits) - 1, (a, b, hits)
    for c in default_cases:
        # arterial and venous blood separate only in the arterial phase (as in real CT)
        assert overlap(c, "aorta", "postcava") == (c.info["phase"] != "arterial"), c.info
    # and the image is CT-like: air outside, fat, bone
    img = default_cases[0].image
    assert img.min() < -900 and img.max() > 300


def test_affine_anisotropic_oriented_and_anatomically_consistent(default_cases):
    codes = set()
    for c in default_cases:
        sp = np.array(c.info["spacing"])
        np.testing.assert_allclose(np.abs(np.diag(c.affine[:3, :3])), sp)
        assert sp[2] > sp[0] * 1.05                       # anisotropic slices
        assert np.abs(c.affine[:3, 3]).max() > 50          # scanner origin offset
        codes.add(nib.aff2axcodes(c.affine))
        assert "".join(nib.aff2axcodes(c.affine)) == c.info["orientation"]
        i = {n: k for k, n in enumerate(AMOS_CLASSES)}
        # RAS world: +x = patient right, +y = anterior, +z = superior
        liver, spleen = _world_centroid(c, i["liver"]), _world_centroid(c, i["spleen"])
        rk, lk = _world_centroid(c, i["right_kidney"]), _world_centroid(c, i["left_kidney"])
        bladder, stomach = _world_centroid(c, i["bladder"]), _world_centroid(c, i["stomach"])
        assert liver[0] > spleen[0] and rk[0] > lk[0]
        assert stomach[1] > rk[1]                          # kidneys are posterior
        assert stomach[2] > bladder[2]
        assert _world_centroid(c, i["right_adrenal_gland"])[2] > rk[2]
    # several orientations among cases (seeded, so this is deterministic)
    assert len(codes) >= 2, codes


def test_written_affine_round_trips(tmp_path):
    make_phantom(tmp_path, "synapse", cases=1, seed=5, shape=SMALL)
    c = phantom_case(5, 0, "synapse", SMALL)
    img = nib.load(tmp_path / "RawData/Training/img/img0001.nii.gz")
    np.testing.assert_allclose(img.affine, c.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(img.dataobj), c.image)
    assert img.header.get_qform(coded=True)[1] == 1 and img.header.get_sform(coded=True)[1] == 1


def test_deterministic_per_seed_and_varies_between_cases():
    a, b = phantom_case(11, 2, "synapse", SMALL), phantom_case(11, 2, "synapse", SMALL)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_array_equal(a.affine, b.affine)
    other_seed = phantom_case(12, 2, "synapse", SMALL)
    other_case = phantom_case(11, 3, "synapse", SMALL)
    for o in (other_seed, other_case):
        assert not np.array_equal(a.label, o.label)
        assert not np.array_equal(a.image, o.image)
    # per-organ volumes vary between cases
    ca = np.bincount(a.label.ravel(), minlength=14) * np.prod(a.info["spacing"])
    co = np.bincount(other_case.label.ravel(), minlength=14) * np.prod(other_case.info["spacing"])
    assert np.abs(np.log(ca[1:] / co[1:])).max() > 0.1


def test_tiny_grid_keeps_every_organ():
    c = phantom_case(0, 0, "amos", (24, 24, 24))
    assert (np.bincount(c.label.ravel(), minlength=len(AMOS_CLASSES))[1:] > 0).all()


def test_bad_arguments(tmp_path):
    with pytest.raises(PhantomError, match="layout"):
        make_phantom(tmp_path, "btcv", cases=1)
    with pytest.raises(PhantomError, match="at least 1 case"):
        make_phantom(tmp_path, "synapse", cases=0)
    with pytest.raises(PhantomError, match="shape"):
        phantom_case(0, 0, "synapse", (4, 40, 40))
    with pytest.raises(PhantomError, match="spacing"):
        phantom_case(0, 0, "synapse", SMALL, spacing=(1, -1, 2))


@pytest.fixture(scope="module")
def cohort():
    """16 small AMOS cases: enough for between-patient spreads (the checks below are seeded)."""
    return [phantom_case(7, i, "amos", SMALL) for i in range(16)]


def test_inter_patient_variation_has_literature_magnitudes(cohort):
    """Spreads between cases as in adult abdominal CT (sources: phantom.py's variation table).

    Measured on the labels and the image, in the scan's own frame (what an atlas aligned on the
    scan sees). The phantom before issue 9 had kidney-level SD ~9 mm, stomach CV ~0.2, scan
    extent SD ~13 mm and body width CV ~0.06: every check below but the liver volume failed on it.
    """
    i = {n: k for k, n in enumerate(AMOS_CLASSES)}

    def z_from_scan_centre(c, k):                      # mm, along the slice axis
        return (np.argwhere(c.label == k)[:, 2].mean() - (c.label.shape[2] - 1) / 2) * abs(c.affine[2, 2])

    def ml(c, organ):
        return np.count_nonzero(c.label == i[organ]) * np.prod(c.info["spacing"]) / 1000

    def cv(values):
        return np.std(values, ddof=1) / np.mean(values)

    # kidney level: renal hila at L1-L2 +- about one vertebra (~35 mm) -> SD >= ~15 mm
    kidney_z = [np.mean([z_from_scan_centre(c, i[f"{s}_kidney"]) for s in ("right", "left")])
                for c in cohort]
    assert np.std(kidney_z, ddof=1) >= 15.0
    # liver volume: SD ~20-25 % of the mean (standard liver volume studies)
    assert 0.15 <= cv([ml(c, "liver") for c in cohort]) <= 0.35
    # stomach filling: fasting .. after an oral drink
    assert cv([ml(c, "stomach") for c in cohort]) >= 0.3
    # scan extent: from just above the liver dome to well into the chest
    assert np.std([c.label.shape[2] * abs(c.affine[2, 2]) for c in cohort], ddof=1) >= 20.0
    # body habitus: body width (air/body boundary) varies like waist circumference (CV ~ 0.15)
    widths = [np.ptp(np.nonzero((c.image > -500).any((1, 2)))[0]) * abs(c.affine[0, 0]) for c in cohort]
    assert cv(widths) >= 0.09


def test_natural_imbalance_kept(cohort):
    """Liver about half of the organ voxels, each adrenal gland a fraction of a percent."""
    i = {n: k for k, n in enumerate(AMOS_CLASSES)}
    ml = sum(np.bincount(c.label.ravel(), minlength=len(AMOS_CLASSES)) * np.prod(c.info["spacing"])
             for c in cohort)
    share = ml[1:] / ml[1:].sum()
    assert 0.4 < share[i["liver"] - 1] < 0.6
    for side in ("right", "left"):
        assert 0.0005 < share[i[f"{side}_adrenal_gland"] - 1] < 0.005
