"""Helpers for the training tests: a tiny PREP_DIR per the contract (32³ NIfTIs, 4 classes).

Blobs of three sizes (a big, a medium and a small "organ") at jittered positions on a noisy
body, so the class distribution is imbalanced like CT and a few steps of training move Dice.
Smaller than the data package's ``phantom_prep`` fixture (which one integration test uses),
so the trainer's many small runs stay fast.
"""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

CLASSES = ["background", "liver", "spleen", "adrenal"]


def make_tiny_prep(out: Path, n_cases: int = 8, size: int = 32, seed: int = 0,
                   labeled: int = 2, eval_n: int = 2) -> Path:
    out = Path(out)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(exist_ok=True)
    (out / "splits").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), -1).astype(np.float32)
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    cases, counts = [], np.zeros(len(CLASSES))
    radii = [0.30, 0.17, 0.09]
    intens = [0.55, 0.62, 0.5]
    for k in range(n_cases):
        cid = f"{k + 1:04d}"
        lab = np.zeros((size,) * 3, np.uint8)
        img = 0.3 + 0.05 * rng.standard_normal((size,) * 3).astype(np.float32)
        centres = [(0.38, 0.5, 0.5), (0.7, 0.3, 0.5), (0.65, 0.72, 0.45)]
        for c, (ctr, r, v) in enumerate(zip(centres, radii, intens), start=1):
            ctr = (np.asarray(ctr) + rng.uniform(-0.05, 0.05, 3)) * size
            inside = np.linalg.norm(g - ctr, axis=-1) < r * size
            lab[inside & (lab == 0)] = c
            img[inside] = v + 0.05 * rng.standard_normal(inside.sum())
        img = np.clip(img, 0, 1).astype(np.float32)
        nib.save(nib.Nifti1Image(img, affine), str(out / "imagesTr" / f"{cid}.nii.gz"))
        nib.save(nib.Nifti1Image(lab, affine), str(out / "labelsTr" / f"{cid}.nii.gz"))
        counts += np.bincount(lab.ravel(), minlength=len(CLASSES))
        cases.append({"id": cid, "image": f"imagesTr/{cid}.nii.gz", "label": f"labelsTr/{cid}.nii.gz",
                      "subset": "train", "source_image": "", "source_label": "",
                      "original": {"shape": [size] * 3, "affine": affine.tolist(), "spacing": [1.5, 1.5, 2.0]},
                      "crop_box": [[0, size]] * 3, "shape": [size] * 3})
    manifest = {"dataset": "nifti", "classes": CLASSES, "spacing": [1.5, 1.5, 2.0], "orientation": "RAS",
                "intensity": {"clip": [-175.0, 250.0]},
                "label_counts": {c: int(v) for c, v in zip(CLASSES, counts)}, "cases": cases}
    (out / "dataset.json").write_text(json.dumps(manifest, indent=1))
    ids = [c["id"] for c in cases]
    splits = {"eval": ids[:eval_n], "train": ids[eval_n:], "test": [],
              "labeled_20p": ids[eval_n:eval_n + labeled], "unlabeled_20p": ids[eval_n + labeled:]}
    for name, lst in splits.items():
        (out / "splits" / f"{name}.txt").write_text("".join(f"{i}\n" for i in lst))
    return out


def tiny_cfg(prep: Path, method: str, *overrides: str) -> dict:
    """A CPU-sized config for the tiny prep: 8-16-32 UNet, 32³ patch, a few steps."""
    from medseg_dpl.config import load_config
    from medseg_dpl.engine.defaults import SEG_DEFAULTS
    ov = [f"data.root={prep}", f"method.name={method}", "data.patch_size=[32,32,32]",
          "model.channels=[8,16,32]", "model.strides=[2,2]", "train.batch_size=1",
          "train.unlabeled_batch_size=1", "train.steps=3", "train.val_every=3",
          "train.checkpoint_every=3", "train.log_every=1", "train.progress=false",
          "debias.momentum=0.9", "eval.max_cases=1", *overrides]
    return load_config(None, ov, SEG_DEFAULTS)


def build_algo(name: str, cfg: dict, num_classes: int):
    """A method on freshly seeded networks (B too for co-training), in train mode, with an EMA
    teacher where the method keeps one: for tests of a single ``train_step``."""
    import torch

    from medseg_dpl.core.ema import ModelEMA
    from medseg_dpl.methods import get_method
    from medseg_dpl.models import build_model
    torch.manual_seed(0)
    nets = [build_model(cfg["model"], 1, num_classes) for _ in range(2)]
    cls = get_method(name)
    extra = {"student2": nets[1]} if cls.num_networks == 2 else {}
    algo = cls(nets[0], cfg, num_classes, **extra).train()
    if algo.uses_teacher:
        algo.attach_teacher(ModelEMA(algo.student, momentum=0.9))
    return algo
