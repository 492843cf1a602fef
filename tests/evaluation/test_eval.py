"""Evaluation reports: checkpoint on a PREP_DIR split, existing predictions, run comparison."""
from __future__ import annotations

import csv
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from eval_helpers import make_checkpoint
from medseg_dpl.cli import main
from medseg_dpl.evaluation.compare import compare_runs
from medseg_dpl.evaluation.evaluate import EvalError, evaluate_checkpoint, evaluate_predictions


@pytest.fixture(scope="module")
def evaluated(phantom_prep, tmp_path_factory):
    """A tiny untrained checkpoint evaluated on the phantom's test split (via the CLI)."""
    m = json.loads((phantom_prep / "dataset.json").read_text(encoding="utf-8"))
    run = tmp_path_factory.mktemp("run_supervised")
    ckpt = make_checkpoint(run / "checkpoints" / "best.pt", classes=m["classes"], spacing=m["spacing"])
    rc = main(["eval", "--checkpoint", str(ckpt), "--data", str(phantom_prep), "--split", "test",
               "--out", str(run / "eval"), "--device", "cpu", "--overlays", "1"])
    assert rc == 0
    return run, m


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_eval_checkpoint_outputs(evaluated, phantom_prep):
    run, m = evaluated
    out = run / "eval"
    rows = _read_csv(out / "per_case.csv")
    # the headline columns (post-processed when the run has a decision), the raw ones beside them
    assert list(rows[0]) == ["case", "organ", "dice", "hd95", "asd", "dice_raw", "hd95_raw", "asd_raw"]
    test_ids = (phantom_prep / "splits" / "test.txt").read_text(encoding="utf-8").split()
    assert sorted({r["case"] for r in rows}) == sorted(test_ids)
    assert len(rows) == len(test_ids) * (len(m["classes"]) - 1)
    s = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert s["organs"] == m["classes"][1:] and s["num_cases"] == len(test_ids)
    for key in ("dice", "hd95", "asd"):
        assert set(s["overall"][key]) >= {"mean", "std"}
        assert set(s["per_organ"]["liver"][key]) == {"mean", "std", "n"}
    md = (out / "results.md").read_text(encoding="utf-8")
    header = md.splitlines()[0]
    assert "Avg. Dice" in header and "Avg. ASD" in header
    assert all(f" {short} |" in header for short in ("Sp", "RK", "Li", "IVC", "LAG"))
    assert (out / "dice_per_organ.png").stat().st_size > 0
    assert len(list((out / "overlays").glob("*.png"))) == 1
    # predictions lie on the source label's grid (original geometry, not the prep grid)
    by_id = {c["id"]: c for c in m["cases"]}
    for cid in test_ids:
        pred = nib.load(str(out / "predictions" / f"{cid}.nii.gz"))
        lab = nib.load(by_id[cid]["source_label"])
        assert pred.shape == lab.shape
        np.testing.assert_allclose(pred.affine, lab.affine, atol=1e-4)
    # the scores in the CSV are those of the written predictions against the source labels
    from medseg_dpl.evaluation.metrics import dice_per_class
    cid = test_ids[0]
    d = dice_per_class(np.asarray(nib.load(str(out / "predictions" / f"{cid}.nii.gz")).dataobj),
                       np.asarray(nib.load(by_id[cid]["source_label"]).dataobj), len(m["classes"]))
    csv_d = [float(r["dice"]) for r in rows if r["case"] == cid]
    np.testing.assert_allclose(csv_d, d, atol=1e-6)


def _label_copies(phantom_prep, tmp_path, ids):
    """Ground-truth files of ``ids`` as ``label<id>.nii.gz`` and predictions copied from them."""
    m = json.loads((phantom_prep / "dataset.json").read_text(encoding="utf-8"))
    by_id = {c["id"]: c for c in m["cases"]}
    labels, preds = tmp_path / "labels", tmp_path / "preds"
    labels.mkdir()
    preds.mkdir()
    for cid in ids:
        shutil.copy(by_id[cid]["source_label"], labels / f"label{cid}.nii.gz")
        shutil.copy(by_id[cid]["source_label"], preds / f"img{cid}.nii.gz")  # names differ by prefix
    return labels, preds


