"""``<case>_probs.npz``: the file format's round trip, its refusals, and resampling between grids."""
from __future__ import annotations

import numpy as np
import pytest

from medseg_dpl.evaluation.probabilities import (PROBS_SUFFIX, ProbsFileError, load_probs_npz, probs_on_grid,
                                                 save_probs_npz)


def _softmax(shape=(3, 6, 5, 4), seed=0) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(size=shape)
    return (np.exp(logits) / np.exp(logits).sum(0)).astype(np.float32)


def _affine(spacing=(2.0, 3.0, 4.0), origin=(10.0, -4.0, 7.0)) -> np.ndarray:
    a = np.diag([*spacing, 1.0])
    a[:3, 3] = origin
    return a


def test_save_load_round_trip(tmp_path):
    probs, affine = _softmax(), _affine()
    path = save_probs_npz(tmp_path / f"case1{PROBS_SUFFIX}", probs, affine)
    assert path == tmp_path / "case1_probs.npz"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case1_probs.npz"]  # no .npz.npz, no temp file
    got, got_affine = load_probs_npz(path)
    assert got.dtype == np.float16 and got.shape == probs.shape
    np.testing.assert_array_equal(got, probs.astype(np.float16))
    assert got_affine.dtype == np.float64
    np.testing.assert_array_equal(got_affine, affine)
    with pytest.raises(ValueError, match="bad_probs.npz"):
        save_probs_npz(tmp_path / "bad_probs.npz", probs[0], affine)  # (X, Y, Z): no class axis


def test_malformed_files_are_named(tmp_path):
    with pytest.raises(ProbsFileError, match="missing_probs.npz: probability file not found"):
        load_probs_npz(tmp_path / "missing_probs.npz")
    junk = tmp_path / "junk_probs.npz"
    junk.write_bytes(b"not an npz")
    with pytest.raises(ProbsFileError, match="junk_probs.npz: cannot read"):
        load_probs_npz(junk)
    cases = {"keys": ({"probs": _softmax()}, "needs arrays"),
             "shape": ({"probs": _softmax()[0], "affine": _affine()}, "must be float"),
             "ints": ({"probs": np.zeros((2, 3, 3, 3), np.uint8), "affine": _affine()}, "must be float"),
             "singular": ({"probs": _softmax(), "affine": np.zeros((4, 4))}, "invertible")}
    for name, (arrays, cause) in cases.items():
        path = tmp_path / f"{name}_probs.npz"
        with open(path, "wb") as f:
            np.savez(f, **arrays)
        with pytest.raises(ProbsFileError, match=f"{name}_probs.npz: .*{cause}"):
            load_probs_npz(path)


def test_same_grid_is_a_float16_copy():
    probs, affine = _softmax(), _affine()
    out = probs_on_grid(probs, affine, probs.shape[1:], affine)
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, probs.astype(np.float16))
    with pytest.raises(ValueError, match="C, X, Y, Z"):
        probs_on_grid(probs[0], affine, probs.shape[1:], affine)


def test_a_larger_grid_gets_the_source_voxels_and_background_outside():
    """The destination starts 3 voxels before the source along x: its voxels 3.. are the
    source's, voxels 0..2 lie outside the source's extent and are certain background."""
    probs, src = _softmax(), _affine()
    shift = np.eye(4)
    shift[0, 3] = -3.0                      # dst voxel i -> src voxel i - 3
    dst = src @ shift
    out = probs_on_grid(probs, src, (9, 5, 4), dst)
    assert out.shape == (3, 9, 5, 4) and out.dtype == np.float16
    np.testing.assert_allclose(out[:, 3:].astype(np.float32), probs, atol=1e-3)
    assert (out[0, :3] == 1).all() and (out[1:, :3] == 0).all()
    np.testing.assert_allclose(out.astype(np.float32).sum(0), 1.0, atol=2e-3)


def test_file_round_trip_back_onto_the_source_grid(tmp_path):
    """What ``predict --save-probs`` writes (probabilities on the input's grid) read back onto
    the preprocessed grid, as teacher mode reads it: the source values, within float16."""
    probs, prep = _softmax((3, 8, 6, 5), seed=1), _affine((2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])  # the input: an LPS-ordered grid over the same voxels
    flip[:3, 3] = [7.0, 5.0, 0.0]
    inp = prep @ flip
    on_input = probs_on_grid(probs, prep, probs.shape[1:], inp)
    np.testing.assert_allclose(on_input.astype(np.float32), probs[:, ::-1, ::-1], atol=1e-3)
    back, affine = load_probs_npz(save_probs_npz(tmp_path / f"c{PROBS_SUFFIX}", on_input, inp))
    np.testing.assert_allclose(probs_on_grid(back, affine, probs.shape[1:], prep).astype(np.float32),
                               probs, atol=1e-3)
