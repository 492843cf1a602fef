"""Classify config keys named as ``medseg-dpl train`` names them; the old names, deprecated,
translated for one release; the classification checkpoint written by ``medseg_dpl.checkpoint``."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from medseg_dpl.checkpoint import FORMAT_VERSION, CheckpointError, load_checkpoint
from medseg_dpl.classification.datasets import load_digits_data
from medseg_dpl.classification.defaults import (CLASSIFY_DEFAULTS, LEGACY_KEYS, _flat,
                                                load_classify_config)
from medseg_dpl.classification.trainer import train_classifier
from medseg_dpl.cli import main
from medseg_dpl.config import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# configs/digits_debiaspl.yaml as shipped before the rename
OLD_DEBIASPL = """seed: 0
data: {dataset: digits, labels_per_class: 2}
method: {name: debiaspl, threshold: 0.7, mu: 7, ema_momentum: 0.95, tau: 0.4, qhat_momentum: 0.99}
train: {steps: 400, batch_size: 16, eval_every: 100, num_threads: 1}
"""


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is fastest, the more so on shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _load(path=None, overrides=()):
    """``(config, [DeprecationWarning messages])``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_classify_config(path, overrides)
    return cfg, [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]


def _get(cfg: dict, dotted: str):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


@pytest.mark.parametrize("old,new,value", [
    ("seed=3", "train.seed", 3), ("method.tau=0.5", "debias.tau", 0.5),
    ("method.qhat_momentum=0.9", "debias.momentum", 0.9),
    ("method.prior=labeled", "debias.reference", "labeled_prior"),
    ("method.prior=uniform", "debias.reference", "uniform"),
    ("method.ema_momentum=0.9", "train.ema_momentum", 0.9),
    ("method.teacher_logits=t.npy", "teacher.logits", "t.npy"),
    ("train.eval_every=7", "train.val_every", 7),
    ("train.amp=true", "train.amp", "bf16"), ("train.amp=false", "train.amp", "none"),
    ("method.mu=3", "train.unlabeled_batch_size", 3 * CLASSIFY_DEFAULTS["train"]["batch_size"]),
])
def test_old_key_translates_with_one_deprecation_warning(old, new, value, caplog):
    with caplog.at_level(logging.WARNING, logger="medseg_dpl.classify"):
        cfg, msgs = _load(None, [old])
    assert _get(cfg, new) == value
    old_key = old.split("=")[0]
    assert len(msgs) == 1 and old_key in msgs[0] and new in msgs[0]
    assert old_key in caplog.text and new in caplog.text  # what a CLI user sees (stderr)
    assert _load(None, [f"{new}={value}"]) == (cfg, [])    # the new name: same config, no warning


def test_mu_uses_the_batch_size_of_its_own_source(tmp_path):
    for order in (["method.mu=3", "train.batch_size=16"], ["train.batch_size=16", "method.mu=3"]):
        assert _load(None, order)[0]["train"]["unlabeled_batch_size"] == 48
    f = tmp_path / "old.yaml"
    f.write_text("method: {mu: 2}\ntrain: {batch_size: 4}\n")
    assert _load(f)[0]["train"]["unlabeled_batch_size"] == 8
    assert _load(f, ["train.batch_size=5", "method.mu=3"])[0]["train"]["unlabeled_batch_size"] == 15
    with pytest.raises(ConfigError, match="method.mu: expected an integer"):
        _load(None, ["method.mu=2.5"])


def test_old_yaml_file_gives_the_shipped_config(tmp_path):
    f = tmp_path / "digits_debiaspl_old.yaml"
    f.write_text(OLD_DEBIASPL)
    cfg, msgs = _load(f)
    assert cfg == _load(CONFIGS / "digits_debiaspl.yaml")[0]
    assert len(msgs) == 6 and all(str(f) in m for m in msgs)
    # sources layer as before: an override, old or new name, replaces the file's value
    assert _load(f, ["train.seed=5"])[0]["train"]["seed"] == 5
    assert _load(CONFIGS / "digits_debiaspl.yaml", ["seed=5"])[0]["train"]["seed"] == 5


