"""DHC (Wang & Li, MICCAI 2023): dual-debiased heterogeneous co-training.

Cross pseudo-supervision of two networks that see the same crops (labeled + unlabeled), each
with its own class weights ``(C,)`` on its weighted CE + Dice (labeled crops) and its weighted
CE on the other network's argmax (the unsupervised term):

* B, **DistDW** (data bias): w_c = C·log(N_max/N_c) / max_k log(N_max/N_k), N the labeled voxel
  counts at the start, then an EMA (``dhc.dist_momentum``) towards the same formula on the
  counts of B's argmax over the step's unlabeled crops. The majority class (background) gets
  log 1 = 0, as published; ``dhc.background_min`` floors it.
* A, **DiffDW** (learning bias): per-class hard Dice of A on the labeled crops; with
  Δ = Dice_t − Dice_{t−1} and r = log(Dice_t/Dice_{t−1}), EMAs (momentum (K−1)/K,
  K = ``dhc.diff_window``) of learn = max(Δ,0)·r and unlearn = min(Δ,0)·r and of 1 − Dice;
  w_c = (unlearn_c/learn_c)^p · EMA(1 − Dice_c) (p = ``dhc.diff_power``), rescaled to max w = C.

Differences from ``code/train_dhc.py`` of xmed-lab/DHC (see the README):
``dhc.skip_absent`` (default true): a class in neither the labeled crops nor A's prediction has
no Dice, so its DiffDW state is left as it is (the code's 1e-8 smoothing scores it 0.5, a
spurious jump); ``dhc.threshold`` > 0 keeps only confident cross pseudo-labels (the code, like
CPS, keeps all); the CPS term covers labeled and unlabeled crops, as in the code and in CPS.
Inference uses the EMA of A, the rule of every method (the published evaluation averages A's
and B's raw logits).
"""
from __future__ import annotations

import torch

from medseg_dpl.methods.base import CoTraining, StepResult, class_share
from medseg_dpl.methods.options import DHCOptions, parse
from medseg_dpl.methods.losses import (EPS, dice_from_stats, dice_stats, one_hot, sum_over_ranks,
                                       weighted_ce)


def distdw_weights(counts: torch.Tensor) -> torch.Tensor:
    """``(C,)`` voxel counts (or frequencies) -> C·log(N_max/N_c)/max_k log(N_max/N_k), ``(C,)``."""
    counts = counts.double()
    r = torch.log((counts.max() + EPS) / (counts + EPS))
    return (counts.numel() * r / r.max().clamp_min(EPS)).float()


class DHC(CoTraining):
    name = "dhc"

    def __init__(self, student, cfg, num_classes, prior=None, student2=None):
        super().__init__(student, cfg, num_classes, prior, student2)
        self.opts = parse(DHCOptions, cfg, "dhc")
        C = num_classes
        self.register_buffer("weight_b", distdw_weights(self.prior))     # DistDW, from π
        self.register_buffer("weight_a", torch.full((C,), float(C)))     # DiffDW
        self.register_buffer("last_dice", torch.full((C,), EPS))         # Dice_{t-1}
        self.register_buffer("learn", torch.zeros(C))
        self.register_buffer("unlearn", torch.zeros(C))
        self.register_buffer("undice", torch.ones(C))                    # EMA(1 - Dice)

    @torch.no_grad()
    def update_distdw(self, logits_u: torch.Tensor) -> torch.Tensor:
        """EMA of the DistDW weights towards B's argmax counts on ``(U, C, *)`` logits."""
        counts = torch.bincount(logits_u.max(1).indices.reshape(-1), minlength=self.num_classes).float()
        sum_over_ranks(counts)
        m = self.opts.dist_momentum
        self.weight_b.mul_(m).add_((1 - m) * distdw_weights(counts).to(self.weight_b))
        w = self.weight_b.clone()
        w[0] = w[0].clamp_min(self.opts.background_min)
        return w

    @torch.no_grad()
    def update_diffdw(self, logits_l: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """DiffDW weights from A's hard Dice on the labeled ``(B, C, *)`` logits, ``(B, *)`` labels."""
        C = self.num_classes
        stats = sum_over_ranks(dice_stats(one_hot(logits_l.argmax(1), C), one_hot(target, C)))
        dice = dice_from_stats(stats, smooth=EPS)
        k = self.opts.diff_window
        m = (k - 1) / k
        seen = torch.ones_like(dice, dtype=torch.bool)
        if self.opts.skip_absent:
            seen = stats[0] + stats[1] + stats[2] > 0       # in the labels or in the prediction
        delta = dice - self.last_dice
        r = torch.log(dice / self.last_dice)
        learn = torch.where(delta > 0, delta, torch.zeros_like(delta)) * r
        unlearn = torch.where(delta <= 0, delta, torch.zeros_like(delta)) * r
        for buf, new in ((self.learn, learn), (self.unlearn, unlearn), (self.undice, 1 - dice)):
            buf.copy_(torch.where(seen, m * buf + (1 - m) * new, buf))
        self.last_dice.copy_(torch.where(seen, dice, self.last_dice))
        w = ((self.unlearn + EPS) / (self.learn + EPS)).pow(self.opts.diff_power) * self.undice
        self.weight_a.copy_(C * w / w.max().clamp_min(EPS))
        return self.weight_a.clone()

    def train_step(self, batch, step):
        x_l, y_l = batch["image"], batch["label"][:, 0].long()
        n = x_l.shape[0]
        x = torch.cat([x_l, batch["image_weak"]], dim=0)
        out_a, out_b = self.student(x), self.student2(x)
        w_a = self.update_diffdw(out_a[:n].detach(), y_l)
        w_b = self.update_distdw(out_b[n:].detach())
        form = self.opts.sup_loss
        sup = (self.weighted_supervised_loss(out_a[:n], y_l, w_a, form)
               + self.weighted_supervised_loss(out_b[:n], y_l, w_b, form))
        with torch.no_grad():
            conf_a, lab_a = torch.softmax(out_a.float(), 1).max(1)
            conf_b, lab_b = torch.softmax(out_b.float(), 1).max(1)
            thr = self.opts.threshold
            mask_a, mask_b = conf_a >= thr, conf_b >= thr
        # each network learns from the other's argmax, weighted by its own class weights
        cps = weighted_ce(out_a, lab_b, w_a, mask_b) + weighted_ce(out_b, lab_a, w_b, mask_a)
        weight = self.unsup_weight(step)
        lab_u, mask_u = torch.cat([lab_a[n:], lab_b[n:]]), torch.cat([mask_a[n:], mask_b[n:]])
        return StepResult(
            sup + weight * cps,
            {"loss/sup": sup.detach(), "loss/unsup": cps.detach(), "unsup_weight": weight,
             "mask_ratio": mask_u.float().mean()},
            {"pl_share": class_share(lab_u, mask_u, self.num_classes), "weight_a": w_a, "weight_b": w_b,
             # each network's argmax shares on the unlabeled crops: the collapse diagnostic
             "argmax_share_a": class_share(lab_a[n:], None, self.num_classes),
             "argmax_share_b": class_share(lab_b[n:], None, self.num_classes)})
