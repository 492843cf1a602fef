"""The one trainer of ``medseg-dpl train``: every method, CPU or CUDA, one process or torchrun DDP.

Iteration-based: step k's batch comes from ``StepBatches[k]`` (randomness a function of
(seed, k, rank)), the global RNGs are re-seeded from (seed, k, rank) before the step, so
``resume`` from a checkpoint at step k continues exactly as the uninterrupted run would.

Per step: poly LR -> autocast (bf16, or fp16 with GradScaler, on CUDA; off on CPU, same code)
-> ``algorithm.train_step`` -> finite-loss check -> backward, clip, step -> EMA teacher update.
Periodically: validation of the inference network (the EMA teacher for every method that has
one, supervised included; the EMA of network A for two-network methods) on whole eval volumes with
sliding windows and per-organ Dice, best-model selection, atomic checkpoints, TensorBoard +
``train.log`` (and a progress bar on a terminal, a plain line every ``log_every`` steps when
the output is redirected). At the end: ``pseudo_labels.json`` and ``metrics.json`` (with the
validation history). What is measured lives in :mod:`medseg_dpl.engine.reports`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Optional

import nibabel as nib
import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from medseg_dpl.config import save_config
from medseg_dpl.core.ema import ModelEMA, unwrap
from medseg_dpl.data.manifest import load_manifest, read_split
from medseg_dpl.data.pipelines import build_dataset
from medseg_dpl.engine.data import StepBatches, TeacherVolumes, step_loader, step_seed
from medseg_dpl.engine.reports import CropPseudoLabelStats, pseudo_label_report, validate
from medseg_dpl.methods import get_method
from medseg_dpl.models import build_model
from medseg_dpl.utils import atomic_path, resolve_device, seed_everything


class TrainingError(RuntimeError):
    """A run that cannot start or continue (bad data, non-finite loss, nothing to resume)."""


# ----------------------------------------------------------------------------- environment
def _dist_setup(device: torch.device) -> tuple[int, int]:
    """(rank, world); initialises the process group under torchrun (NCCL on CUDA, else gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _logger(out_dir: Path, rank: int) -> logging.Logger:
    log = logging.getLogger(f"medseg_dpl.train.{out_dir.resolve()}")
    log.setLevel(logging.INFO)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    if rank == 0:
        h = logging.FileHandler(out_dir / "train.log", encoding="utf-8")
        h.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        log.addHandler(h)
    else:
        log.addHandler(logging.NullHandler())
    return log


# ----------------------------------------------------------------------------- data
def crop_coverage(n: int, p: int) -> np.ndarray:
    """How many positions of a length-``p`` window inside ``n`` (padded to ≥ p) cover each
    index, ``(max(n, p),)``: uniform random crops see the middle more often than the edges."""
    n_pad = max(n, p)
    x = np.arange(n_pad)
    return (np.minimum(x, n_pad - p) - np.maximum(0, x - p + 1) + 1).astype(np.float64)


def labeled_prior(prep_dir: Path, manifest: dict, ids: list[str], num_classes: int,
                  patch_size=None) -> torch.Tensor:
    """π ``(C,)``: class frequencies of the labeled training cases' voxels.

    With ``patch_size``, each voxel is weighted by how often a uniform random crop of that size
    covers it (the crops q̂ is measured on; padding counts as background, as in the
    pipeline's ``SpatialPadd``), so π and q̂ count the same voxels: whole-volume frequencies
    differ from crop frequencies by up to ×3 for central organs (aorta, pancreas).
    """
    cases = {c["id"]: c for c in manifest["cases"]}
    counts = np.zeros(num_classes, dtype=np.float64)
    for i in ids:
        if not cases[i].get("label"):
            raise TrainingError(f"{prep_dir / 'dataset.json'}: labeled case {i} has no label")
        lab = np.asanyarray(nib.load(str(prep_dir / cases[i]["label"])).dataobj).astype(np.int64)
        if patch_size is None:
            counts += np.bincount(lab.reshape(-1), minlength=num_classes)[:num_classes]
            continue
        pads = [(0, max(0, p - n)) for n, p in zip(lab.shape, patch_size)]
        # SpatialPadd pads symmetrically; coverage is symmetric too, so padding at the end is
        # the same weight per voxel up to the 1-voxel split
        lab = np.pad(lab, pads)
        w = np.einsum("i,j,k->ijk", *[crop_coverage(n, p) for n, p in zip(lab.shape, patch_size)])
        counts += np.bincount(lab.reshape(-1), weights=w.reshape(-1), minlength=num_classes)[:num_classes]
    return torch.from_numpy(counts / counts.sum()).float()


def _to_device(batch: dict, device: torch.device) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.as_tensor() if hasattr(v, "as_tensor") else v
            out[k] = v.to(device, non_blocking=True)
    return out


# ----------------------------------------------------------------------------- state
def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
             "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain(x):
    """numpy scalars -> python numbers (checkpoints must load with weights_only=True)."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def poly_lr(base: float, step: int, steps: int, power: float, warmup: int = 0) -> float:
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    return base * (1.0 - min(step, steps - 1) / steps) ** power


# ----------------------------------------------------------------------------- one step
def build_training(cfg: dict, num_classes: int, prior: torch.Tensor, device: torch.device,
                   world: int = 1):
    """The method with its network(s) on ``device`` (DDP-wrapped when ``world > 1``, compiled
    if asked), its EMA teacher (or None), the optimiser, the GradScaler and the parameter list."""
    t, m, o = cfg["train"], cfg["method"], cfg["optim"]
    method_cls = get_method(m["name"])
    seed_everything(t["seed"])
    student = build_model(cfg["model"], 1, num_classes)
    extra = {}
    if method_cls.num_networks == 2:
        seed_everything(t["seed"] + 1)  # the second network differs by its initialisation
        extra["student2"] = build_model(cfg["model"], 1, num_classes)
    algo = method_cls(student, cfg, num_classes, prior, **extra)
    teacher = None
    if algo.uses_teacher:
        teacher = ModelEMA(student, momentum=t["ema_momentum"])
        algo.attach_teacher(teacher)
    algo.to(device)
    for name, net in algo.trained_networks().items():
        if world > 1:
            net = nn.parallel.DistributedDataParallel(
                net, device_ids=[device.index] if device.type == "cuda" else None)
        if t["compile"]:
            net = torch.compile(net)
        setattr(algo, name, net)
    params = [p for net in algo.trained_networks().values() for p in net.parameters()]
    if o["name"] == "sgd":
        optimizer = torch.optim.SGD(params, lr=o["lr"], momentum=o["momentum"], nesterov=o["nesterov"],
                                    weight_decay=o["weight_decay"])
    elif o["name"] == "adamw":
        optimizer = torch.optim.AdamW(params, lr=o["lr"], weight_decay=o["weight_decay"])
    else:
        raise TrainingError(f"optim.name: expected sgd or adamw, got {o['name']!r}")
    use_fp16 = device.type == "cuda" and t["amp"] == "fp16"
    scaler = torch.amp.GradScaler(device.type, enabled=use_fp16)
    return algo, teacher, optimizer, scaler, params


class NonFiniteLoss(ArithmeticError):
    """The step's loss is NaN or inf (on any rank); nothing was updated."""


def optimisation_step(algo, batch: dict, step: int, optimizer, scaler, params, grad_clip: float,
                      teacher: Optional[ModelEMA], device: torch.device, use_amp: bool,
                      amp_dtype: torch.dtype, world: int = 1) -> tuple[torch.Tensor, dict]:
    """Forward under autocast, finite check, backward, clip, optimiser step, EMA teacher update.

    Raises :class:`NonFiniteLoss` before touching any weight when the loss is not finite.
    """
    with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
        loss, logs = algo.train_step(batch, step)
    finite = torch.isfinite(loss.detach()).float()
    if world > 1:  # every rank must stop together
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if finite.item() < 1:
        raise NonFiniteLoss(str(loss.item()))
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    if teacher is not None:
        teacher.update(algo.student, step)
    return loss, logs


# ----------------------------------------------------------------------------- the run
def train(cfg: dict, out_dir, resume: bool = False) -> dict:
    """Train as ``cfg`` says (a config merged with ``SEG_DEFAULTS``), writing ``out_dir``.

    Returns the final metrics: ``{"step", "best_metric", "best_step", "final_dice_mean",
    "final_dice": {organ: dice}, "pseudo_labels": path}``. Raises :class:`TrainingError`.
    """
    out_dir = Path(out_dir)
    t, d, m = cfg["train"], cfg["data"], cfg["method"]
    device = resolve_device(cfg["train"]["device"])
    rank, world = _dist_setup(device)
    if t["deterministic"]:
        torch.use_deterministic_algorithms(True)
    if rank == 0:
        (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        with atomic_path(out_dir / "config.yaml") as tmp:
            save_config(cfg, tmp)
    _barrier()
    log = _logger(out_dir, rank)
    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(out_dir / "tb"))

    # data ---------------------------------------------------------------------------------
    root = Path(d["root"])
    if not (root / "dataset.json").is_file():
        raise TrainingError(f"data.root: {root / 'dataset.json'} does not exist (run medseg-dpl prep)")
    manifest = load_manifest(root)
    classes = list(manifest["classes"])
    C = len(classes)
    labeled_ids = read_split(root, d["labeled_split"])
    eval_ids = read_split(root, d["eval_split"])
    if cfg["eval"]["max_cases"]:
        eval_ids = eval_ids[: cfg["eval"]["max_cases"]]
    method_cls = get_method(m["name"])
    unlabeled_ids = read_split(root, d["unlabeled_split"]) if method_cls.uses_unlabeled else []
    patch = list(d["patch_size"])
    prior = labeled_prior(root, manifest, labeled_ids, C, patch)
    sources = {"labeled": (build_dataset(root, labeled_ids, "labeled", patch, C, d["num_samples"], d["cache"],
                                         spatial=d["spatial_aug"]),
                           labeled_ids, t["batch_size"])}
    # crop-level pseudo-label diagnostics need the unlabeled cases' truth (the phantom has it);
    # the method never sees it (the trainer takes "truth" out of the batch)
    cases_by_id = {c["id"]: c for c in manifest["cases"]}
    with_truth = bool(unlabeled_ids) and all(cases_by_id[i].get("label") for i in unlabeled_ids)
    if unlabeled_ids:
        sources["unlabeled"] = (build_dataset(root, unlabeled_ids, "unlabeled", patch, C,
                                              d["num_samples"], d["cache"], spatial=d["spatial_aug"],
                                              with_truth=with_truth),
                                unlabeled_ids, t["unlabeled_batch_size"])
    teacher_vols = None
    if cfg["teacher"]["predictions"]:
        if not unlabeled_ids:
            raise TrainingError("teacher.predictions needs a semi-supervised method.name")
        teacher_vols = TeacherVolumes(cfg["teacher"]["predictions"], str(root), manifest, C,
                                      cfg["teacher"]["smoothing"])
        teacher_vols.check(unlabeled_ids)
    eval_ds = build_dataset(root, eval_ids, "eval", patch, C, 1, d["cache"]) if rank == 0 else None

    # model, method, optimiser -------------------------------------------------------------
    algo, teacher, optimizer, scaler, params = build_training(cfg, C, prior, device, world)
    o = cfg["optim"]
    use_amp = device.type == "cuda" and t["amp"] != "none"
    amp_dtype = torch.float16 if t["amp"] == "fp16" else torch.bfloat16

    start, best, best_step = 0, -math.inf, -1
    ckpt_dir = out_dir / "checkpoints"
    if resume:
        path = ckpt_dir / "last.pt"
        if not path.is_file():
            raise TrainingError(f"--resume: {path} does not exist")
        ck = torch.load(path, map_location=device, weights_only=True)
        for name, net in algo.trained_networks().items():
            unwrap(net).load_state_dict(ck[name])
        if teacher is not None:
            teacher.module.load_state_dict(ck["teacher"])
        optimizer.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        algo.load_method_state(ck["method"])
        _set_rng_state(ck["rng"])
        start, best, best_step = ck["step"], ck["best_metric"], ck.get("best_step", -1)
        log.info(f"resumed from {path} at step {start}")

    dataset_info = {"classes": classes, "spacing": list(manifest.get("spacing", [])),
                    "orientation": manifest.get("orientation", "RAS"),
                    "intensity": manifest.get("intensity", {})}

    def save(step: int, name: str) -> None:
        ck = {"step": step, "config": cfg,
              "model": unwrap(algo.inference_network()).state_dict(),
              "teacher": teacher.module.state_dict() if teacher is not None else None,
              "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
              "method": algo.method_state(), "rng": _rng_state(), "dataset": dataset_info,
              "best_metric": float(best), "best_step": best_step}
        for k, net in algo.trained_networks().items():
            ck[k] = unwrap(net).state_dict()
        with atomic_path(ckpt_dir / f"{name}.pt") as tmp:
            torch.save(_plain(ck), tmp)

    organs = classes[1:]
    if rank == 0 and start == 0:
        log.info(f"method {m['name']} on {root}: {len(labeled_ids)} labeled, {len(unlabeled_ids)} "
                 f"unlabeled, {len(eval_ids)} eval cases; {world} process(es) on {device}")
        log.info("labeled class share pi: " + ", ".join(f"{c}={v:.4f}" for c, v in zip(classes, prior.tolist())))
        for c, v in zip(classes, prior.tolist()):
            writer.add_scalar(f"labeled_share/{c}", v, 0)

    batches = StepBatches({k: v for k, v in sources.items()}, t["seed"], rank, world, teacher_vols, patch)
    loader = step_loader(batches, start, t["steps"], d["num_workers"])
    # a bar on a terminal; redirected output gets the log lines instead of bar redraws
    on_tty = sys.stderr.isatty()
    bar = tqdm(total=t["steps"], initial=start, disable=rank != 0 or not t["progress"] or not on_tty,
               desc=f"train {m['name']}", dynamic_ncols=True)
    echo = rank == 0 and t["progress"] and not on_tty
    acc: dict[str, list] = {}
    crop_stats = CropPseudoLabelStats(C)
    crop_history: list[dict] = []
    history: list[dict] = []
    last_dice = None
    tic = time.perf_counter()
    algo.train()
    for step, raw in zip(range(start, t["steps"]), loader):
        batch = {}
        for part in raw.values():
            batch.update(_to_device(part, device))
        truth = batch.pop("truth", None)
        lr = poly_lr(o["lr"], step, t["steps"], o["poly_power"], o["warmup_steps"])
        for g in optimizer.param_groups:
            g["lr"] = lr
        seed_everything(step_seed(t["seed"], step, rank, 999))  # dropout etc.: a function of the step
        try:
            loss, logs = optimisation_step(algo, batch, step, optimizer, scaler, params, o["grad_clip"],
                                           teacher, device, use_amp, amp_dtype, world)
        except NonFiniteLoss as exc:
            msg = (f"non-finite loss ({exc}) at step {step}: stopping; the last good "
                   f"checkpoint ({ckpt_dir / 'last.pt'}) is kept")
            log.error(msg)
            bar.close()
            if writer:
                writer.close()
            raise TrainingError(msg) from None
        done = step + 1
        bar.update(1)

        acc.setdefault("loss/total", []).append(float(loss.detach()))
        if "_pseudo_labels" in logs:
            crop_stats.add(*logs.pop("_pseudo_labels"), truth[:, 0] if truth is not None else None)
        for k, v in logs.items():
            acc.setdefault(k, []).append(v.detach().float().cpu() if isinstance(v, torch.Tensor) else float(v))
        if rank == 0 and (done % t["log_every"] == 0 or done == t["steps"]):
            scalars = {k: float(np.mean([float(x) for x in v])) for k, v in acc.items()
                       if not (isinstance(v[0], torch.Tensor) and v[0].ndim)}
            scalars["lr"] = lr
            scalars["sec_per_step"] = (time.perf_counter() - tic) / len(acc["loss/total"])
            for k, v in scalars.items():
                writer.add_scalar(k, v, done)
            line = f"step {done}/{t['steps']} " + " ".join(f"{k}={v:.4g}" for k, v in scalars.items())
            for k in acc:
                if isinstance(acc[k][0], torch.Tensor) and acc[k][0].ndim:  # (C,): a curve per class
                    vec = torch.stack(acc[k]).mean(0) if k == "pl_share" else acc[k][-1]
                    for c, v in zip(classes, vec.tolist()):
                        writer.add_scalar(f"{k}/{c}", v, done)
                    line += f" {k}=[" + " ".join(f"{v:.3f}" for v in vec.tolist()) + "]"
            if crop_stats.pl.sum() > 0:
                crop = crop_stats.summary()
                crop_history.append({"step": done, **crop})
                for key, vec in crop.items():
                    names = organs if key.endswith("share") else classes
                    for c, v in zip(names, vec):
                        if np.isfinite(v):
                            writer.add_scalar(f"crop_pl_{key}/{c}", v, done)
            log.info(line)
            if echo:
                print(f"[{m['name']}] {line}", flush=True)
            bar.set_postfix(loss=f"{scalars['loss/total']:.3f}")
            acc, tic = {}, time.perf_counter()
        elif rank != 0 and done % t["log_every"] == 0:
            acc = {}

        is_last = done == t["steps"]
        if done % t["val_every"] == 0 or is_last:
            if rank == 0:
                dice = validate(unwrap(algo.inference_network()), eval_ds, cfg, C, device)
                last_dice = dice
                mean = float(np.nanmean(dice)) if np.isfinite(dice).any() else 0.0
                for c, v in zip(organs, dice.tolist()):
                    writer.add_scalar(f"val_dice/{c}", v, done)
                writer.add_scalar("val_dice/mean", mean, done)
                history.append({"step": done, "dice_mean": mean,
                                "dice": {c: float(v) for c, v in zip(organs, dice.tolist())}})
                msg = (f"validation step {done}: mean Dice {mean:.4f} | " +
                       " ".join(f"{c}={v:.3f}" for c, v in zip(organs, dice.tolist())))
                log.info(msg)
                if echo:
                    print(f"[{m['name']}] {msg}", flush=True)
                if mean > best:
                    best, best_step = mean, done
                    save(done, "best")
                    log.info(f"new best {best:.4f} at step {done}")
            _barrier()
        if rank == 0 and (done % t["checkpoint_every"] == 0 or is_last):
            save(done, "last")
        _barrier()
    bar.close()

    result = {"step": t["steps"], "best_metric": float(best), "best_step": best_step,
              "val_history": history}
    if rank == 0:
        if last_dice is None:  # resumed at the end: evaluate the final weights once
            last_dice = validate(unwrap(algo.inference_network()), eval_ds, cfg, C, device)
        result["final_dice"] = {c: float(v) for c, v in zip(organs, last_dice.tolist())}
        result["final_dice_mean"] = float(np.nanmean(last_dice)) if np.isfinite(last_dice).any() else 0.0
        report_ids = unlabeled_ids or read_split(root, d["unlabeled_split"])
        # whole volumes; the eval pipeline includes a label where the case has one
        report_ds = build_dataset(root, report_ids, "eval", patch, C, 1, False)
        report = pseudo_label_report(algo, unwrap(algo.inference_network()), report_ds, cfg, classes, prior, device)
        report["crop_history"] = crop_history  # confident pseudo-labels of the training crops
        with atomic_path(out_dir / "pseudo_labels.json") as tmp:
            tmp.write_text(json.dumps(report, indent=1), encoding="utf-8")
        result["pseudo_labels"] = str(out_dir / "pseudo_labels.json")
        log.info(f"done: best mean Dice {best:.4f} at step {best_step}; final {result['final_dice_mean']:.4f}; "
                 f"pseudo-label share {report['pseudo_label_share']}")
        with atomic_path(out_dir / "metrics.json") as tmp:
            tmp.write_text(json.dumps(result, indent=1), encoding="utf-8")
        if cfg["eval"]["postprocess"]:  # per-organ component rules that eval/predict apply
            from medseg_dpl.evaluation.postprocess import postprocess_run
            postprocess_run(out_dir, data_dir=root, device=device, progress=False)
        writer.close()
    _barrier()
    return result
