"""Splits: published protocol sizes, seeds, any fraction, DHC list import, unknown ids rejected."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from medseg_dpl.cli import main
from medseg_dpl.data import DataError, read_split
from medseg_dpl.data.manifest import read_id_list
from medseg_dpl.data.splits import make_splits

SYNAPSE_IDS = [f"{i:04d}" for i in list(range(1, 11)) + list(range(21, 41))]   # the 30 BTCV cases


def _manifest(tmp_path, dataset, train_ids, test_ids=(), unlabeled=()):
    prep = tmp_path / f"prep_{dataset}"
    prep.mkdir()
    cases = [{"id": i, "image": f"imagesTr/{i}.nii.gz",
              "label": None if i in unlabeled else f"labelsTr/{i}.nii.gz", "subset": "train"}
             for i in train_ids]
    cases += [{"id": i, "image": f"imagesTr/{i}.nii.gz", "label": f"labelsTr/{i}.nii.gz",
               "subset": "test"} for i in test_ids]
    (prep / "dataset.json").write_text(json.dumps(
        {"dataset": dataset, "classes": ["background", "x"], "spacing": [1, 1, 1], "cases": cases}))
    return prep


def _sizes(s):
    return {k: len(v) for k, v in s.items()}


def test_synapse_protocol_sizes_and_seed(tmp_path):
    prep = _manifest(tmp_path, "synapse", SYNAPSE_IDS)
    s = make_splits(prep, seed=0)   # default fraction for Synapse: 20 %
    assert _sizes(s) == {"test": 6, "eval": 4, "train": 20, "labeled_20p": 4, "unlabeled_20p": 16}
    assert sorted(s["train"] + s["eval"] + s["test"]) == SYNAPSE_IDS
    assert read_split(prep, "labeled_20p") == s["labeled_20p"]
    assert read_split(prep, "train.txt") == s["train"]
    assert make_splits(prep, seed=0, write=False) == s                 # deterministic
    other = make_splits(prep, seed=1, write=False)
    assert other["test"] != s["test"] or other["labeled_20p"] != s["labeled_20p"]
    # 10 % / 40 %, as in DHC: 2 and 8 labeled of the 20 train cases
    s2 = make_splits(prep, labeled=[0.1, 0.4], seed=0)
    assert (len(s2["labeled_10p"]), len(s2["labeled_40p"])) == (2, 8)
    assert s2["test"] == s["test"]   # each list has its own seeded draw


def test_amos_protocol_sizes(tmp_path):
    train = [f"amos_{i:04d}" for i in range(1, 241)]
    test = [f"amos_{i:04d}" for i in range(241, 361)]
    prep = _manifest(tmp_path, "amos", train, test)
    s = make_splits(prep, seed=0)   # default 5 %
    assert _sizes(s) == {"test": 120, "eval": 24, "train": 216, "labeled_5p": 10, "unlabeled_5p": 206}
    assert s["test"] == test
    assert len(make_splits(prep, labeled=0.02, seed=0)["labeled_2p"]) == 4


@pytest.mark.parametrize("n,expect", [(3, (1, 1, 1, 1)), (8, (5, 1, 2, 1)), (12, (7, 2, 3, 1)),
                                      (100, (66, 14, 20, 13))])
def test_proportional_sizes(tmp_path, n, expect):
    prep = _manifest(tmp_path, "nifti", [f"c{i:03d}" for i in range(n)])
    s = make_splits(prep, labeled=0.2, seed=0)
    assert (len(s["train"]), len(s["eval"]), len(s["test"]), len(s["labeled_20p"])) == expect


def test_unlabeled_cases_only_in_unlabeled_pool(tmp_path):
    ids = [f"c{i:02d}" for i in range(12)]
    prep = _manifest(tmp_path, "nifti", ids, unlabeled=ids[:4])
    s = make_splits(prep, labeled=0.5, seed=0)
    assert set(ids[:4]) <= set(s["unlabeled_50p"]) and not set(ids[:4]) & set(s["eval"] + s["test"] + s["labeled_50p"])
    with pytest.raises(DataError, match="at least 3"):
        make_splits(_manifest(tmp_path, "dicom", ["a", "b"]), labeled=0.5)


def test_import_dhc_amos_lists(tmp_path, shared_data):
    dhc = shared_data / "dhc_splits" / "amos"
    test = read_id_list(dhc / "test.txt")
    train_eval = read_id_list(dhc / "train.txt") + read_id_list(dhc / "eval.txt")
    prep = _manifest(tmp_path, "amos", sorted(train_eval), sorted(test))
    s = make_splits(prep, labeled=0.05, from_lists=dhc)
    assert sorted(s) == ["eval", "labeled_5p", "test", "train", "unlabeled_5p"]
    for name in ("train", "eval", "test", "labeled_5p", "unlabeled_5p"):
        assert s[name] == read_id_list(dhc / f"{name}.txt"), name
        assert read_split(prep, name) == read_id_list(dhc / f"{name}.txt")
    assert _sizes(s)["labeled_5p"] == 10 and _sizes(s)["train"] == 216
    s = make_splits(prep, labeled=[0.02, 0.1], from_lists=dhc)
    assert s["labeled_2p"] == read_id_list(dhc / "labeled_2p.txt") and len(s["labeled_10p"]) == 21
    # the published labeled_20p.txt holds 3 eval cases: rejected, naming them
    with pytest.raises(DataError, match="labeled_20p: case.s. not in train: amos_0066, amos_0349, amos_0381"):
        make_splits(prep, labeled=0.2, from_lists=dhc)


def test_import_dhc_synapse_test_list_draws_the_rest(tmp_path, shared_data):
    dhc = shared_data / "dhc_splits" / "synapse"
    prep = _manifest(tmp_path, "synapse", SYNAPSE_IDS)
    s = make_splits(prep, labeled=0.2, seed=0, from_lists=dhc)
    assert s["test"] == read_id_list(dhc / "test.txt") and len(s["test"]) == 6
    assert _sizes(s) == {"test": 6, "eval": 4, "train": 20, "labeled_20p": 4, "unlabeled_20p": 16}
    assert not set(s["test"]) & set(s["train"] + s["eval"])


def test_unknown_ids_rejected_by_name(tmp_path, shared_data, capsys):
    # the DHC AMOS lists against a data set that lacks some of their cases
    dhc = shared_data / "dhc_splits" / "amos"
    prep = _manifest(tmp_path, "amos", [f"amos_{i:04d}" for i in range(1, 100)])
    with pytest.raises(DataError) as err:
        make_splits(prep, from_lists=dhc)
    msg = str(err.value)
    assert str(dhc / "test.txt") in msg and "unknown case id" in msg
    first_unknown = next(i for i in read_id_list(dhc / "test.txt") if int(i[5:]) >= 100)
    assert first_unknown in msg
    assert not (prep / "splits").exists()
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "test.txt").write_text("amos_0001\nnot_a_case\n")
    assert main(["split", "--data", str(prep), "--from-lists", str(lists)]) == 1
    err_out = capsys.readouterr().err
    assert "error:" in err_out and "not_a_case" in err_out and str(lists / "test.txt") in err_out


def test_inconsistent_lists_rejected(tmp_path):
    prep = _manifest(tmp_path, "synapse", SYNAPSE_IDS)
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "test.txt").write_text("0001\n0002\n")
    (lists / "eval.txt").write_text("0002\n0003\n")
    with pytest.raises(DataError, match="eval and test share case"):
        make_splits(prep, from_lists=lists)


def test_read_split_missing(tmp_path):
    prep = _manifest(tmp_path, "synapse", SYNAPSE_IDS)
    with pytest.raises(DataError, match="split 'train' not found"):
        read_split(prep, "train")
    with pytest.raises(DataError, match="dataset.json"):
        make_splits(tmp_path / "nothing")


def test_data_prep_synapse_entry_point_writes_the_protocol_splits(phantom_raw, tmp_path, capsys):
    import runpy

    main = runpy.run_path(str(Path(__file__).resolve().parents[2] / "data_prep" / "prepare_synapse.py"))["main"]
    out = tmp_path / "prep"
    assert main(["--raw", str(phantom_raw), "--out", str(out), "--workers", "1"]) == 0
    for name in ("train", "eval", "test", "labeled_10p", "labeled_20p", "labeled_40p", "unlabeled_40p"):
        assert (out / "splits" / f"{name}.txt").read_text(encoding="utf-8").split(), name
    assert main(["--raw", str(tmp_path / "nothing"), "--out", str(tmp_path / "bad")]) == 1
    assert "error:" in capsys.readouterr().err and not (tmp_path / "bad").exists()
