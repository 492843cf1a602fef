"""``medseg-dpl export``: a MONAI bundle whose inference.json gives predict's labels.

Checkpoints are trained here for 20 steps (phantom: supervised, AdamW, no EMA lag, so the net
already segments the liver; CHAOS MR: 3 cases at 2.5 x 2.5 x 7.7 mm). The bundle runs through
``monai.bundle.run`` (the function behind ``python -m monai.bundle run``; one test runs the
command line itself) and its label maps are compared voxel by voxel with ``predict``'s.
"""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from train_helpers import tiny_cfg
from medseg_dpl.cli import main
from medseg_dpl.deploy.export import ExportError, check_metadata, export_bundle
from medseg_dpl.evaluation.predict import predict

# Identical labels are expected, and measured (0 voxels differ on every case here). Two float
# roundings may still flip the argmax of a voxel whose two best classes tie to ~1e-6: MONAI's
# SpatialResample (float64, spline order 1) vs prep's separable float32 interpolation (~1e-4 HU
# apart), and ScaleIntensityRanged's (x - lo) / (hi - lo) vs prep's (x - lo) * (1 / (hi - lo))
# (1 ulp). Hence ">= 99.9 %" rather than "equal" (one voxel of 1.4 M differed with a 3 mm model).
MIN_AGREEMENT = 0.999
FAST_TRAIN = ["train.steps=20", "train.val_every=20", "train.checkpoint_every=20",
              "optim.name=adamw", "optim.lr=0.005", "train.ema_momentum=0.0"]


def _quiet_run(bundle: Path, dataset_dir: Path, output_dir: Path) -> None:
    """``python -m monai.bundle run`` in process (same code path, no interpreter start-up)."""
    import warnings

    from monai.bundle import run

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI's security notice and logging-file notes
        run(config_file=str(bundle / "configs" / "inference.json"), bundle_root=str(bundle),
            dataset_dir=str(dataset_dir), output_dir=str(output_dir))


def assert_same_as_predict(pred_dir: Path, bundle_dir: Path, names: list[str]) -> list[float]:
    """Each ``name`` in both folders: same shape, affine, uint8, and >= 99.9 % equal voxels."""
    agreements = []
    for name in names:
        a, b = nib.load(str(pred_dir / name)), nib.load(str(bundle_dir / name))
        assert b.shape == a.shape, name
        np.testing.assert_allclose(b.affine, a.affine, rtol=0, atol=1e-5)
        assert b.get_data_dtype() == np.uint8
        la, lb = np.asarray(a.dataobj), np.asarray(b.dataobj)
        agree = float((la == lb).mean())
        assert agree >= MIN_AGREEMENT, f"{name}: {agree:.5f} agreement, {(la != lb).sum()} voxels differ"
        agreements.append(agree)
    return agreements


@pytest.fixture(scope="module")
def phantom_run(phantom_prep, tmp_path_factory) -> Path:
    """A 20-step supervised run on the phantom (13 organs; the liver is segmented)."""
    from medseg_dpl.engine.trainer import train

    out = tmp_path_factory.mktemp("export_run") / "run"
    train(tiny_cfg(phantom_prep, "supervised", "data.labeled_split=labeled_25p",
                   "data.unlabeled_split=unlabeled_25p", *FAST_TRAIN), out)
    return out / "checkpoints" / "best.pt"