@pytest.mark.parametrize("overrides,old,new", [
    (["seed=1", "train.seed=2"], "seed", "train.seed"),
    (["method.tau=0.5", "debias.tau=0.4"], "method.tau", "debias.tau"),
    (["method.prior=labeled", "debias.reference=uniform"], "method.prior", "debias.reference"),
    (["train.batch_size=16", "method.mu=3", "train.unlabeled_batch_size=40"], "method.mu",
     "train.unlabeled_batch_size"),
])
def test_old_and_new_key_with_different_values_is_an_error(overrides, old, new):
    with pytest.raises(ConfigError) as exc:
        _load(None, overrides)
    assert f"{old}=" in str(exc.value) and f"{new}=" in str(exc.value)


def test_old_and_new_key_with_the_same_value_is_accepted():
    cfg, msgs = _load(None, ["seed=2", "train.seed=2", "method.prior=labeled",
                             "debias.reference=labeled_prior"])
    assert cfg["train"]["seed"] == 2 and cfg["debias"]["reference"] == "labeled_prior"
    assert len(msgs) == 2


def test_conflict_in_a_file_names_the_file_and_both_keys(tmp_path, capsys):
    f = tmp_path / "both.yaml"
    f.write_text("seed: 1\ntrain: {seed: 2}\n")
    rc = main(["classify", "--config", str(f), "--no-progress"])
    err = capsys.readouterr().err
    assert rc != 0 and "both.yaml" in err and "seed=1" in err and "train.seed=2" in err
    assert "Traceback" not in err


def test_shipped_classify_configs_use_no_deprecated_key():
    files = sorted(CONFIGS.glob("digits_*.yaml"))
    assert len(files) == 3
    for f in files:
        keys = _flat(yaml.safe_load(f.read_text(encoding="utf-8")))
        assert not set(keys) & (set(LEGACY_KEYS) - {"train.amp"}), f
        assert not isinstance(keys.get("train.amp"), bool), f
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            load_classify_config(f)


def test_old_and_new_keys_train_identically():
    data = load_digits_data(2, seed=0)
    common = ["train.steps=4", "train.batch_size=8", "method.threshold=0.0", "train.log_every=2"]
    old = ["seed=1", "method.mu=2", "method.ema_momentum=0.9", "method.tau=1.0",
           "method.qhat_momentum=0.8", "method.prior=labeled", "train.eval_every=2"]
    new = ["train.seed=1", "train.unlabeled_batch_size=16", "train.ema_momentum=0.9",
           "debias.tau=1.0", "debias.momentum=0.8", "debias.reference=labeled_prior", "train.val_every=2"]
    res = [train_classifier(_load(CONFIGS / "digits_debiaspl.yaml", common + keys)[0], None,
                            progress=False, data=data) for keys in (old, new)]
    for r in res:
        r.pop("seconds")
    assert res[0] == res[1]


def test_checkpoint_is_a_classification_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert main(["classify", "--config", str(CONFIGS / "digits_supervised.yaml"), "--out", str(out),
                 "--no-progress", "train.steps=2", "train.batch_size=8", "train.log_every=5"]) == 0
    path = out / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(path, kind="classification")
    assert ckpt["kind"] == "classification" and ckpt["format_version"] == FORMAT_VERSION
    assert ckpt["config"]["train"]["seed"] == 0 and "seed" not in ckpt["config"]
    assert ckpt["classes"] == [str(d) for d in range(10)]
    assert _load(out / "config.yaml") == (ckpt["config"], [])  # the run's config loads back as is
    with pytest.raises(CheckpointError, match="image-classification"):
        load_checkpoint(path, kind="segmentation")
