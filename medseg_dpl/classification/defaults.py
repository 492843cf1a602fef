"""``CLASSIFY_DEFAULTS``: the schema (and defaults) of a ``medseg-dpl classify`` config.

Keys that mean the same as in ``medseg-dpl train`` have its names and places
(``medseg_dpl/engine/defaults.py``: ``train.seed``, ``debias.tau``, ``train.val_every``, ...).
Load with :func:`load_classify_config`: it is :func:`medseg_dpl.config.load_config` plus the
translation of the keys of earlier releases (:data:`LEGACY_KEYS`, deprecated).
"""
from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path
from typing import Iterable, Mapping

from medseg_dpl.config import ConfigError, parse_override, read_yaml, set_dotted

CLASSIFY_DEFAULTS: dict = {
    "data": {
        "dataset": "digits",        # "digits" (scikit-learn load_digits, 8x8) or "folder"
        "labels_per_class": 2,      # labeled images per class when no labeled_index is given
        "test_fraction": 0.3,       # held-out part (stratified) when there is no test_root
        "test_seed": 0,             # the held-out part is fixed across seeds: comparable top-1
        "root": None,               # folder: ImageFolder-style train folder (root/<class>/<img>)
        "test_root": None,          # folder: optional separate test folder, same class names
        "labeled_index": None,      # folder: file of labeled images (indices or relative paths)
        "image_size": 32,           # folder: images are resized (shorter side) and center-cropped
        "channels": 3,              # folder: 3 (RGB) or 1 (grayscale)
        "num_workers": 0,           # folder: DataLoader workers for reading images
    },
    "model": {
        "width": 32,                # channels of the first stage; doubled at each downsampling
        "dropout": 0.0,
    },
    "method": {
        "name": "debiaspl",         # "supervised", "fixmatch" (EMA teacher) or "debiaspl"
        "threshold": 0.7,           # confidence threshold of the pseudo-labels
        "lambda_u": 1.0,            # weight of the unlabeled loss
    },
    "debias": {
        "tau": 0.4,                 # debiasing strength τ (DebiasPL)
        "momentum": 0.999,          # q̂ <- m·q̂ + (1-m)·mean softmax(teacher logits)
        "reference": "uniform",     # reference prior π: "uniform" or "labeled_prior" (class
                                    # frequencies of the labeled images)
    },
    "teacher": {
        "logits": None,             # .npy (num_unlabeled, C): pseudo-labels from external logits
    },
    "optim": {
        "lr": 0.03,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 5e-4,
        "schedule": "cosine",       # "cosine" (FixMatch's 7/16·π cosine) or "constant"
    },
    "train": {
        "steps": 500,
        "batch_size": 32,           # labeled images per step
        "unlabeled_batch_size": 224,  # unlabeled images per step (FixMatch: mu = 7 x batch_size)
        "seed": 0,                  # model init, augmentation, and which images are labeled
        "amp": "none",              # none | bf16 | fp16 (fp16 with a GradScaler on CUDA); autocast
                                    # on the CPU too
        "ema_momentum": 0.999,      # EMA teacher (EMAN): θ_t <- m·θ_t + (1-m)·θ_s; keep 1/(1-m)
                                    # well below train.steps (digits configs: 0.95)
        "val_every": 100,           # steps between top-1 evaluations on the held-out part
        "log_every": 10,
        "device": "auto",           # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
        "num_threads": 0,           # CPU intra-op threads; 0 = torch's default. 1 is much faster
                                    # for these tiny models on a busy machine
    },
}

METHODS = ("supervised", "fixmatch", "debiaspl")

# Deprecated for one release: old dotted key -> its name in the segmentation trainer's schema.
LEGACY_KEYS = {
    "seed": "train.seed",
    "method.mu": "train.unlabeled_batch_size",   # a ratio: unlabeled = mu x train.batch_size
    "method.ema_momentum": "train.ema_momentum",
    "method.tau": "debias.tau",
    "method.qhat_momentum": "debias.momentum",
    "method.prior": "debias.reference",          # labeled -> labeled_prior
    "method.teacher_logits": "teacher.logits",
    "train.eval_every": "train.val_every",
    "train.amp": "train.amp",                    # true/false -> bf16/none
}
_LEGACY_VALUES = {"method.prior": {"labeled": "labeled_prior"},
                  "train.amp": {True: "bf16", False: "none"}}

log = logging.getLogger("medseg_dpl.classify")


def _flat(d: Mapping, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (non-empty mappings expanded, the rest are leaves)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def translate_legacy_keys(cfg: Mapping, batch_size: int = CLASSIFY_DEFAULTS["train"]["batch_size"],
                          source: str = "overrides") -> dict:
    """``{dotted key: value}`` of one config source (a YAML file, or all overrides) with every
    deprecated key of :data:`LEGACY_KEYS` under its new name and value. Each one found emits a
    ``DeprecationWarning`` and a logged warning; an old and a new key with different values are a
    :class:`ConfigError` naming both. ``method.mu`` becomes ``mu x train.batch_size``: the
    source's own batch size, else ``batch_size`` (the config's so far). ``source`` names it in
    the warnings."""
    out = dict(cfg)
    for old, new in LEGACY_KEYS.items():
        if old not in out or (old == "train.amp" and not isinstance(out[old], bool)):
            continue
        raw = value = out.pop(old)
        if old == "method.mu":
            b = out.get("train.batch_size", batch_size)
            for key, v in ((old, raw), ("train.batch_size", b)):
                if isinstance(v, bool) or not isinstance(v, int):
                    raise ConfigError(f"{key}: expected an integer, got {v!r}")
            value = raw * b
        if isinstance(value, (str, bool)):
            value = _LEGACY_VALUES.get(old, {}).get(value, value)
        if new in out and out[new] != value:
            raise ConfigError(f"{old}={raw!r} (deprecated) and {new}={out[new]!r} are both given, "
                              f"with different values; keep only {new}")
        out[new] = value
        msg = f"{source}: config key {old}={raw!r} is deprecated, use {new}={value!r}"
        warnings.warn(msg, DeprecationWarning, stacklevel=3)
        log.warning("warning: %s", msg)  # DeprecationWarning is hidden by default outside __main__
    return out


def load_classify_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> dict:
    """``CLASSIFY_DEFAULTS`` <- YAML file <- ``key.sub=value`` overrides, validated as by
    :func:`load_config`; the deprecated keys of the file, then of the overrides (all together:
    an old and a new key among them may not disagree), are translated first."""
    cfg = copy.deepcopy(CLASSIFY_DEFAULTS)
    if path is not None:
        path = Path(path)
        data = _flat(read_yaml(path))
        try:
            for key, value in translate_legacy_keys(data, source=str(path)).items():
                cfg = set_dotted(cfg, key, value)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    pairs = dict(parse_override(text) for text in overrides)
    for key, value in translate_legacy_keys(pairs, cfg["train"]["batch_size"]).items():
        cfg = set_dotted(cfg, key, value)
    return cfg