@pytest.fixture(scope="module")
def bundle(phantom_run, tmp_path_factory) -> Path:
    return export_bundle(phantom_run, tmp_path_factory.mktemp("export") / "phantom_bundle")


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_bundle_layout_metadata_and_docs(bundle, phantom_run):
    for f in ("configs/metadata.json", "configs/inference.json", "models/model.pt", "models/model.ts",
              "docs/README.md", "docs/license.txt"):
        assert (bundle / f).is_file(), f
    meta = json.loads((bundle / "configs/metadata.json").read_text(encoding="utf-8"))
    assert check_metadata(meta) == []  # MONAI's required fields (verify_metadata needs the network)
    ck = torch.load(phantom_run, weights_only=True)
    classes = ck["dataset"]["classes"]
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {str(i): c for i, c in enumerate(classes)}
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == len(classes)
    assert meta["network_data_format"]["inputs"]["image"]["modality"] == "CT"
    assert meta["labels"] == {c: i for i, c in enumerate(classes)}
    assert meta["medseg_dpl"]["spacing"] == ck["dataset"]["spacing"]
    assert meta["medseg_dpl"]["patch_size"] == ck["config"]["data"]["patch_size"]
    assert meta["monai_version"] and meta["pytorch_version"] and meta["required_packages_version"]["medseg-dpl"]
    readme = (bundle / "docs/README.md").read_text(encoding="utf-8")
    assert "not for clinical use" in readme.lower() and "supervised" in readme
    assert "labeled fraction: 20 %" in readme  # 1 labeled of 5 train cases (4 unlabeled not used)
    assert "| liver |" in readme  # eval Dice per organ from RUN/metrics.json
    # the weights are the checkpoint's, and the TorchScript computes what they compute
    sd = torch.load(bundle / "models/model.pt", weights_only=True)
    assert all(torch.equal(sd[k], ck["model"][k]) for k in ck["model"])
    from monai.data import load_net_with_metadata
    from monai.bundle import ConfigParser

    ts, ts_meta, extra = load_net_with_metadata(str(bundle / "models/model.ts"),
                                                more_extra_files=["inference.json"])
    assert ts_meta["labels"] == meta["labels"] and json.loads(extra["inference.json"])["network_def"]
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs/inference.json"))
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(sd)
    x = torch.rand(1, 1, *meta["medseg_dpl"]["patch_size"])
    with torch.no_grad():
        torch.testing.assert_close(ts(x), net.eval()(x))


def test_config_parser_opens_bundle_and_net_in_out_verifies(bundle):
    from monai.bundle import ConfigParser, verify_net_in_out
    from monai.transforms import Compose

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs/inference.json"))
    parser.read_meta(str(bundle / "configs/metadata.json"))
    assert isinstance(parser.get_parsed_content("preprocessing"), Compose)
    assert isinstance(parser.get_parsed_content("postprocessing"), Compose)
    assert list(parser.get_parsed_content("inferer").roi_size) == parser["_meta_#medseg_dpl#patch_size"]
    verify_net_in_out(net_id="network_def", meta_file=str(bundle / "configs/metadata.json"),
                      config_file=str(bundle / "configs/inference.json"), device="cpu")


def test_bundle_equals_predict_on_phantom_cases(bundle, phantom_run, phantom_raw, tmp_path):
    """Two raw phantom cases in different orientations (LPS/LAS/RAS), through both paths."""
    src = sorted((phantom_raw / "RawData/Training/img").glob("*.nii.gz"))[:2]
    inp = tmp_path / "in"
    inp.mkdir()
    for f in src:
        shutil.copy(f, inp / f.name)
    predict(phantom_run, inp, tmp_path / "pred", device="cpu", progress=False)
    _quiet_run(bundle, inp, tmp_path / "out")
    names = [f.name for f in src]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == names
    assert_same_as_predict(tmp_path / "pred", tmp_path / "out", names)
    labels = np.asarray(nib.load(str(tmp_path / "pred" / names[0])).dataobj)
    assert len(np.unique(labels)) > 1  # a trained net: the comparison is not of two blank maps


def test_flip_tta_run_exports_predicts_tta(bundle, phantom_run, phantom_raw, tmp_path):
    """A run with eval.tta: predict averages the 8 flips by default, and so does its bundle."""
    ck = torch.load(phantom_run, weights_only=True)
    ck["config"]["eval"]["tta"] = True
    tta_ckpt = tmp_path / "run" / "checkpoints" / "best.pt"
    tta_ckpt.parent.mkdir(parents=True)
    torch.save(ck, tta_ckpt)
    out = export_bundle(tta_ckpt, tmp_path / "bundle")
    config = json.loads((out / "configs/inference.json").read_text(encoding="utf-8"))
    assert config["inferer"]["_target_"].endswith("FlipTTAInferer")
    assert "Activationsd" not in json.dumps(config["postprocessing"])  # TTA averages softmaxes
    src = sorted((phantom_raw / "RawData/Training/img").glob("*.nii.gz"))[2]
    predict(tta_ckpt, src, tmp_path / "pred", device="cpu", progress=False)
    _quiet_run(out, src, tmp_path / "out")
    assert_same_as_predict(tmp_path / "pred", tmp_path / "out", [src.name])


