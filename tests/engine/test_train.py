"""The trainer end to end on a tiny 32³ prep: outputs, checkpoints, NaN stop, CLI, teacher mode."""
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from train_helpers import CLASSES, make_tiny_prep, tiny_cfg

from medseg_dpl.engine.data import TeacherVolumes
from medseg_dpl.engine.trainer import TrainingError, train
from medseg_dpl.models import build_model


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    return make_tiny_prep(tmp_path_factory.mktemp("tinyprep"))


@pytest.mark.parametrize("method", ["supervised", "fixmatch", "debiaspl", "cps_depl"])
def test_each_method_trains_and_writes_outputs(prep, tmp_path, method):
    out = tmp_path / "run"
    result = train(tiny_cfg(prep, method, "train.val_every=2", "train.checkpoint_every=2"), out)
    assert result["step"] == 3 and set(result["final_dice"]) == set(CLASSES[1:])
    for f in ("config.yaml", "train.log", "checkpoints/last.pt", "checkpoints/best.pt",
              "pseudo_labels.json", "metrics.json"):
        assert (out / f).is_file(), f
    assert list((out / "tb").glob("events.out.tfevents.*"))
    log = (out / "train.log").read_text(encoding="utf-8")
    assert "validation step 2" in log and "validation step 3" in log
    ck = torch.load(out / "checkpoints/last.pt", weights_only=True)
    assert ck["step"] == 3 and ck["dataset"]["classes"] == CLASSES
    net = build_model(ck["config"]["model"], 1, len(CLASSES))
    net.load_state_dict(ck["model"])
    if method in ("fixmatch", "debiaspl"):
        assert ck["teacher"] is not None
        assert all(torch.equal(ck["model"][k], ck["teacher"][k]) for k in ck["model"])
        assert "mask_ratio=" in log and "pl_share=[" in log
    if method == "debiaspl":
        assert "response.qhat" in ck["method"] and "qhat=[" in log
        assert not torch.allclose(ck["method"]["response.qhat"], torch.full((4,), 0.25))
    if method == "cps_depl":
        assert "student2" in ck
    rep = json.loads((out / "pseudo_labels.json").read_text(encoding="utf-8"))
    assert rep["classes"] == CLASSES and rep["method"] == method
    for k in ("labeled_share", "pseudo_label_share", "true_share"):
        assert len(rep[k]) == 4 and sum(rep[k]) == pytest.approx(1.0, abs=1e-6) or sum(rep[k]) == 0
    assert 0.0 <= rep["pseudo_label_accuracy"] <= 1.0
    for k in ("labeled", "pseudo_label", "true"):  # organs only, renormalised
        assert len(rep["organ_share"][k]) == 3
        assert sum(rep["organ_share"][k]) == pytest.approx(1.0, abs=1e-6) or sum(rep["organ_share"][k]) == 0
    # π is the labeled split's class frequency, not the whole data set's
    labs = [np.asanyarray(nib.load(str(prep / f"labelsTr/{i}.nii.gz")).dataobj)
            for i in (prep / "splits/labeled_20p.txt").read_text(encoding="utf-8").split()]
    counts = np.bincount(np.concatenate([x.ravel() for x in labs]), minlength=4)
    assert rep["labeled_share"] == pytest.approx((counts / counts.sum()).tolist(), abs=1e-6)


def test_nan_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(prep, tmp_path, monkeypatch):
    from medseg_dpl.methods.supervised import Supervised
    orig = Supervised.train_step

    def poisoned(self, batch, step):
        out = orig(self, batch, step)
        if step == 3:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(Supervised, "train_step", poisoned)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match="non-finite loss .* at step 3"):
        train(tiny_cfg(prep, "supervised", "train.steps=6", "train.checkpoint_every=2",
                       "train.val_every=100"), out)
    ck = torch.load(out / "checkpoints/last.pt", weights_only=True)
    assert ck["step"] == 2
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert "at step 3" in (out / "train.log").read_text(encoding="utf-8")


