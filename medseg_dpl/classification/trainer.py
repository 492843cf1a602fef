"""Semi-supervised classification trainer: supervised, FixMatch (EMAN) and DebiasPL.

One step (FixMatch / DebiasPL):

1. labeled batch ``(B, C, H, W)`` -> weak augmentation; unlabeled batch ``(U, C, H, W)``
   (``train.batch_size``, ``train.unlabeled_batch_size``) -> a weak and a strong view;
2. the EMA teacher (eval mode, EMAN) gives logits on the weak view -- or, in teacher mode, the
   rows of the external teacher's logits file for these images;
3. the student sees ``[labeled_weak, unlabeled_strong]`` in one forward (shared BN statistics);
   loss = CE(labeled) + lambda_u · unlabeled loss of :mod:`.methods`;
4. SGD step, cosine learning rate, EMA update of the teacher.

The EMA model is what is evaluated (for every method, supervised included, so the comparison
isolates the pseudo-labels); the student's top-1 is reported too.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from medseg_dpl.checkpoint import save_checkpoint
from medseg_dpl.classification.augment import augmentations
from medseg_dpl.classification.datasets import (ClassificationData, DatasetError, ImageSet,
                                                build_data, infinite_batches, ordered_batches)
from medseg_dpl.classification.defaults import METHODS
from medseg_dpl.classification.methods import build_method
from medseg_dpl.classification.models import build_classifier
from medseg_dpl.config import ConfigError, save_config
from medseg_dpl.core.debias import debiased_probs, pseudo_labels
from medseg_dpl.core.ema import ModelEMA
from medseg_dpl.utils import resolve_device, seed_everything




def load_teacher_logits(path: str | Path, num_unlabeled: int, num_classes: int) -> torch.Tensor:
    """An external teacher's logits ``.npy``: float ``(num_unlabeled, num_classes)``, one row per
    unlabeled image in the order of ``ClassificationData.unlabeled_index``."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"teacher logits file {path} does not exist")
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: not a .npy array: {exc}") from exc
    if arr.shape != (num_unlabeled, num_classes):
        raise DatasetError(f"{path}: logits of shape {arr.shape}, expected ({num_unlabeled}, "
                           f"{num_classes}) = (unlabeled images, classes)")
    if not np.issubdtype(arr.dtype, np.floating) or not np.isfinite(arr).all():
        raise DatasetError(f"{path}: logits must be finite floats, got dtype {arr.dtype}")
    return torch.from_numpy(arr.astype(np.float32))


