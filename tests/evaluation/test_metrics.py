"""Per-organ metrics: agreement with MONAI's full-volume metrics, hand-computed cases, empty organs."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance
from monai.networks.utils import one_hot

from medseg_dpl.evaluation.metrics import (DHC_PENALTY, MetricInputError, dice_per_class,
                                           image_diagonal_mm, organ_metrics)


def _blobs(rng, shape, num_classes, n_blobs=3):
    """A label map of overlapping random boxes, one or more per organ."""
    lab = np.zeros(shape, np.uint8)
    for c in range(1, num_classes):
        for _ in range(n_blobs):
            lo = [rng.integers(0, s - 4) for s in shape]
            hi = [min(s, a + rng.integers(2, max(3, s // 2))) for a, s in zip(lo, shape)]
            lab[tuple(slice(a, b) for a, b in zip(lo, hi))] = c
    return lab


def _perturb(rng, lab, num_classes):
    out = lab.copy()
    noise = rng.random(lab.shape) < 0.05
    out[noise] = rng.integers(0, num_classes, noise.sum())
    return np.roll(out, shift=rng.integers(-2, 3), axis=int(rng.integers(0, 3)))


def _monai_full(pred, truth, num_classes, spacing):
    """MONAI's metrics on the full one-hot volumes (the reference)."""
    p = one_hot(torch.from_numpy(pred.astype(np.int64))[None, None], num_classes)
    t = one_hot(torch.from_numpy(truth.astype(np.int64))[None, None], num_classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = compute_dice(p, t, include_background=False)[0].numpy()
        h = compute_hausdorff_distance(p, t, percentile=95, spacing=spacing)[0].numpy()
        a = compute_average_surface_distance(p, t, symmetric=True, spacing=spacing)[0].numpy()
    return d, h, a


@pytest.mark.parametrize("seed,spacing", [(0, (1.0, 1.0, 1.0)), (1, (0.7, 1.3, 2.5)), (2, (3.0, 0.8, 1.6))])
def test_agrees_with_monai_full_volume(seed, spacing):
    rng = np.random.default_rng(seed)
    shape, nc = (28, 24, 20), 6
    truth = _blobs(rng, shape, nc)
    pred = _perturb(rng, truth, nc)
    m = organ_metrics(pred, truth, nc, spacing=spacing)
    d, h, a = _monai_full(pred, truth, nc, spacing)
    present = [(pred == c).any() and (truth == c).any() for c in range(1, nc)]
    assert all(present)  # random blobs: every organ in both maps, MONAI defines all values
    np.testing.assert_allclose(m["dice"], d, rtol=0, atol=1e-6)
    np.testing.assert_allclose(m["hd95"], h, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m["asd"], a, rtol=1e-5, atol=1e-5)


def test_two_cubes_offset_by_known_mm_anisotropic():
    # 4x4x4-voxel cubes, the prediction shifted by 2 voxels along Z where the spacing is 2.5 mm.
    spacing = (0.8, 1.2, 2.5)
    truth = np.zeros((12, 12, 14), np.uint8)
    truth[4:8, 4:8, 4:8] = 1
    pred = np.zeros_like(truth)
    pred[4:8, 4:8, 6:10] = 1
    m = organ_metrics(pred, truth, 2, spacing=spacing)
    assert m["dice"][0] == pytest.approx(2 * 32 / 128)  # overlap 4*4*2 = 32 voxels of 64 each
    # The farthest pred surface voxels (layer 9) are 2 layers = 5 mm from the truth's top
    # face (layer 7) and no surface voxel is farther, so the Hausdorff distance is 5 mm.
    assert 0 < m["hd95"][0] <= 5.0 + 1e-6
    d = _monai_full(pred, truth, 2, spacing)
    assert m["hd95"][0] == pytest.approx(float(d[1][0]), abs=1e-5)
    assert m["asd"][0] == pytest.approx(float(d[2][0]), abs=1e-5)


def test_hand_computed_slab_distances():
    # Two one-voxel-thick plates 3 voxels apart along X with spacing 2 mm on X: every surface
    # voxel of one is exactly 6 mm from the other -> HD95 = ASD = 6 mm, Dice 0.
    truth = np.zeros((10, 6, 6), np.uint8)
    pred = np.zeros_like(truth)
    truth[2, 1:5, 1:5] = 1
    pred[5, 1:5, 1:5] = 1
    m = organ_metrics(pred, truth, 2, spacing=(2.0, 0.5, 0.5))
    assert m["dice"][0] == 0.0
    assert m["hd95"][0] == pytest.approx(6.0)
    assert m["asd"][0] == pytest.approx(6.0)
    # DHC protocol: voxel units (medpy without voxelspacing) -> 3 voxels
    m = organ_metrics(pred, truth, 2, spacing=(2.0, 0.5, 0.5), protocol="dhc")
    assert m["hd95"][0] == pytest.approx(3.0) and m["asd"][0] == pytest.approx(3.0)


def test_perfect_prediction():
    rng = np.random.default_rng(3)
    truth = _blobs(rng, (20, 20, 16), 4)
    m = organ_metrics(truth, truth.copy(), 4, spacing=(1.5, 1.5, 2.0))
    np.testing.assert_array_equal(m["dice"], 1.0)
    np.testing.assert_array_equal(m["hd95"], 0.0)
    np.testing.assert_array_equal(m["asd"], 0.0)


def test_empty_organ_rules():
    truth = np.zeros((10, 10, 10), np.uint8)
    pred = np.zeros_like(truth)
    truth[2:5, 2:5, 2:5] = 1          # organ 1: both
    pred[2:5, 2:6, 2:5] = 1
    truth[6:9, 6:9, 6:9] = 2          # organ 2: missed by the prediction
    pred[0:2, 7:9, 7:9] = 3           # organ 3: false positive only
    # organ 4: absent in both
    spacing = (1.0, 2.0, 3.0)
    m = organ_metrics(pred, truth, 5, spacing=spacing)
    diag = image_diagonal_mm(truth.shape, spacing)
    assert diag == pytest.approx(np.sqrt(10**2 + 20**2 + 30**2))
    assert m["dice"][0] == pytest.approx(2 * 27 / (27 + 36))
    assert m["dice"][1] == 0.0 and m["dice"][2] == 0.0
    assert m["hd95"][1] == m["asd"][1] == m["hd95"][2] == m["asd"][2] == pytest.approx(diag)
    assert np.isnan(m["dice"][3]) and np.isnan(m["hd95"][3]) and np.isnan(m["asd"][3])
    custom = organ_metrics(pred, truth, 5, spacing=spacing, penalty=50.0)
    assert custom["hd95"][1] == 50.0
    dhc = organ_metrics(pred, truth, 5, spacing=spacing, protocol="dhc")
    assert dhc["dice"][3] == 1.0 and dhc["asd"][3] == 0.0
    assert dhc["asd"][1] == DHC_PENALTY and dhc["asd"][2] == DHC_PENALTY and dhc["dice"][1] == 0.0
    d = dice_per_class(torch.from_numpy(pred), torch.from_numpy(truth), 5)
    assert d.shape == (4,) and np.isnan(d[3])
    np.testing.assert_allclose(d[:3], m["dice"][:3])


def test_dhc_distances_match_medpy_definition():
    # medpy: asd = mean of pred->truth distances; hd95 = 95th percentile of both directions pooled.
    from scipy import ndimage
    rng = np.random.default_rng(4)
    truth = _blobs(rng, (18, 16, 14), 2)
    pred = _perturb(rng, truth, 2)
    fp = lambda b: b ^ ndimage.binary_erosion(b)  # noqa: E731  (medpy's border definition)
    pb, tb = fp(pred == 1), fp(truth == 1)
    d_pt = ndimage.distance_transform_edt(~tb)[pb]
    d_tp = ndimage.distance_transform_edt(~pb)[tb]
    m = organ_metrics(pred, truth, 2, spacing=(2.0, 2.0, 2.0), protocol="dhc")
    assert m["asd"][0] == pytest.approx(d_pt.mean(), abs=1e-5)
    assert m["hd95"][0] == pytest.approx(np.percentile(np.hstack([d_pt, d_tp]), 95), abs=1e-5)


def test_bad_inputs():
    with pytest.raises(MetricInputError, match="shape"):
        organ_metrics(np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 5), np.uint8), 3)
    with pytest.raises(MetricInputError, match="labels must be in"):
        organ_metrics(np.full((4, 4, 4), 7, np.uint8), np.zeros((4, 4, 4), np.uint8), 3)
