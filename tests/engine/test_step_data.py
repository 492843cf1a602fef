"""engine/data.py: step-addressable batches (step k's batch a function of (seed, k, rank) only,
so a resumed loader replays the uninterrupted run) and the external teacher's predictions."""
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from train_helpers import make_tiny_prep

from medseg_dpl.engine.data import (StepBatches, TeacherPredictionError, TeacherVolumes, step_loader,
                                    step_seed)

C = 4
PATCH = [16, 16, 16]


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    # 6 cases: 2 eval, 2 labeled, 2 unlabeled
    return make_tiny_prep(tmp_path_factory.mktemp("tinyprep_stepdata"), n_cases=6, labeled=2, eval_n=2)


def _ids(prep, name):
    return (prep / "splits" / f"{name}.txt").read_text(encoding="utf-8").split()


def _sources(prep, spatial=True, with_truth=False):
    """The trainer's two sources on fresh (uncached) datasets: 1 labeled + 2 unlabeled volumes."""
    from medseg_dpl.data.pipelines import build_dataset
    lab, unl = _ids(prep, "labeled_20p"), _ids(prep, "unlabeled_20p")
    return {"labeled": (build_dataset(prep, lab, "labeled", PATCH, C, 1, False, spatial=spatial), lab, 1),
            "unlabeled": (build_dataset(prep, unl, "unlabeled", PATCH, C, 1, False, spatial=spatial,
                                        with_truth=with_truth), unl, 2)}


def _tensors(batch, prefix=""):
    """Flat {name: plain tensor} of a (nested) batch."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, dict):
            out.update(_tensors(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            out[prefix + k] = v.as_tensor() if hasattr(v, "as_tensor") else v
    return out


def _same(a, b) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


# --- step_seed -----------------------------------------------------------------------------

def test_step_seed_is_a_31_bit_function_of_all_four_arguments():
    base = step_seed(0, 5, 0, 1)
    assert base == step_seed(0, 5, 0, 1) and 0 <= base < 2**31
    others = [step_seed(1, 5, 0, 1), step_seed(0, 6, 0, 1), step_seed(0, 5, 1, 1), step_seed(0, 5, 0, 2)]
    assert len({base, *others}) == 5
    # no collisions over a small grid (a well-mixed seed, not e.g. seed + step)
    grid = {step_seed(s, k, r, j) for s in range(3) for k in range(20) for r in range(2) for j in (0, 1, 100)}
    assert len(grid) == 3 * 20 * 2 * 3


# --- step indices and global-generator randomness, on a dataset that says what it drew ----

class _Probe(Dataset):
    """Item i -> its index and a draw from the global torch generator (which StepBatches seeds)."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"idx": torch.tensor(i), "noise": torch.rand(3), "id": f"case{i}"}


def _indices(batches, step, name="a"):
    return batches[step][name]["idx"].tolist()


