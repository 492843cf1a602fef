"""GA (Qi et al., ECCV 2024, cicailalala/GALoss): the GA loss inside CPS co-training.

Networks A and B see the same crops (labeled + weak unlabeled) as in the code's
``train_AMOS_CPS.py``:

* labeled crops: GACE(k = ``ga.k``, γ = ``ga.gamma``) + GADice on each network
  (:func:`~medseg_dpl.methods.losses.ga_loss`);
* cross pseudo-supervision over the whole batch (labeled + unlabeled): A learns from B's argmax
  and B from A's with GACE at k = ``ga.cps_k`` (100: every voxel, class-normalised), no threshold;
* loss = sup + λ(t)·cps, λ(t) = ``ga.lambda_u`` (0.1, as published) times a sigmoid ramp-up
  over ``ga.rampup`` (1.0: the whole run, as published) × ``train.steps``, per step (the code
  ramps per epoch).

Differences from the code, each an option (the published setting in brackets):

* ``ga.ties`` ``index``: tied losses at the top-k cut taken by voxel index [``topk``];
* ``ga.threshold`` > 0 keeps only confident cross pseudo-labels [0];
* ``ga.cps_dice`` adds GADice on the cross pseudo-labels [false];
* ``ga.sup_loss`` ``shared`` trains the labeled crops with ``loss.name`` (an ablation) [``ga``].

As for every method here (no option): the networks differ by their seed (the code: kaiming vs
xavier init), share one optimiser and the recipe's schedule, and inference uses the EMA of A
(the code averages A's and B's outputs). The loss is stateless: ``method_state()`` is ``prior``.
"""
from __future__ import annotations

from typing import Optional

import torch

from medseg_dpl.methods.base import CoTraining, StepResult, class_share
from medseg_dpl.methods.losses import ga_ce_parts, ga_dice_terms
from medseg_dpl.methods.options import GAOptions, parse


def check_ga_options(cfg: dict) -> GAOptions:
    """``ga.*`` parsed; bad values, and a key the chosen setting ignores, are errors naming the key."""
    from medseg_dpl.config import ConfigError
    from medseg_dpl.engine.defaults import SEG_DEFAULTS

    opts, g = parse(GAOptions, cfg, "ga"), cfg["ga"]
    for key in ("k", "cps_k"):
        if not 0 < g[key] <= 100:
            raise ConfigError(f"ga.{key}: a percentage in (0, 100], got {g[key]!r}")
    if not 0 <= g["gamma"] <= 1:
        raise ConfigError(f"ga.gamma: expected a value in [0, 1], got {g['gamma']!r}")
    if g["sup_loss"] == "shared" and g["k"] != SEG_DEFAULTS["ga"]["k"]:
        raise ConfigError(f"ga.k={g['k']!r} has no effect with ga.sup_loss=shared (labeled crops "
                          "use loss.name); remove it or change ga.sup_loss")
    return opts


class GA(CoTraining):
    name = "ga"

    def __init__(self, student, cfg, num_classes, prior=None, student2=None):
        super().__init__(student, cfg, num_classes, prior, student2)
        self.opts = check_ga_options(cfg)

    def labeled_loss(self, logits: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """``(B, C, *)`` logits, ``(B, 1, *)`` labels -> the supervised term and its per-class
        ``(C,)`` GA terms (empty with ``ga.sup_loss=shared``)."""
        g = self.opts
        if g.sup_loss == "shared":
            return self.supervised_loss(logits, label), {}
        y = label[:, 0].long()
        ce, n = ga_ce_parts(logits, y, k=g.k, gamma=g.gamma, ties=g.ties)
        dice = ga_dice_terms(logits, y)
        return ce.sum() + dice.mean(), {"ga_ce": ce.detach(), "ga_dice": dice.detach(),
                                        "topk_share": n / n.sum().clamp_min(1)}

    def cross_loss(self, logits: torch.Tensor, labels: torch.Tensor,
                   mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """GACE(``ga.cps_k``) (+ GADice with ``ga.cps_dice``) on the other network's argmax
        ``(N, *)``; returns the loss and its per-class GACE terms ``(C,)``."""
        g = self.opts
        ce, _ = ga_ce_parts(logits, labels, mask, k=g.cps_k, gamma=g.gamma, ties=g.ties)
        loss = ce.sum()
        if g.cps_dice:
            loss = loss + ga_dice_terms(logits, labels, mask).mean()
        return loss, ce.detach()

    def train_step(self, batch, step):
        x_l, y_l = batch["image"], batch["label"]
        n = x_l.shape[0]
        x = torch.cat([x_l, batch["image_weak"]], dim=0)
        out_a, out_b = self.student(x), self.student2(x)
        sup_a, terms = self.labeled_loss(out_a[:n], y_l)
        sup_b, _ = self.labeled_loss(out_b[:n], y_l)
        with torch.no_grad():
            conf_a, lab_a = torch.softmax(out_a.float(), 1).max(1)
            conf_b, lab_b = torch.softmax(out_b.float(), 1).max(1)
            thr = self.opts.threshold
            mask_a, mask_b = conf_a >= thr, conf_b >= thr
        masked = thr > 0      # threshold 0 keeps every voxel (as published): skip the masking
        cps_a, cps_terms = self.cross_loss(out_a, lab_b, mask_b if masked else None)
        cps_b, _ = self.cross_loss(out_b, lab_a, mask_a if masked else None)
        sup, cps = sup_a + sup_b, cps_a + cps_b
        weight = self.unsup_weight(step)     # ga.lambda_u, ga.rampup
        lab_u, mask_u = torch.cat([lab_a[n:], lab_b[n:]]), torch.cat([mask_a[n:], mask_b[n:]])
        return StepResult(
            sup + weight * cps,
            {"loss/sup": sup.detach(), "loss/unsup": cps.detach(), "unsup_weight": weight,
             "mask_ratio": mask_u.float().mean()},
            {"pl_share": class_share(lab_u, mask_u, self.num_classes), "cps_ce": cps_terms, **terms,
             "argmax_share_a": class_share(lab_a[n:], None, self.num_classes),
             "argmax_share_b": class_share(lab_b[n:], None, self.num_classes)},
            lab_a[n:], mask_a[n:])   # A's, for the trainer's crop diagnostics
