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

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import nibabel as nib
import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from medseg_dpl.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from medseg_dpl.config import save_config
from medseg_dpl.core.ema import ModelEMA, unwrap
from medseg_dpl.data.manifest import load_manifest, read_split
from medseg_dpl.data.pipelines import build_dataset
from medseg_dpl.engine.data import StepBatches, TeacherVolumes, step_loader, step_seed
from medseg_dpl.engine.hooks import (CheckpointHook, EMAHook, LoggingHook, ReportHook,
                                     ValidationHook)
from medseg_dpl.engine.reports import validate
from medseg_dpl.errors import MedsegError
from medseg_dpl.methods import get_method
from medseg_dpl.methods.base import StepResult
from medseg_dpl.models import build_model
from medseg_dpl.utils import atomic_path, resolve_device, seed_everything


class TrainingError(MedsegError, RuntimeError):
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



@dataclass
class TrainingData:
    """What a run trains and validates on (built by :func:`build_sources`)."""
    root: Path
    manifest: dict
    classes: list
    labeled_ids: list
    unlabeled_ids: list
    eval_ids: list
    prior: torch.Tensor               # π (C,): labeled class shares over the crops the sampler draws
    sources: dict                     # name -> (dataset, ids, volumes per step)
    teacher_volumes: Optional[TeacherVolumes]
    eval_dataset: object              # whole eval volumes (rank 0 only, else None)
    patch: list
    unlabeled_split: str

    def report_dataset(self):
        """Whole unlabeled volumes (the unlabeled split's, for supervised too); the eval
        pipeline includes a label where the case has one."""
        ids = self.unlabeled_ids or read_split(self.root, self.unlabeled_split)
        return build_dataset(self.root, ids, "eval", self.patch, len(self.classes), 1, False)

    @property
    def dataset_record(self) -> dict:
        """The checkpoint's ``dataset``: what predict needs to rebuild the input geometry."""
        m = self.manifest
        return {"classes": self.classes, "spacing": list(m.get("spacing", [])),
                "orientation": m.get("orientation", "RAS"), "intensity": m.get("intensity", {})}


