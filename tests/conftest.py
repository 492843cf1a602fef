"""Shared fixtures: a tiny Synapse-layout phantom, raw and prepped (session-scoped, built once).

``phantom_raw``: 8 cases of 48 x 48 x 40 voxels (random anisotropic spacing ~8-10 mm, RAS/LPS/
LAS orientations) in ``RawData/Training/{img,label}``. ``phantom_prep``: it checked, prepped at
the default spacing (the phantom's median, ~8.8 x 8.8 x 11 mm) and split with 25 % labeled
(5 train -> 1 labeled / 4 unlabeled, 1 eval, 2 test; ``read_split(prep, "labeled_25p")``).
``shared_data``: ``../shared/data`` next to the repository (override with MEDSEG_DPL_SHARED);
tests that need it skip when it is absent.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# the helper modules (train_helpers, data_helpers, eval_helpers) for tests in every subfolder
sys.path.insert(0, str(Path(__file__).resolve().parent))

PHANTOM_SHAPE = (48, 48, 40)
PHANTOM_CASES = 8


def shared_data_dir() -> Path:
    env = os.environ.get("MEDSEG_DPL_SHARED")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = shared_data_dir()
    if not (d / "real_ct" / "ct.nii.gz").exists():
        pytest.skip(f"shared test data not found at {d} (set MEDSEG_DPL_SHARED to the folder "
                    "holding real_ct/ and dhc_splits/)")
    return d


@pytest.fixture(scope="session")
def phantom_raw(tmp_path_factory) -> Path:
    from medseg_dpl.data.phantom import make_phantom

    out = tmp_path_factory.mktemp("phantom_raw")
    make_phantom(out, layout="synapse", cases=PHANTOM_CASES, seed=0, shape=PHANTOM_SHAPE)
    return out


@pytest.fixture(scope="session")
def phantom_prep(phantom_raw, tmp_path_factory) -> Path:
    import io

    from medseg_dpl.data.preprocess import preprocess_dataset
    from medseg_dpl.data.splits import make_splits

    out = tmp_path_factory.mktemp("phantom_prep") / "prep"
    preprocess_dataset("synapse", phantom_raw, out, workers=1, progress=False, stream=io.StringIO())
    make_splits(out, labeled=0.25, seed=0)
    return out