def test_bundle_reads_a_dicom_series_as_predict(bundle, phantom_run, phantom_raw, tmp_path):
    from eval_helpers import write_dicom_series

    img = nib.load(str(sorted((phantom_raw / "RawData/Training/img").glob("*.nii.gz"))[0]))
    series = write_dicom_series(np.asarray(img.dataobj), img.affine, tmp_path / "series_01")
    predict(phantom_run, series, tmp_path / "pred", device="cpu", progress=False)
    _quiet_run(bundle, series, tmp_path / "out")
    assert_same_as_predict(tmp_path / "pred", tmp_path / "out", ["series_01.nii.gz"])


def test_postprocessing_transforms_equal_the_decision():
    """The bundle's KeepLargestConnectedComponentd + RemoveSmallComponentsd = apply_postprocessing."""
    from monai.bundle import ConfigParser
    from scipy import ndimage

    from medseg_dpl.deploy.export import postprocessing_transforms
    from medseg_dpl.evaluation.postprocess import FORMAT, apply_postprocessing

    rng = np.random.default_rng(0)
    labels = ndimage.zoom(rng.integers(0, 4, (8, 8, 8)), 5, order=0).astype(np.uint8)
    labels[rng.random(labels.shape) < 0.02] = 3  # specks: many small components
    decision = {"format": FORMAT, "connectivity": 3, "organs": {
        "a": {"label": 1, "op": "keep_largest", "min_fraction": None},
        "b": {"label": 2, "op": "remove_small", "min_fraction": 0.25},
        "c": {"label": 3, "op": "remove_small", "min_fraction": 0.1}}}
    steps = postprocessing_transforms(decision, tta=False)[2:-1]  # the rules, without softmax/resample/save
    assert [s["_target_"].rsplit(".", 1)[-1] for s in steps] == ["KeepLargestConnectedComponentd",
                                                                 "RemoveSmallComponentsd"]
    compose = ConfigParser({"pp": {"_target_": "Compose", "transforms": steps}}).get_parsed_content("pp")
    out = compose({"pred": torch.from_numpy(labels[None])})["pred"]
    np.testing.assert_array_equal(np.asarray(out[0]), apply_postprocessing(labels, decision))