def build_sources(cfg: dict, rank: int = 0) -> TrainingData:
    """Read PREP_DIR's manifest and splits and build the labeled / unlabeled / eval datasets."""
    d, t = cfg["data"], cfg["train"]
    root = Path(d["root"])
    if not (root / "dataset.json").is_file():
        raise TrainingError(f"data.root: {root / 'dataset.json'} does not exist (run medseg-dpl prep)")
    manifest = load_manifest(root)
    classes = list(manifest["classes"])
    C, patch = len(classes), list(d["patch_size"])
    labeled_ids, eval_ids = read_split(root, d["labeled_split"]), read_split(root, d["eval_split"])
    if cfg["eval"]["max_cases"]:
        eval_ids = eval_ids[: cfg["eval"]["max_cases"]]
    semi = get_method(cfg["method"]["name"]).uses_unlabeled
    unlabeled_ids = read_split(root, d["unlabeled_split"]) if semi else []
    prior = labeled_prior(root, manifest, labeled_ids, C, patch)
    sources = {"labeled": (build_dataset(root, labeled_ids, "labeled", patch, C, d["num_samples"], d["cache"],
                                         spatial=d["spatial_aug"]), labeled_ids, t["batch_size"])}
    # crop-level pseudo-label diagnostics need the unlabeled cases' truth (the phantom has it);
    # the method never sees it (the trainer takes "truth" out of the batch)
    by_id = {c["id"]: c for c in manifest["cases"]}
    with_truth = bool(unlabeled_ids) and all(by_id[i].get("label") for i in unlabeled_ids)
    if unlabeled_ids:
        sources["unlabeled"] = (build_dataset(root, unlabeled_ids, "unlabeled", patch, C, d["num_samples"],
                                              d["cache"], spatial=d["spatial_aug"], with_truth=with_truth),
                                unlabeled_ids, t["unlabeled_batch_size"])
    teacher_vols = None
    if cfg["teacher"]["predictions"]:
        if not unlabeled_ids:
            raise TrainingError("teacher.predictions needs a semi-supervised method.name")
        teacher_vols = TeacherVolumes(cfg["teacher"]["predictions"], str(root), manifest, C,
                                      cfg["teacher"]["smoothing"])
        teacher_vols.check(unlabeled_ids)
    eval_ds = build_dataset(root, eval_ids, "eval", patch, C, 1, d["cache"]) if rank == 0 else None
    return TrainingData(root, manifest, classes, labeled_ids, unlabeled_ids, eval_ids, prior, sources,
                        teacher_vols, eval_ds, patch, d["unlabeled_split"])


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
                      device: torch.device, use_amp: bool, amp_dtype: torch.dtype,
                      world: int = 1) -> StepResult:
    """Forward under autocast, finite check, backward, clip, optimiser step (the EMA teacher
    follows in :class:`~medseg_dpl.engine.hooks.EMAHook`).

    Raises :class:`NonFiniteLoss` before touching any weight when the loss is not finite.
    """
    with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
        out = algo.train_step(batch, step)
    finite = torch.isfinite(out.loss.detach()).float()
    if world > 1:  # every rank must stop together
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if finite.item() < 1:
        raise NonFiniteLoss(str(out.loss.item()))
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(out.loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return out


# ----------------------------------------------------------------------------- the run
class Trainer:
    """One run of ``medseg-dpl train``: set up in the constructor, :meth:`run` is the loop.

    Run state the hooks read and write: ``start``, ``done`` (finished steps), ``best`` /
    ``best_step``, ``history`` (validations), ``crop_history``, ``last_dice``, ``result``.
    """

    def __init__(self, cfg: dict, out_dir, resume: bool = False):
        self.cfg, self.out_dir, t = cfg, Path(out_dir), cfg["train"]
        self.device = resolve_device(t["device"])
        self.rank, self.world = _dist_setup(self.device)
        if t["deterministic"]:
            torch.use_deterministic_algorithms(True)
        if self.rank == 0:
            (self.out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            with atomic_path(self.out_dir / "config.yaml") as tmp:
                save_config(cfg, tmp)
        self.barrier()
        self.log = _logger(self.out_dir, self.rank)
        self.writer = None
        if self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.out_dir / "tb"))
        self.data = build_sources(cfg, self.rank)
        self.classes, self.steps = self.data.classes, t["steps"]
        self.algo, self.teacher, self.optimizer, self.scaler, self.params = build_training(
            cfg, len(self.classes), self.data.prior, self.device, self.world)
        self.use_amp = self.device.type == "cuda" and t["amp"] != "none"
        self.amp_dtype = torch.float16 if t["amp"] == "fp16" else torch.bfloat16
        self.start, self.best, self.best_step = 0, -math.inf, -1
        self.history, self.crop_history, self.last_dice, self.result = [], [], None, {}
        self.truth, self.lr, self.done = None, 0.0, 0
        if resume:
            self.resume()
        logger = LoggingHook()
        self.hooks = [EMAHook(), logger, ValidationHook(logger), CheckpointHook(), ReportHook()]

    def run(self) -> dict:
        """Train ``train.steps`` steps (from the resumed step), then the final reports."""
        t, o = self.cfg["train"], self.cfg["optim"]
        batches = StepBatches(self.data.sources, t["seed"], self.rank, self.world, self.data.teacher_volumes,
                              self.data.patch)
        loader = step_loader(batches, self.start, self.steps, self.cfg["data"]["num_workers"])
        try:
            self.call("before_run")
            self.algo.train()
            for step, raw in zip(range(self.start, self.steps), loader):
                batch = {}
                for part in raw.values():
                    batch.update(_to_device(part, self.device))
                self.truth = batch.pop("truth", None)
                self.lr = poly_lr(o["lr"], step, self.steps, o["poly_power"], o["warmup_steps"])
                for g in self.optimizer.param_groups:
                    g["lr"] = self.lr
                seed_everything(step_seed(t["seed"], step, self.rank, 999))  # dropout etc.: a function of the step
                try:
                    out = optimisation_step(self.algo, batch, step, self.optimizer, self.scaler, self.params,
                                            o["grad_clip"], self.device, self.use_amp, self.amp_dtype, self.world)
                except NonFiniteLoss as exc:
                    msg = (f"non-finite loss ({exc}) at step {step}: stopping; the last good "
                           f"checkpoint ({self.out_dir / 'checkpoints' / 'last.pt'}) is kept")
                    self.log.error(msg)
                    raise TrainingError(msg) from None
                self.done = step + 1
                self.call("after_step", out)
                self.barrier()
            for hook in self.hooks:   # the bar ends before the final reports' lines
                hook.close()
            self.result = {"step": self.steps, "best_metric": float(self.best), "best_step": self.best_step,
                           "val_history": self.history}
            self.call("after_run")
        finally:
            self.close()
        self.barrier()
        return self.result

    # --- used by run() and the hooks -----------------------------------------------------
    def call(self, point: str, *args) -> None:
        for hook in self.hooks:
            getattr(hook, point)(self, *args)

    def barrier(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    def validate(self):
        """Per-organ Dice ``(C-1,)`` of the inference network on the eval volumes (rank 0)."""
        self.last_dice = validate(unwrap(self.algo.inference_network()), self.data.eval_dataset, self.cfg,
                                  len(self.classes), self.device)
        return self.last_dice

    def save(self, name: str) -> None:
        """``checkpoints/<name>.pt``: everything :meth:`resume` needs (see medseg_dpl.checkpoint)."""
        algo = self.algo
        state = {"step": self.done, "config": self.cfg, "model": unwrap(algo.inference_network()).state_dict(),
                 "teacher": self.teacher.module.state_dict() if self.teacher is not None else None,
                 "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                 "method": algo.method_state(), "rng": rng_state(), "dataset": self.data.dataset_record,
                 "best_metric": float(self.best), "best_step": self.best_step}
        for k, net in algo.trained_networks().items():
            state[k] = unwrap(net).state_dict()
        save_checkpoint(self.out_dir / "checkpoints" / f"{name}.pt", state, kind="segmentation")

    def resume(self) -> None:
        path = self.out_dir / "checkpoints" / "last.pt"
        if not path.is_file():
            raise TrainingError(f"--resume: {path} does not exist")
        ck = load_checkpoint(path, "segmentation", map_location=self.device)
        for name, net in self.algo.trained_networks().items():
            unwrap(net).load_state_dict(ck[name])
        if self.teacher is not None:
            self.teacher.module.load_state_dict(ck["teacher"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scaler.load_state_dict(ck["scaler"])
        self.algo.load_method_state(ck["method"])
        set_rng_state(ck["rng"])
        self.start, self.best, self.best_step = ck["step"], ck["best_metric"], ck.get("best_step", -1)
        self.done = self.start
        self.log.info(f"resumed from {path} at step {self.start}")

    def close(self) -> None:
        for hook in getattr(self, "hooks", []):
            hook.close()
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def train(cfg: dict, out_dir, resume: bool = False) -> dict:
    """Train as ``cfg`` says (a config merged with ``SEG_DEFAULTS``), writing ``out_dir``.

    Returns the final metrics: ``{"step", "best_metric", "best_step", "final_dice_mean",
    "final_dice": {organ: dice}, "pseudo_labels": path}``. Raises :class:`TrainingError`.
    """
    return Trainer(cfg, out_dir, resume).run()