def test_perfect_predictions_score_one(phantom_prep, tmp_path, capsys):
    ids = (phantom_prep / "splits" / "test.txt").read_text(encoding="utf-8").split()
    labels, preds = _label_copies(phantom_prep, tmp_path, ids)
    m = json.loads((phantom_prep / "dataset.json").read_text(encoding="utf-8"))
    extra = [c for c in m["cases"] if c["id"] not in ids][0]  # a label without prediction: not scored
    shutil.copy(extra["source_label"], labels / f"label{extra['id']}.nii.gz")
    assert main(["eval", "--pred", str(preds), "--labels", str(labels), "--dataset", "synapse",
                 "--out", str(tmp_path / "rep"), "--overlays", "0"]) == 0
    assert "Avg. Dice" in capsys.readouterr().out
    rows = _read_csv(tmp_path / "rep" / "per_case.csv")
    assert sorted({r["case"] for r in rows}) == sorted(ids)
    present = [r for r in rows if r["dice"] != "nan"]
    assert present and all(float(r["dice"]) == 1.0 for r in present)
    assert all(float(r["hd95"]) == 0.0 and float(r["asd"]) == 0.0 for r in present)
    s = json.loads((tmp_path / "rep" / "summary.json").read_text(encoding="utf-8"))
    assert s["overall"]["dice"]["mean"] == 1.0
    # DHC protocol: organs absent in both count as Dice 1, so everything is 1
    s = evaluate_predictions(preds, labels, tmp_path / "dhc", classes="synapse", protocol="dhc",
                             num_overlays=0, progress=False)
    assert s["distance_units"] == "voxel"
    assert all(s["per_organ"][o]["dice"]["mean"] == 1.0 for o in s["organs"])


def test_eval_predictions_errors(phantom_prep, tmp_path, capsys):
    ids = (phantom_prep / "splits" / "test.txt").read_text(encoding="utf-8").split()
    labels, preds = _label_copies(phantom_prep, tmp_path, ids)
    (labels / f"label{ids[0]}.nii.gz").unlink()
    with pytest.raises(EvalError, match=f"img{ids[0]}"):  # a prediction without its label
        evaluate_predictions(preds, labels, tmp_path / "rep", classes="synapse", progress=False)
    assert main(["eval", "--pred", str(preds), "--labels", str(labels), "--out", str(tmp_path / "r")]) == 1
    assert "error:" in capsys.readouterr().err


def test_compare_runs_and_seeds(evaluated, phantom_prep, tmp_path):
    run, _ = evaluated
    ids = (phantom_prep / "splits" / "test.txt").read_text(encoding="utf-8").split()
    labels, preds = _label_copies(phantom_prep, tmp_path, ids)
    perfect = tmp_path / "oracle_seed1"
    evaluate_predictions(preds, labels, perfect / "eval", classes="synapse", num_overlays=0,
                         method="oracle", progress=False)
    shutil.copytree(perfect, tmp_path / "oracle_seed2")
    table = compare_runs([run, perfect, tmp_path / "oracle_seed2"], tmp_path / "cmp", seeds=True)
    assert set(table["methods"]) == {"supervised", "oracle"}
    assert table["methods"]["oracle"]["n"] == 2
    assert table["methods"]["oracle"]["avg_dice"] == [1.0, 0.0]
    sup = json.loads((run / "eval" / "summary.json").read_text(encoding="utf-8"))
    assert table["methods"]["supervised"]["avg_dice"][0] == pytest.approx(sup["overall"]["dice"]["mean"])
    for f in ("compare.md", "compare.json", "compare_dice.png"):
        assert (tmp_path / "cmp" / f).stat().st_size > 0
    assert main(["compare", str(run), str(perfect), "--out", str(tmp_path / "cmp2")]) == 0
    assert "oracle" in (tmp_path / "cmp2" / "compare.md").read_text(encoding="utf-8")


def test_eval_checkpoint_rejects_other_prep_spacing(phantom_prep, tmp_path, capsys):
    m = json.loads((phantom_prep / "dataset.json").read_text(encoding="utf-8"))
    ckpt = make_checkpoint(tmp_path / "best.pt", classes=m["classes"], spacing=(1.5, 1.5, 2.0))
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(phantom_prep),
                 "--out", str(tmp_path / "e"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "spacing" in err and "best.pt" in err
    with pytest.raises(EvalError, match="classes"):
        evaluate_checkpoint(make_checkpoint(tmp_path / "c.pt", classes=m["classes"][:5],
                                            spacing=m["spacing"]),
                            phantom_prep, tmp_path / "e", device="cpu", progress=False)