def test_cli_train_and_errors(prep, tmp_path, capsys):
    from medseg_dpl.cli import main
    out = tmp_path / "cli"
    common = ["train", "--config", "configs/phantom.yaml", "--out", str(out),
              f"data.root={prep}", "data.patch_size=[32,32,32]", "model.channels=[8,16]",
              "model.strides=[2]", "train.steps=2", "train.progress=false", "eval.max_cases=1"]
    assert main(common) == 0
    assert (out / "checkpoints/best.pt").is_file()
    assert main(common + ["optim.lrr=1"]) == 1
    assert "unknown config key 'optim.lrr'" in capsys.readouterr().err
    assert main(common + ["data.root=" + str(tmp_path / "nope")]) == 1
    assert "dataset.json does not exist" in capsys.readouterr().err
    assert main(["train", "--config", "configs/phantom.yaml", "--out",
                 str(tmp_path / "fresh"), f"data.root={prep}", "--resume"]) == 1
    assert "last.pt does not exist" in capsys.readouterr().err


def test_teacher_crops_follow_the_weak_view_geometry(prep):
    """Cut from a whole-volume label map through the crop affine = the same crop of the labels."""
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, RandFlipd, RandSpatialCropd
    man = json.loads((prep / "dataset.json").read_text(encoding="utf-8"))
    tv = TeacherVolumes(str(prep / "labelsTr"), str(prep), man, 4, smoothing=0.0)
    t = Compose([LoadImaged("image"), EnsureChannelFirstd("image"),
                 RandSpatialCropd("image", (16, 20, 12), random_size=False),
                 RandFlipd("image", prob=1.0, spatial_axis=(0, 2))])
    t.set_random_state(seed=3)
    item = t({"image": str(prep / "labelsTr/0003.nii.gz")})
    probs = tv.crop("0003", item["image"].affine.numpy(), (16, 20, 12))
    assert torch.equal(probs.argmax(0), item["image"][0].as_tensor().long())
    assert torch.all(probs.max(0).values == 1.0)


def test_teacher_mode_trains_from_external_predictions(prep, tmp_path):
    preds = tmp_path / "preds"
    preds.mkdir()
    for i in (prep / "splits/unlabeled_20p.txt").read_text(encoding="utf-8").split():
        img = nib.load(str(prep / f"labelsTr/{i}.nii.gz"))
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj).astype(np.uint8), img.affine), str(preds / f"{i}.nii.gz"))
    out = tmp_path / "run"
    train(tiny_cfg(prep, "debiaspl", f"teacher.predictions={preds}", "train.steps=2",
                   "debias.tau=0.5"), out)
    log = (out / "train.log").read_text(encoding="utf-8")
    # perfect one-hot teacher with smoothing 0.1: every voxel is confident before debiasing
    assert "mask_ratio=" in log
    first = [ln for ln in log.splitlines() if "step 1/2" in ln][0]
    assert float(first.split("mask_ratio=")[1].split()[0]) > 0.5
    missing = tmp_path / "empty"
    missing.mkdir()
    from medseg_dpl.engine.data import TeacherPredictionError
    with pytest.raises(TeacherPredictionError, match="have no prediction"):
        train(tiny_cfg(prep, "debiaspl", f"teacher.predictions={missing}"), tmp_path / "run2")


def test_debiaspl_on_the_phantom_prep(phantom_prep, tmp_path):
    """Integration with the data package: its phantom, prep, split and pipelines (14 classes)."""
    out = tmp_path / "run"
    result = train(tiny_cfg(phantom_prep, "debiaspl", "data.labeled_split=labeled_25p",
                            "data.unlabeled_split=unlabeled_25p", "train.steps=2"), out)
    rep = json.loads((out / "pseudo_labels.json").read_text(encoding="utf-8"))
    assert len(rep["classes"]) == 14 and len(result["final_dice"]) == 13
    assert rep["num_cases"] == len((phantom_prep / "splits/unlabeled_25p.txt").read_text(encoding="utf-8").split())


def test_debiaspl_paper_tau0_trains_to_the_same_weights_as_fixmatch(prep, tmp_path):
    """τ = 0 switches the debiasing off: same seed, same weights as FixMatch (CutMix, Dice+CE
    and the EMA warm-up included), however q̂ moved."""
    common = ["train.deterministic=true", "train.unlabeled_batch_size=2", "method.cutmix=1.0",
              "train.val_every=100", "eval.postprocess=false"]
    train(tiny_cfg(prep, "fixmatch", *common), tmp_path / "fm")
    train(tiny_cfg(prep, "debiaspl", "debias.variant=paper", "debias.tau=0", *common), tmp_path / "dp")
    a = torch.load(tmp_path / "fm/checkpoints/last.pt", weights_only=True)
    b = torch.load(tmp_path / "dp/checkpoints/last.pt", weights_only=True)
    for key in ("student", "teacher"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert not torch.allclose(b["method"]["response.qhat"], torch.full((4,), 0.25))
