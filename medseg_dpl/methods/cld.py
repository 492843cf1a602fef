"""CLD (Lin et al., MICCAI 2022): calibrating the label distribution in cross pseudo-supervision.

Two networks on the same crops (labeled + unlabeled), as in DHC's ``code/train_cld.py``:

* fixed class weights w_c = (N_max/N_c)^p (p = ``cld.power``, 1/3), N the labeled voxel counts,
  on both networks' weighted CE + Dice (labeled crops) and weighted CE on the other's argmax;
* each network keeps a confidence bank conf_c ``(C,)``: its mean softmax probability of class c
  on the labeled voxels of class c, averaged over ``cld.conf_every`` steps, then an EMA
  (``cld.conf_momentum``); a pseudo-label voxel of class c is kept with probability
  s_c = ((1 − conf_c) / max_k (1 − conf_k))^γ (γ = ``cld.gamma``): well-learned (usually large)
  classes are subsampled, poorly learned ones kept.

Differences from the published code (see the README): the keep rate is looked up by the
pseudo-label's class (``cld.mask_by: pseudo_label``, the method's description; ``prediction``
is the code: the trained network's own argmax); a class absent from the labeled voxels of a
``conf_every`` window keeps its confidence (the code averages it as 0); before the first window
the banks are 0, i.e. everything is kept (the code starts from random confidences).
``cld.code_bank: true`` restores both behaviours of the code.
Inference uses the EMA of A, the rule of every method (the published evaluation averages A's
and B's raw logits).
"""
from __future__ import annotations

import torch

from medseg_dpl.methods.base import CoTraining, StepResult, class_share
from medseg_dpl.methods.options import CLDOptions, parse
from medseg_dpl.methods.losses import EPS, sum_over_ranks, weighted_ce


def cld_weights(counts: torch.Tensor, power: float) -> torch.Tensor:
    """``(C,)`` voxel counts (or frequencies) -> (N_max/N_c)^power, ``(C,)``."""
    counts = counts.double().clamp_min(EPS)
    return (counts.max() / counts).pow(power).float()


def keep_rates(conf: torch.Tensor, gamma: float) -> torch.Tensor:
    """``(C,)`` confidences -> keep probabilities ((1 − conf)/max(1 − conf))^γ, ``(C,)``."""
    s = 1 - conf
    return (s / (s.max() + 1e-12)).clamp_min(0).pow(gamma)


class CLD(CoTraining):
    name = "cld"

    def __init__(self, student, cfg, num_classes, prior=None, student2=None):
        super().__init__(student, cfg, num_classes, prior, student2)
        self.opts = parse(CLDOptions, cfg, "cld")
        C = num_classes
        self.register_buffer("class_weight", cld_weights(self.prior, self.opts.power))
        # per network (rows A, B): the confidence bank, whether it has a value, and the window's sums
        self.register_buffer("conf", torch.zeros(2, C))
        self.register_buffer("conf_seen", torch.zeros(2, C))
        self.register_buffer("window", torch.zeros(2, 2, C))          # [net, (sum, count), C]
        self.register_buffer("window_steps", torch.zeros((), dtype=torch.long))
        if self.opts.code_bank:  # the published start: random, B's a copy of A's
            self.conf.copy_(torch.rand(C).expand(2, C))

    @torch.no_grad()
    def record_confidence(self, logits_l: list, target: torch.Tensor) -> None:
        """Add A's and B's ``(B, C, *)`` labeled softmax to the window; every ``conf_every``
        steps fold the window's per-class means into the banks."""
        onehot = torch.nn.functional.one_hot(target, self.num_classes).movedim(-1, 1).float()
        dims = (0, *range(2, onehot.ndim))
        for i, z in enumerate(logits_l):
            self.window[i, 0] += (torch.softmax(z.float(), 1) * onehot).sum(dims)
            self.window[i, 1] += onehot.sum(dims)
        self.window_steps += 1
        c = self.opts
        if int(self.window_steps) % c.conf_every:
            return
        window = sum_over_ranks(self.window.clone())
        present = window[:, 1] > 0
        if c.code_bank:  # the code: a class absent from the window counts as confidence 0
            present = torch.ones_like(present)
        new = window[:, 0] / window[:, 1].clamp_min(1e-12)
        m = c.conf_momentum
        upd = torch.where(self.conf_seen > 0, m * self.conf + (1 - m) * new, new)
        self.conf.copy_(torch.where(present, upd, self.conf))
        self.conf_seen.copy_(torch.maximum(self.conf_seen, present.float()))
        self.window.zero_()

    def train_step(self, batch, step):
        x_l, y_l = batch["image"], batch["label"][:, 0].long()
        n, c = x_l.shape[0], self.opts
        x = torch.cat([x_l, batch["image_weak"]], dim=0)
        out_a, out_b = self.student(x), self.student2(x)
        self.record_confidence([out_a[:n].detach(), out_b[:n].detach()], y_l)
        w = self.class_weight
        sup = (self.weighted_supervised_loss(out_a[:n], y_l, w, c.sup_loss)
               + self.weighted_supervised_loss(out_b[:n], y_l, w, c.sup_loss))
        with torch.no_grad():
            lab_a, lab_b = out_a.max(1).indices, out_b.max(1).indices  # = argmax, faster on CPU
            rate_a, rate_b = keep_rates(self.conf[0], c.gamma), keep_rates(self.conf[1], c.gamma)
            # A learns from B's labels: keep each voxel with A's rate for its class
            by_a, by_b = (lab_b, lab_a) if c.mask_by == "pseudo_label" else (lab_a, lab_b)
            keep_a = torch.rand(lab_a.shape, device=lab_a.device) < rate_a[by_a]
            keep_b = torch.rand(lab_b.shape, device=lab_b.device) < rate_b[by_b]
        cps = (weighted_ce(out_a, lab_b, w, keep_a, normalize="voxels")
               + weighted_ce(out_b, lab_a, w, keep_b, normalize="voxels"))
        weight = self.unsup_weight(step)
        keep_u = torch.cat([keep_a[n:], keep_b[n:]])
        return StepResult(
            sup + weight * cps,
            {"loss/sup": sup.detach(), "loss/unsup": cps.detach(), "unsup_weight": weight,
             "mask_ratio": keep_u.float().mean()},
            {"pl_share": class_share(torch.cat([lab_b[n:], lab_a[n:]]), keep_u, self.num_classes),
             "keep_rate_a": rate_a, "keep_rate_b": rate_b, "confidence_a": self.conf[0].clone(),
             # each network's argmax shares on the unlabeled crops: the collapse diagnostic
             "argmax_share_a": class_share(lab_a[n:], None, self.num_classes),
             "argmax_share_b": class_share(lab_b[n:], None, self.num_classes)})