def test_monai_bundle_command_line(bundle, phantom_raw, tmp_path):
    pytest.importorskip("fire", reason="`python -m monai.bundle` parses its arguments with fire")
    src = sorted((phantom_raw / "RawData/Training/img").glob("*.nii.gz"))[0]
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(src, inp / src.name)
    (inp / "notes.txt").write_text("not an image")  # only NIfTI files are read
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file",
                           str(bundle / "configs/inference.json"), "--bundle_root", str(bundle),
                           "--dataset_dir", str(inp), "--output_dir", str(tmp_path / "out")],
                          capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = nib.load(str(tmp_path / "out" / src.name))
    ref = nib.load(str(src))
    assert out.shape == ref.shape
    np.testing.assert_allclose(out.affine, ref.affine, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def classification_ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("classify") / "run"
    cfg = Path(__file__).resolve().parents[2] / "configs" / "digits_supervised.yaml"
    assert main(["classify", "--config", str(cfg), "--out", str(out), "--no-progress", "train.steps=2",
                 "train.batch_size=16", "train.val_every=1000", "train.log_every=5"]) == 0
    return out / "checkpoints" / "last.pt"


@pytest.mark.parametrize("kind", ["classification", "truncated", "not_torch"])
def test_refused_checkpoints_write_nothing(kind, classification_ckpt, phantom_run, tmp_path, capsys):
    if kind == "classification":
        ckpt, cause = classification_ckpt, "classification"
    else:
        ckpt = tmp_path / f"{kind}.pt"
        data = phantom_run.read_bytes()
        ckpt.write_bytes(data[: len(data) // 2] if kind == "truncated" else b"hello, not a checkpoint")
        cause = "truncated or corrupt" if kind == "truncated" else "not a torch checkpoint"
    out = tmp_path / "exports" / "bundle"
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert str(ckpt) in err and cause in err, err
    assert not out.exists()
    assert not (tmp_path / "exports").exists() or not any((tmp_path / "exports").iterdir())
    with pytest.raises(ExportError, match=str(ckpt.name)):
        export_bundle(ckpt, out)


def test_predict_names_a_classification_checkpoint(classification_ckpt):
    from medseg_dpl.evaluation.predict import PredictError, load_checkpoint_model
    with pytest.raises(PredictError, match="image-classification checkpoint"):
        load_checkpoint_model(classification_ckpt, "cpu")


def test_existing_bundle_is_not_replaced_without_overwrite(bundle, phantom_run):
    with pytest.raises(ExportError, match="already exists"):
        export_bundle(phantom_run, bundle)


# --------------------------------------------------------------------------- real data
def test_bundle_equals_predict_on_the_real_ct(bundle, phantom_run, shared_data, tmp_path):
    """The phantom-trained model applied to a real CT (122 x 101 x 112, 3 mm) by both paths."""
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(shared_data / "real_ct" / "ct.nii.gz", inp / "ct.nii.gz")
    predict(phantom_run, inp, tmp_path / "pred", device="cpu", progress=False)
    _quiet_run(bundle, inp, tmp_path / "out")
    assert_same_as_predict(tmp_path / "pred", tmp_path / "out", ["ct.nii.gz"])


def _chaos_subset(raw: Path, out: Path, n: int = 3) -> list[str]:
    """The first ``n`` CHAOS cases as an nnU-Net raw folder of their own."""
    ids = sorted(p.name[: -len("_0000.nii.gz")] for p in (raw / "imagesTr").glob("*_0000.nii.gz"))[:n]
    (out / "imagesTr").mkdir(parents=True)
    (out / "labelsTr").mkdir()
    info = json.loads((raw / "dataset.json").read_text(encoding="utf-8"))
    (out / "dataset.json").write_text(json.dumps({**info, "numTraining": len(ids)}))
    for i in ids:
        shutil.copy(raw / "imagesTr" / f"{i}_0000.nii.gz", out / "imagesTr")
        shutil.copy(raw / "labelsTr" / f"{i}.nii.gz", out / "labelsTr")
    return ids


def test_bundle_equals_predict_on_a_chaos_mr_case(shared_data, tmp_path):
    """MR: 3 CHAOS cases prepped (body mask + z-score), 20 steps, then an unseen-size raw case."""
    from medseg_dpl.data.preprocess import preprocess_dataset
    from medseg_dpl.engine.trainer import train

    raw = shared_data / "chaos_mr"
    if not (raw / "dataset.json").exists():
        pytest.skip(f"CHAOS MR data not found at {raw}")
    ids = _chaos_subset(raw, tmp_path / "raw")
    prep = tmp_path / "prep"
    preprocess_dataset("nnunet", tmp_path / "raw", prep, spacing=(2.5, 2.5, 7.7), workers=1,
                       progress=False, stream=io.StringIO())
    (prep / "splits").mkdir()
    for name, lst in {"labeled_mr": ids[:1], "unlabeled_mr": ids[1:2], "eval": ids[2:]}.items():
        (prep / "splits" / f"{name}.txt").write_text("".join(f"{i}\n" for i in lst))
    train(tiny_cfg(prep, "supervised", "data.labeled_split=labeled_mr", "data.unlabeled_split=unlabeled_mr",
                   "data.patch_size=[48,48,16]", *FAST_TRAIN), tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "best.pt"
    out = export_bundle(ckpt, tmp_path / "bundle")
    meta = json.loads((out / "configs/metadata.json").read_text(encoding="utf-8"))
    assert meta["network_data_format"]["inputs"]["image"]["modality"] == "MR"
    assert "CC BY-SA 4.0" in (out / "docs/license.txt").read_text(encoding="utf-8")  # CHAOS's licence, found
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(tmp_path / "raw" / "imagesTr" / f"{ids[2]}_0000.nii.gz", inp)
    predict(ckpt, inp, tmp_path / "pred", device="cpu", progress=False)
    _quiet_run(out, inp, tmp_path / "out")
    name = f"{ids[2]}_0000.nii.gz"
    assert_same_as_predict(tmp_path / "pred", tmp_path / "out", [name])
    assert len(np.unique(np.asarray(nib.load(str(tmp_path / "pred" / name)).dataobj))) > 1