def test_each_epoch_is_a_permutation_split_between_ranks():
    n, bs, world, steps = 5, 3, 2, 10
    per_rank = [sum((_indices(StepBatches({"a": (_Probe(n), None, bs)}, 7, r, world), k)
                     for k in range(steps)), []) for r in range(world)]
    per_epoch = -(-n // world)  # DistributedSampler without drop_last: ceil(n / world) per rank
    epochs = []
    for e in range(steps * bs // per_epoch):
        parts = [seq[e * per_epoch:(e + 1) * per_epoch] for seq in per_rank]
        union = sorted(parts[0] + parts[1])
        # every volume once per epoch over the ranks (one repeated to pad 5 to 2 x 3)
        assert set(union) == set(range(n)) and len(union) == world * per_epoch
        epochs.append(tuple(parts[0]))
    assert len(set(epochs)) > 1  # reshuffled between epochs


def test_probe_batch_depends_on_seed_step_rank_only():
    def make(seed=0, rank=0):
        return StepBatches({"a": (_Probe(4), None, 2)}, seed, rank, 2)

    b = make()[3]["a"]
    assert "id" not in b                                     # ids are taken out before collating
    torch.manual_seed(123), np.random.seed(5)                # the caller's generator state is irrelevant
    assert _same(make()[3], {"a": b})
    assert not torch.equal(make()[4]["a"]["noise"], b["noise"])
    assert not torch.equal(make(rank=1)[3]["a"]["noise"], b["noise"])
    assert not torch.equal(make(seed=1)[3]["a"]["noise"], b["noise"])
    assert not torch.equal(b["noise"][0], b["noise"][1])     # each item of a batch its own seed


def test_random_access_order_does_not_matter_across_epochs():
    ref = StepBatches({"a": (_Probe(3), None, 2)}, 0, 0, 1)
    fresh = [ref[k] for k in range(6)]
    jumping = StepBatches({"a": (_Probe(3), None, 2)}, 0, 0, 1)
    for k in (5, 0, 4, 1, 3, 2, 5):   # the epoch cache must not leak between steps
        assert _same(jumping[k], fresh[k]), k


# --- the trainer's real pipelines ----------------------------------------------------------

def test_real_batches_have_the_trainer_shapes_and_are_reproducible(prep):
    a = StepBatches(_sources(prep), seed=0)
    b = StepBatches(_sources(prep), seed=0)   # built again from scratch
    batch = a[2]
    assert set(batch) == {"labeled", "unlabeled"}
    assert tuple(batch["labeled"]["image"].shape) == (1, 1, *PATCH)
    assert tuple(batch["labeled"]["label"].shape) == (1, 1, *PATCH)
    assert batch["labeled"]["label"].dtype == torch.int64
    for key in ("image_weak", "image_strong"):
        assert tuple(batch["unlabeled"][key].shape) == (2, 1, *PATCH)
    assert "id" not in batch["labeled"] and "id" not in batch["unlabeled"]
    assert _same(b[2], batch)
    assert not _same(a[3], batch)                                    # another step
    assert not _same(StepBatches(_sources(prep), seed=0, rank=1, world=2)[2], batch)  # another rank
    assert not _same(StepBatches(_sources(prep), seed=1)[2], batch)  # another seed


def test_resumed_step_loader_replays_the_uninterrupted_run(prep):
    steps, start = 5, 3
    full = list(step_loader(StepBatches(_sources(prep), seed=0), 0, steps, num_workers=0))
    assert len(full) == steps
    resumed = list(step_loader(StepBatches(_sources(prep), seed=0), start, steps, num_workers=0))
    assert len(resumed) == steps - start
    assert all(_same(r, f) for r, f in zip(resumed, full[start:]))
    # whatever the number of workers: the randomness lives in the step, not in the loader
    with_worker = list(step_loader(StepBatches(_sources(prep), seed=0), start, steps, num_workers=1))
    assert all(_same(r, f) for r, f in zip(with_worker, full[start:]))


def test_teacher_probs_follow_each_unlabeled_crop(prep):
    """The teacher's predictions are the labels themselves (smoothing 0): each crop's teacher
    argmax is the truth cut from the same voxels; labeled crops get no teacher."""
    man = json.loads((prep / "dataset.json").read_text(encoding="utf-8"))
    tv = TeacherVolumes(str(prep / "labelsTr"), str(prep), man, C, smoothing=0.0)
    batches = StepBatches(_sources(prep, spatial=False, with_truth=True), 0, teacher=tv, patch_size=PATCH)
    for k in (0, 1):
        u = batches[k]["unlabeled"]
        assert tuple(u["teacher_probs"].shape) == (2, C, *PATCH)
        assert torch.equal(u["teacher_probs"].argmax(1), u["truth"][:, 0].as_tensor())
        assert "teacher_probs" not in batches[k]["labeled"]


# --- TeacherVolumes: what a bad prediction is told --------------------------------------------

@pytest.fixture
def teacher(prep, tmp_path):
    man = json.loads((prep / "dataset.json").read_text(encoding="utf-8"))
    d = tmp_path / "preds"
    d.mkdir()
    return d, (lambda s=0.1: TeacherVolumes(str(d), str(prep), man, C, smoothing=s))


def _save(path, arr):
    nib.save(nib.Nifti1Image(arr, np.diag([1.5, 1.5, 2.0, 1.0])), str(path))


def test_check_names_the_missing_cases(teacher):
    d, make = teacher
    _save(d / "0003.nii.gz", np.zeros((32, 32, 32), np.uint8))
    make().check(["0003"])                       # present: fine
    with pytest.raises(TeacherPredictionError) as e:
        make().check(["0003", "0005", "0006"])
    msg = str(e.value)
    assert "2 unlabeled case(s)" in msg and str(d / "0005.nii.gz") in msg and "0005_probs.npz" in msg
    from medseg_dpl.evaluation.probabilities import save_probs_npz
    save_probs_npz(d / "0005_probs.npz", np.full((C, 4, 4, 4), 0.25, np.float32), np.eye(4))
    with pytest.raises(TeacherPredictionError, match="1 unlabeled case.*0006"):
        make().check(["0003", "0005", "0006"])   # an npz counts as a prediction


@pytest.mark.parametrize("shape, dtype, what", [
    ((31, 32, 32), np.uint8, "label map on another grid"),
    ((32, 32, 32, 3), np.float32, "probabilities with 3 classes"),
    ((C, 32, 30, 32), np.float32, "channel-first probabilities on another grid"),
])
def test_misshaped_nifti_names_file_case_and_grid(teacher, shape, dtype, what):
    d, make = teacher
    _save(d / "0004.nii.gz", np.zeros(shape, dtype))
    with pytest.raises(TeacherPredictionError) as e:
        make().volume("0004")
    msg = str(e.value)
    assert str(d / "0004.nii.gz") in msg and "case 0004" in msg and "(32, 32, 32)" in msg, what


@pytest.mark.parametrize("bad", [-1, C])
def test_label_map_outside_the_classes_names_the_file(teacher, bad):
    d, make = teacher
    arr = np.zeros((32, 32, 32), np.int16)
    arr[3, 4, 5] = bad
    _save(d / "0004.nii.gz", arr)
    with pytest.raises(TeacherPredictionError, match=r"0004\.nii\.gz: labels outside \[0, 4\)"):
        make().volume("0004")


def test_bad_npz_names_the_file(teacher):
    from medseg_dpl.evaluation.probabilities import save_probs_npz
    d, make = teacher
    save_probs_npz(d / "0004_probs.npz", np.full((3, 32, 32, 32), 1 / 3, np.float32), np.eye(4))
    with pytest.raises(TeacherPredictionError, match=r"0004_probs\.npz: 3 classes, expected 4"):
        make().volume("0004")
    (d / "0005_probs.npz").write_bytes(b"not a zip file")
    with pytest.raises(TeacherPredictionError, match=r"0005_probs\.npz"):
        make().volume("0005")


def test_missing_prediction_at_load_time_names_the_file(teacher):
    d, make = teacher
    with pytest.raises(Exception, match="0004.nii.gz"):
        make().volume("0004")


def test_valid_predictions_label_map_smoothing_layouts_and_padding(teacher):
    d, make = teacher
    lab = np.zeros((32, 32, 32), np.uint8)
    lab[:, :, 16:] = 2
    _save(d / "0003.nii.gz", lab)
    tv = make(0.2)
    aff = np.diag([1.5, 1.5, 2.0, 1.0])
    p = tv.crop("0003", aff, (32, 32, 32))
    assert p.shape == (C, 32, 32, 32)
    assert torch.equal(p.argmax(0), torch.from_numpy(lab).long())
    assert p.max().item() == pytest.approx(0.8 + 0.2 / C) and p.min().item() == pytest.approx(0.2 / C)
    # a crop hanging off the volume: the outside voxels are uniform (never confident)
    shifted = aff.copy()
    shifted[0, 3] = 1.5 * 24   # starts at voxel 24 along x: voxels 8-15 of the crop are outside
    q = tv.crop("0003", shifted, (16, 4, 4))
    assert torch.allclose(q[:, 8:], torch.full_like(q[:, 8:], 1 / C))
    assert torch.equal(q[:, :8].argmax(0), torch.from_numpy(lab[24:32, :4, :4]).long())
    # 4D probabilities, channel-last and channel-first: the same (renormalised) crop
    rng = np.random.default_rng(0)
    probs = rng.uniform(0.1, 1.0, (C, 32, 32, 32)).astype(np.float32)   # not normalised
    _save(d / "0004.nii.gz", np.moveaxis(probs, 0, -1))
    _save(d / "0005.nii.gz", probs)
    a, b = tv.crop("0004", aff, (8, 8, 8)), tv.crop("0005", aff, (8, 8, 8))
    assert torch.allclose(a, b, atol=1e-3)
    assert torch.allclose(a.sum(0), torch.ones(8, 8, 8), atol=1e-3)
    expect = probs[:, :8, :8, :8] / probs[:, :8, :8, :8].sum(0)
    assert torch.allclose(a, torch.from_numpy(expect), atol=2e-3)
