"""MONAI pipelines on a tiny PREP_DIR written here (32³ volumes, 4 classes incl. a tiny organ)."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg_dpl.data.io import DataError
from medseg_dpl.data.pipelines import build_dataset, unlabeled_transforms

SIZE = 32
PATCH = (16, 16, 16)
C = 4  # background, big, medium, tiny


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    """3 labeled cases + 1 unlabeled test case; the tiny organ is 8 voxels in a corner."""
    out = tmp_path_factory.mktemp("prep")
    (out / "imagesTr").mkdir()
    (out / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    g = np.stack(np.meshgrid(*[np.arange(SIZE)] * 3, indexing="ij"))
    affine = np.array([[1.5, 0, 0, -20], [0, 1.5, 0, 10], [0, 0, 2.5, -300], [0, 0, 0, 1]])
    cases, counts = [], np.zeros(C, int)
    for k in range(4):
        cid = f"{k + 1:04d}"
        img = rng.uniform(0.2, 0.4, (SIZE,) * 3).astype(np.float32)
        lab = np.zeros((SIZE,) * 3, np.uint8)
        lab[np.linalg.norm(g - np.array([20, 18, 16])[:, None, None, None], axis=0) < 9] = 1
        lab[np.linalg.norm(g - np.array([8, 24, 20])[:, None, None, None], axis=0) < 4] = 2
        lab[27:29, 3:5, 26:28] = 3
        img += 0.15 * lab
        nib.save(nib.Nifti1Image(img, affine), str(out / "imagesTr" / f"{cid}.nii.gz"))
        labeled = k < 3
        if labeled:
            nib.save(nib.Nifti1Image(lab, affine), str(out / "labelsTr" / f"{cid}.nii.gz"))
            counts += np.bincount(lab.ravel(), minlength=C)
        cases.append({"id": cid, "image": f"imagesTr/{cid}.nii.gz",
                      "label": f"labelsTr/{cid}.nii.gz" if labeled else None,
                      "subset": "train" if labeled else "test", "source_image": "x", "source_label": None,
                      "original": {"shape": [SIZE] * 3, "affine": affine.tolist(), "spacing": [1.5, 1.5, 2.5]},
                      "crop_box": [[0, SIZE]] * 3, "shape": [SIZE] * 3})
    names = ["background", "big", "medium", "tiny"]
    (out / "dataset.json").write_text(json.dumps({
        "dataset": "nifti", "classes": names, "spacing": [1.5, 1.5, 2.5], "orientation": "RAS",
        "intensity": {"clip": [-175.0, 250.0]},
        "label_counts": dict(zip(names, map(int, counts))), "cases": cases}))
    return out


def _draw(ds, i, seed):
    ds.transform.set_random_state(seed=seed)
    return ds[i]


def test_labeled_crops_shapes_dtypes_ids(prep):
    ds = build_dataset(prep, ["0001", "0002"], "labeled", PATCH, C, num_samples=3, spatial=False)
    items = _draw(ds, 1, 0)
    assert isinstance(items, list) and len(items) == 3
    for it in items:
        assert it["id"] == "0002"
        assert tuple(it["image"].shape) == (1, *PATCH) and it["image"].dtype == torch.float32
        assert tuple(it["label"].shape) == (1, *PATCH) and it["label"].dtype == torch.int64
        assert set(torch.unique(it["label"]).tolist()) <= set(range(C))
        assert "label_cls_indices" not in it
        # the crop's affine places it inside the volume: image voxels equal the source volume's
        src = np.asarray(nib.load(str(prep / "imagesTr/0002.nii.gz")).dataobj)
        lab = np.asarray(nib.load(str(prep / "labelsTr/0002.nii.gz")).dataobj)
        off = np.rint(np.linalg.solve(nib.load(str(prep / "imagesTr/0002.nii.gz")).affine,
                                      it["label"].affine.numpy())[:3, 3]).astype(int)
        sl = tuple(slice(o, o + p) for o, p in zip(off, PATCH))
        np.testing.assert_array_equal(it["label"][0].numpy(), lab[sl])
        # intensity augmentation is mild: strongly correlated with the source voxels
        assert np.corrcoef(it["image"][0].numpy().ravel(), src[sl].ravel())[0, 1] > 0.9


def test_class_balanced_crops_find_the_tiny_organ(prep):
    """Equal class ratios: ~1/4 of crops are centred on the 8-voxel organ (random crops: ~1 %)."""
    ds = build_dataset(prep, ["0001"], "labeled", PATCH, C, num_samples=4)
    crops = [c for s in range(25) for c in _draw(ds, 0, s)]
    share = np.mean([(c["label"] == 3).any().item() for c in crops])
    assert share >= 0.15, share
    # every class is sampled, and the big organ does not dominate the centres
    assert np.mean([(c["label"] == 2).any().item() for c in crops]) >= 0.15


def test_labeled_pads_small_volumes(prep):
    ds = build_dataset(prep, ["0003"], "labeled", (40, 24, 36), C, num_samples=1, cache=False)
    it = _draw(ds, 0, 1)[0]
    assert tuple(it["image"].shape) == (1, 40, 24, 36) and tuple(it["label"].shape) == (1, 40, 24, 36)


def test_unlabeled_views_share_voxels(prep):
    ds = build_dataset(prep, ["0001", "0004"], "unlabeled", PATCH, C, num_samples=2, spatial=False)
    items = _draw(ds, 1, 3)
    assert len(items) == 2
    for it in items:
        assert it["id"] == "0004" and "image" not in it and "label" not in it
        w, s = it["image_weak"], it["image_strong"]
        assert tuple(w.shape) == tuple(s.shape) == (1, *PATCH)
        assert w.dtype == s.dtype == torch.float32
        np.testing.assert_allclose(w.affine.numpy(), s.affine.numpy())
        # the weak view is the raw crop (no augmentation): equal to the volume at its affine
        src_img = nib.load(str(prep / "imagesTr/0004.nii.gz"))
        off = np.rint(np.linalg.solve(src_img.affine, w.affine.numpy())[:3, 3]).astype(int)
        sl = tuple(slice(o, o + p) for o, p in zip(off, PATCH))
        np.testing.assert_allclose(w[0].numpy(), np.asarray(src_img.dataobj)[sl], atol=1e-6)


def test_strong_view_cutout_only_changes_boxes(prep):
    """Intensity aug off: strong == weak outside the cut-out boxes, and boxes do occur."""
    from monai.data import Dataset
    t = unlabeled_transforms(PATCH, num_samples=1, strong_intensity=False, cutout=True, spatial=False)
    ds = Dataset([{"id": "0001", "image": str(prep / "imagesTr/0001.nii.gz")}], t)
    changed_any = 0
    for seed in range(8):
        it = _draw(ds, 0, seed)[0]
        w, s = it["image_weak"][0].numpy(), it["image_strong"][0].numpy()
        diff = w != s
        if diff.any():
            changed_any += 1
            # changes are confined to boxes covering at most 3 * (1/3)^3 of the patch
            assert diff.mean() <= 3 * (1 / 3) ** 3 + 1e-6
            idx = np.argwhere(diff)
            assert (idx.max(0) - idx.min(0) + 1 <= np.array(PATCH)).all()
    assert 1 <= changed_any <= 7  # prob=0.5 per crop


def test_spatial_augmentation_keeps_image_and_label_aligned(prep):
    """With the random affine on, crops differ from the source grid, but image and label move
    together: each class keeps its own intensity (the fixture paints class c with value c/10)."""
    ds = build_dataset(prep, ["0002"], "labeled", PATCH, C, num_samples=4, spatial=True, cache=False)
    moved = 0
    for seed in range(6):
        for it in _draw(ds, 0, seed):
            img, lab = it["image"][0].numpy(), it["label"][0].numpy()
            moved += not np.allclose(it["image"].affine.numpy()[:3, :3],
                                     nib.load(str(prep / "imagesTr/0002.nii.gz")).affine[:3, :3])
            means = [img[lab == c].mean() for c in range(C) if (lab == c).sum() > 20]
            assert np.all(np.diff(means) > 0), means  # class order of intensities survives
    assert moved > 0


def test_strong_view_intensity_only_is_correlated_not_identical(prep):
    from monai.data import Dataset
    t = unlabeled_transforms(PATCH, num_samples=1, strong_intensity=True, cutout=False)
    ds = Dataset([{"id": "0001", "image": str(prep / "imagesTr/0001.nii.gz")}], t)
    for seed in range(4):
        it = _draw(ds, 0, seed)[0]
        w, s = it["image_weak"][0].numpy().ravel(), it["image_strong"][0].numpy().ravel()
        assert not np.allclose(w, s)
        # same voxels: the organ contrast survives (correlation well above chance)
        assert np.corrcoef(w, s)[0, 1] > 0.3


def test_eval_whole_volume_with_and_without_label(prep):
    ds = build_dataset(prep, ["0002", "0004"], "eval", PATCH, C, num_samples=1)
    a, b = ds[0], ds[1]
    assert a["id"] == "0002" and b["id"] == "0004"
    assert tuple(a["image"].shape) == (1, SIZE, SIZE, SIZE) and a["image"].dtype == torch.float32
    assert tuple(a["label"].shape) == (1, SIZE, SIZE, SIZE) and a["label"].dtype == torch.int64
    lab = np.asarray(nib.load(str(prep / "labelsTr/0002.nii.gz")).dataobj)
    np.testing.assert_array_equal(a["label"][0].numpy(), lab)
    assert "label" not in b


def test_cached_and_uncached_agree_per_seed(prep):
    a = build_dataset(prep, ["0001"], "labeled", PATCH, C, num_samples=2, cache=True)
    b = build_dataset(prep, ["0001"], "labeled", PATCH, C, num_samples=2, cache=False)
    for x, y in zip(_draw(a, 0, 5), _draw(b, 0, 5)):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])


def test_bad_requests_name_the_cause(prep):
    with pytest.raises(DataError, match="unknown case id.*9999"):
        build_dataset(prep, ["0001", "9999"], "labeled", PATCH, C)
    with pytest.raises(DataError, match="0004 has no label"):
        build_dataset(prep, ["0004"], "labeled", PATCH, C)
    with pytest.raises(ValueError, match="unknown dataset kind"):
        build_dataset(prep, ["0001"], "train", PATCH, C)
    with pytest.raises(ValueError, match="patch_size"):
        build_dataset(prep, ["0001"], "labeled", (16, 16), C)