@torch.no_grad()
def evaluate(model: torch.nn.Module, ds: ImageSet, device: torch.device, batch_size: int = 512,
             num_workers: int = 0) -> float:
    """Top-1 accuracy (fraction) of ``model`` on ``ds`` (no augmentation)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y, _ in ordered_batches(ds, batch_size, num_workers):
        pred = model(x.to(device)).argmax(1).cpu()
        correct += int((pred == y).sum())
        total += len(y)
    model.train(was_training)
    return correct / max(total, 1)


def class_imbalance(counts: np.ndarray) -> float:
    """max/min class share of a ``(C,)`` count vector (``inf`` when a class got nothing)."""
    counts = np.asarray(counts, dtype=np.float64)
    return float("inf") if counts.min() == 0 else float(counts.max() / counts.min())


@torch.no_grad()
def pseudo_label_census(logits: torch.Tensor, truth: torch.Tensor, threshold: float,
                        qhat: Optional[torch.Tensor] = None, tau: float = 0.0,
                        prior: Optional[torch.Tensor] = None) -> dict:
    """Confident pseudo-labels of ``logits`` ``(N, C)`` (debiased when ``qhat`` is given):
    per-class counts, max/min share, mask ratio and accuracy against ``truth`` ``(N,)``."""
    logits = logits.float()
    probs = (debiased_probs(logits, qhat, tau, prior) if qhat is not None
             else torch.softmax(logits, 1))
    labels, mask = pseudo_labels(probs, threshold)
    counts = torch.bincount(labels[mask].cpu(), minlength=logits.shape[1]).numpy()
    kept = mask.cpu()
    return {"counts": counts.tolist(), "share": (counts / max(counts.sum(), 1)).tolist(),
            "imbalance": class_imbalance(counts), "mask_ratio": float(kept.float().mean()),
            "accuracy": float((labels.cpu()[kept] == truth[kept]).float().mean()) if kept.any()
            else float("nan")}


def _lr_factor(schedule: str, step: int, total: int) -> float:
    if schedule == "cosine":  # FixMatch: cos(7πk / 16K), never quite zero
        return math.cos(7 * math.pi * step / (16 * max(total, 1)))
    if schedule == "constant":
        return 1.0
    raise ConfigError(f"optim.schedule: expected 'cosine' or 'constant', got {schedule!r}")


AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _check(cfg: dict) -> None:
    m, t = cfg["method"], cfg["train"]
    if m["name"] not in METHODS:
        raise ConfigError(f"method.name: unknown method {m['name']!r} ({', '.join(METHODS)})")
    if cfg["teacher"]["logits"] and m["name"] == "supervised":
        raise ConfigError("teacher.logits: needs method.name fixmatch or debiaspl")
    if t["amp"] not in AMP_DTYPES:
        raise ConfigError(f"train.amp: expected one of {', '.join(AMP_DTYPES)}, got {t['amp']!r}")
    for key, ok in (("train.steps", t["steps"] > 0), ("train.batch_size", t["batch_size"] > 0),
                    ("train.unlabeled_batch_size", t["unlabeled_batch_size"] > 0),
                    ("method.threshold", 0 <= m["threshold"] <= 1),
                    ("data.labels_per_class", cfg["data"]["labels_per_class"] > 0),
                    ("data.test_fraction", 0 < cfg["data"]["test_fraction"] < 1)):
        if not ok:
            raise ConfigError(f"{key}: value out of range")
    _lr_factor(cfg["optim"]["schedule"], 0, 1)


def train_classifier(cfg: dict, out_dir: str | Path | None = None, progress: bool = True,
                     data: Optional[ClassificationData] = None) -> dict:
    """Train as ``cfg`` (a merged ``CLASSIFY_DEFAULTS`` config) says; return the results.

    With ``out_dir``: TensorBoard events, ``config.yaml``, ``results.json``, ``unlabeled.txt``
    (the row order of a teacher logits file) and ``checkpoints/last.pt`` are written there.
    Results: ``top1`` (EMA model, held-out part), ``top1_student``, ``pl_train`` (census of the
    confident pseudo-labels the student was trained on: per-class counts/share, max/min
    ``imbalance``, ``mask_ratio``, ``accuracy`` against the held-out truth), ``pl_final`` (the
    same for the final teacher over the whole unlabeled set, no augmentation), ``qhat``.
    """
    _check(cfg)
    threads = torch.get_num_threads()
    if cfg["train"]["num_threads"] > 0:
        torch.set_num_threads(cfg["train"]["num_threads"])
    try:
        return _train(cfg, out_dir, progress, data)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: dict, out_dir, progress: bool, data: Optional[ClassificationData]) -> dict:
    t0 = time.time()
    seed_everything(cfg["train"]["seed"])
    device = resolve_device(cfg["train"]["device"])
    data = data if data is not None else build_data(cfg)
    mcfg, tcfg, ocfg = cfg["method"], cfg["train"], cfg["optim"]
    C = data.num_classes
    weak, strong = augmentations("digits" if cfg["data"]["dataset"] == "digits" else "natural")

    student = build_classifier(cfg["model"], data.in_channels, C, data.image_size).to(device)
    teacher = ModelEMA(student, tcfg["ema_momentum"])
    labeled_counts = torch.bincount(data.labeled.labels, minlength=C)
    method = build_method(cfg, C, labeled_counts)
    if method is not None:
        method.to(device)
    ext_logits = None
    if cfg["teacher"]["logits"]:
        ext_logits = load_teacher_logits(cfg["teacher"]["logits"], len(data.unlabeled), C)

    decay, no_decay = [], []
    for p in student.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)  # no weight decay on BN and biases
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": ocfg["weight_decay"]},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=ocfg["lr"],
                                momentum=ocfg["momentum"], nesterov=ocfg["nesterov"])
    steps, B, U = tcfg["steps"], tcfg["batch_size"], tcfg["unlabeled_batch_size"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: _lr_factor(ocfg["schedule"], k, steps))

    gen = torch.Generator().manual_seed(cfg["train"]["seed"])
    nw = cfg["data"]["num_workers"]
    lab_iter = infinite_batches(data.labeled, B, gen, nw)
    unl_iter = infinite_batches(data.unlabeled, U, gen, nw) if method is not None else None
    amp_dtype = AMP_DTYPES[tcfg["amp"]]
    amp = torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16,
                         enabled=amp_dtype is not None)
    # fp16 gradients underflow without loss scaling; a disabled scaler is a plain backward/step
    scaler = torch.amp.GradScaler(device.type,
                                  enabled=tcfg["amp"] == "fp16" and device.type == "cuda")

    writer = None
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
        names = data.names or []
        (out_dir / "unlabeled.txt").write_text("".join(
            f"{i}\t{names[i] if i < len(names) else ''}\n" for i in data.unlabeled_index))
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(out_dir / "tb"))

    pl_counts = np.zeros(C, dtype=np.int64)
    pl_seen = pl_correct = 0
    window: dict[str, list] = {}
    top1 = top1_student = float("nan")
    bar = tqdm(total=steps, desc=f"classify {mcfg['name']}", disable=not progress,
               dynamic_ncols=True)
    student.train()
    for step in range(1, steps + 1):
        x_l, y_l, _ = next(lab_iter)
        x_l, y_l = weak(x_l.to(device)), y_l.to(device)
        stats = {}
        with amp:
            if method is None:
                loss_x = F.cross_entropy(student(x_l).float(), y_l)
                loss = loss_x
            else:
                x_u, y_u, i_u = next(unl_iter)
                x_u = x_u.to(device)
                with torch.no_grad():
                    t_logits = (ext_logits[i_u].to(device) if ext_logits is not None
                                else teacher(weak(x_u)))
                logits = student(torch.cat([x_l, strong(x_u)]))
                loss_x = F.cross_entropy(logits[:len(x_l)].float(), y_l)
                pl = method(logits[len(x_l):], t_logits)
                loss = loss_x + mcfg["lambda_u"] * pl.loss
                mask, labels = pl.mask.cpu(), pl.pseudo_labels.cpu()
                pl_counts += np.bincount(labels[mask].numpy(), minlength=C)
                pl_seen += int(mask.sum())
                pl_correct += int((labels[mask] == y_u[mask]).sum())
                stats = {"loss/unlabeled": pl.loss.item(), "pseudo/mask_ratio": float(mask.float().mean()),
                         "pseudo/accuracy_all": float((labels == y_u).float().mean())}
                if mask.any():
                    stats["pseudo/accuracy"] = float((labels[mask] == y_u[mask]).float().mean())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        sched.step()
        teacher.update(student)
        stats.update({"loss/total": loss.item(), "loss/labeled": loss_x.item(),
                      "lr": optimizer.param_groups[0]["lr"]})
        for k, v in stats.items():
            window.setdefault(k, []).append(v)
        if writer is not None and (step % tcfg["log_every"] == 0 or step == steps):
            for k, v in window.items():
                writer.add_scalar(k, float(np.mean(v)), step)
            if method is not None:
                for c, q in enumerate(method.qhat.tolist()):
                    writer.add_scalar(f"qhat/{data.classes[c]}", q, step)
            window = {}
        if step % tcfg["val_every"] == 0 or step == steps:
            top1 = evaluate(teacher.module, data.test, device, num_workers=nw)
            top1_student = evaluate(student, data.test, device, num_workers=nw)
            if writer is not None:
                writer.add_scalar("test/top1", top1, step)
                writer.add_scalar("test/top1_student", top1_student, step)
        bar.update(1)
        if step % 10 == 0 or step == steps:
            post = {"loss": f"{loss.item():.3f}", "top1": f"{top1:.3f}"}
            if "pseudo/mask_ratio" in stats:
                post["mask"] = f"{stats['pseudo/mask_ratio']:.2f}"
            bar.set_postfix(post)
    bar.close()

    results = {"method": mcfg["name"], "seed": cfg["train"]["seed"], "steps": steps,
               "teacher_mode": bool(ext_logits is not None), "top1": top1,
               "top1_student": top1_student, "num_labeled": len(data.labeled),
               "num_unlabeled": len(data.unlabeled), "num_test": len(data.test)}
    if method is not None:
        results["pl_train"] = {
            "counts": pl_counts.tolist(),
            "share": (pl_counts / max(pl_counts.sum(), 1)).tolist(),
            "imbalance": class_imbalance(pl_counts),
            "mask_ratio": pl_seen / (steps * U),
            "accuracy": pl_correct / pl_seen if pl_seen else float("nan")}
        if ext_logits is not None:
            final_logits = ext_logits
        else:
            teacher.module.eval()
            with torch.no_grad():
                final_logits = torch.cat([teacher(x.to(device)).float().cpu() for x, _, _ in
                                          ordered_batches(data.unlabeled, 512, nw)])
        results["pl_final"] = pseudo_label_census(
            final_logits, data.unlabeled.labels, mcfg["threshold"],
            method.qhat.cpu() if method.debias else None, method.tau,
            method.prior.cpu() if method.prior is not None else None)
        results["qhat"] = method.qhat.tolist()
    results["seconds"] = time.time() - t0

    if out_dir is not None:
        writer.close()
        ckpt = {"step": steps, "config": cfg, "model": teacher.module.state_dict(),
                "student": student.state_dict(), "teacher": teacher.module.state_dict(),
                "optimizer": optimizer.state_dict(),
                "method": method.state_dict() if method is not None else {},
                "classes": data.classes, "best_metric": top1}
        save_checkpoint(out_dir / "checkpoints" / "last.pt", ckpt, kind="classification")
        (out_dir / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    return results
