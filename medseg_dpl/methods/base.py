"""The interface every training method implements (USB/semilearn-style, one class per method).

An :class:`Algorithm` holds the network(s) it trains and its own buffers (q̂, π). The trainer
owns everything else: data, devices, optimiser, AMP, the EMA teacher's update, logging, I/O.

Batches (tensors already on the device):
  labeled:   ``image`` ``(B, 1, *patch)`` float, ``label`` ``(B, 1, *patch)`` class indices;
  unlabeled: ``image_weak``, ``image_strong`` ``(U, 1, *patch)`` (same voxels, two views),
             and in teacher mode ``teacher_probs`` ``(U, C, *patch)`` from an external model.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn

from medseg_dpl.methods.losses import supervised_loss, weighted_dice_ce
from medseg_dpl.methods.options import LossOptions, parse


@dataclass
class StepResult:
    """What one :meth:`Algorithm.train_step` hands the trainer.

    ``loss``: the scalar to back-propagate. ``scalars``: floats or 0-d tensors (logged as the
    mean over the log window). ``per_class``: ``(C,)`` vectors (a curve per class, the mean
    over the window). ``pseudo_labels`` long / ``mask`` bool ``(U, *patch)``: this step's
    confident pseudo-labels of the unlabeled crops, for the crop-level diagnostics.
    """
    loss: torch.Tensor
    scalars: dict[str, Union[float, torch.Tensor]] = field(default_factory=dict)
    per_class: dict[str, torch.Tensor] = field(default_factory=dict)
    pseudo_labels: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None

    @property
    def logs(self) -> dict[str, Union[float, torch.Tensor]]:
        """Scalars and per-class vectors in one dict (by name)."""
        return {**self.scalars, **self.per_class}


def sigmoid_rampup(step: int, length: int) -> float:
    """exp(-5 (1 - t)^2), t = step/length clipped to [0, 1] (Laine & Aila; DHC's ramp-up)."""
    if length <= 0:
        return 1.0
    t = min(max(step / length, 0.0), 1.0)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def class_share(labels: torch.Tensor, mask: Optional[torch.Tensor], num_classes: int) -> torch.Tensor:
    """Share of each class among the (masked) hard labels, ``(C,)`` float (zeros if none kept)."""
    kept = labels[mask] if mask is not None else labels.reshape(-1)
    counts = torch.bincount(kept.reshape(-1), minlength=num_classes).float()
    return counts / counts.sum().clamp_min(1.0)


def static_class_weight(kind: str, prior: torch.Tensor, cfg: dict) -> Optional[torch.Tensor]:
    """``loss.class_weight``: None (``none``), CLD's (N_max/N_c)^``cld.power`` (``cld``) or DHC's
    DistDW C·log(N_max/N_c)/max log (``distdw``, background floored at ``dhc.background_min``)
    from the labeled prior π ``(C,)`` -> ``(C,)``."""
    if kind == "none":
        return None
    if kind == "cld":
        from medseg_dpl.methods.cld import cld_weights
        return cld_weights(prior, cfg["cld"]["power"])
    if kind == "distdw":
        from medseg_dpl.methods.dhc import distdw_weights
        w = distdw_weights(prior)
        w[0] = w[0].clamp_min(cfg["dhc"]["background_min"])
        return w
    raise ValueError(f"loss.class_weight: expected none, cld or distdw, got {kind!r}")


class Algorithm(nn.Module):
    """Base class: the shared supervised loss, unsupervised-weight ramp-up, method state.

    Subclasses set ``uses_unlabeled`` / ``uses_teacher`` and implement :meth:`train_step`.
    ``prior`` is π ``(C,)``: class frequencies of the labeled voxels.
    """

    name = "base"
    uses_unlabeled = False   # the trainer feeds unlabeled batches
    uses_teacher = False     # the trainer builds and updates an EMA teacher of ``student``
    num_networks = 1         # 2: the trainer builds a second, differently seeded ``student2``

    def __init__(self, student: nn.Module, cfg: dict, num_classes: int,
                 prior: Optional[torch.Tensor] = None):
        super().__init__()
        self.student = student
        self.teacher: Optional[nn.Module] = None
        self.cfg = cfg
        self.num_classes = num_classes
        if prior is None:
            prior = torch.full((num_classes,), 1.0 / num_classes)
        self.register_buffer("prior", prior.float().clone())
        # the one supervised loss of every method (``loss.name``), so methods differ by their idea only
        self.loss_opts = parse(LossOptions, cfg, "loss")
        # the peers' class weights alone, for single-network methods (the controls that tell a
        # peer's weights from its co-training); derived from π, so not part of the method state
        self.sup_class_weight = static_class_weight(self.loss_opts.class_weight, self.prior, cfg)
        # λ_u and its ramp-up: the method's own section where it has them (its published values)
        m, own = cfg["method"], cfg.get(self.name) or {}
        self.lambda_u = own.get("lambda_u", m["lambda_u"])
        self.rampup_steps = round(own.get("rampup", m["rampup"]) * cfg["train"]["steps"])
        self.threshold = m["threshold"]

    # --- used by the trainer -------------------------------------------------------------
    def attach_teacher(self, teacher: nn.Module) -> None:
        """The EMA teacher (a ``ModelEMA``) built and updated by the trainer."""
        self.teacher = teacher

    def trained_networks(self) -> dict[str, nn.Module]:
        """Networks whose parameters the optimiser updates, by checkpoint key."""
        return {"student": self.student}

    def inference_network(self) -> nn.Module:
        """The network used for validation, prediction and ``checkpoint["model"]``."""
        return self.teacher.module if self.teacher is not None else self.student

    def method_state(self) -> dict[str, torch.Tensor]:
        """The method's own buffers (q̂, π), without the networks' weights."""
        nets = tuple(f"{k}." for k in ("student", "student2", "teacher"))
        return {k: v for k, v in self.state_dict().items() if not k.startswith(nets)}

    def load_method_state(self, state: dict) -> None:
        own = self.state_dict()
        for k, v in state.items():
            own[k].copy_(v)

    @torch.no_grad()
    def pseudo_label_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities the method would turn into pseudo-labels, ``(N, C, *)`` float32."""
        return torch.softmax(logits.float(), dim=1)

    def thresholds(self) -> Union[float, torch.Tensor]:
        """The confidence threshold of the pseudo-labels: a float or per-class ``(C,)``."""
        return self.threshold

    def state_report(self) -> dict[str, list[float]]:
        """The method's state for ``pseudo_labels.json`` (e.g. q̂ and the bias), plain lists."""
        return {}

    # --- helpers for subclasses ----------------------------------------------------------
    def supervised_loss(self, logits: torch.Tensor, label: torch.Tensor,
                        weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The shared Dice + CE (``loss.name``); ``logits`` ``(B, C, *)``, ``label`` ``(B, 1, *)``,
        optional class weights ``(C,)`` (a method's own re-weighting on top of the shared loss).
        ``loss.logit_adjust`` τ_l: the CE sees z + τ_l·log π (π the labeled crop prior): the
        adaptive margin of DebiasPL with the known label distribution (Menon et al.'s logit
        adjustment), so rare organs need a larger margin on labeled voxels."""
        if weight is None and self.sup_class_weight is not None:
            weight = self.sup_class_weight
        return supervised_loss(logits, label[:, 0].long(), self.loss_opts.name, weight, self.ce_offset())

    def ce_offset(self) -> Optional[torch.Tensor]:
        """τ_l·log π ``(C,)`` for the supervised CE (``loss.logit_adjust``), None when τ_l = 0."""
        tau_l = self.loss_opts.logit_adjust
        return tau_l * torch.log(self.prior.clamp_min(1e-8)) if tau_l else None

    def unsup_weight(self, step: int) -> float:
        """λ_u · sigmoid ramp-up over ``rampup`` × train.steps (so it scales with the schedule);
        a method whose section has its own ``lambda_u`` / ``rampup`` (its published values,
        e.g. DHC's 0.1 over the whole run) uses those."""
        return self.lambda_u * sigmoid_rampup(step, self.rampup_steps)

    def train_step(self, batch: dict, step: int) -> StepResult:
        """One step: the loss to back-propagate and what to log (:class:`StepResult`)."""
        raise NotImplementedError


class CoTraining(Algorithm):
    """Two networks A (``student``) and B (``student2``) trained together (CPS and its kin).

    The trainer builds B with its own seed (``num_networks = 2``) and passes it as ``student2``;
    the deepcopy is only a fallback. The evaluation rule is every method's: the EMA of the
    network it evaluates, here the EMA of A (kept by the trainer, never used in training), for
    validation, prediction and ``checkpoint["model"]``; B is saved as ``checkpoint["student2"]``.
    """

    uses_unlabeled = True
    uses_teacher = True      # the EMA of A: the same evaluation rule as the single-network methods
    num_networks = 2

    def __init__(self, student: nn.Module, cfg: dict, num_classes: int,
                 prior: Optional[torch.Tensor] = None, student2: Optional[nn.Module] = None):
        super().__init__(student, cfg, num_classes, prior)
        self.student2 = student2 if student2 is not None else copy.deepcopy(student)

    def trained_networks(self) -> dict[str, nn.Module]:
        return {"student": self.student, "student2": self.student2}

    def weighted_supervised_loss(self, logits: torch.Tensor, target: torch.Tensor,
                                 weight: torch.Tensor, form: str) -> torch.Tensor:
        """A method's class weights ``(C,)`` on the labeled ``(B, C, *)`` logits, ``(B, *)`` labels:
        ``shared`` on the shared loss (``loss.name``, so only the weights differ from the other
        methods), ``published`` on DHC's repository form (weighted CE + weighted batch Dice)."""
        if form == "shared":
            return supervised_loss(logits, target, self.loss_opts.name, weight, self.ce_offset())
        if form == "published":
            return weighted_dice_ce(logits, target, weight)
        raise ValueError(f"{self.name}.sup_loss: expected shared or published, got {form!r}")
