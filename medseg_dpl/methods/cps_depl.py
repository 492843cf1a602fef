"""CPS-DePL: two networks co-trained with debiased cross pseudo-supervision (DHC's "DePL").

Networks A and B see the same crops (labeled + weak unlabeled, as in DHC's code). Each keeps
its own q̂ (response EMA of its softmax over unlabeled voxels; the bias follows
``debias.variant`` as in DebiasPL, q̂ starting at the reference). A's counterfactual
pseudo-labels softmax(z_A − τ·log(q̂_A/π)) supervise B's margin-adjusted logits
z_B + τ·log(q̂_A/π) and vice versa; plus Dice + CE on the labeled crops for both.
Note: DHC's ``train_depl.py`` computes the margin-adjusted logits but then applies the CPS loss
to the raw outputs of the whole batch; here the margins are applied, on unlabeled voxels only
(the method as described). Inference uses the EMA of network A (``checkpoint["model"]``).
"""
from __future__ import annotations

import torch

from medseg_dpl.core.debias import (DebiasOptions, ResponseEMA, debiased_probs, initial_qhat,
                                    margin_adjusted_logits, masked_cross_entropy, pseudo_labels,
                                    reference_prior, update_response)
from medseg_dpl.methods.base import CoTraining, StepResult, class_share
from medseg_dpl.methods.checks import check_ignored_keys


class CPSDePL(CoTraining):
    name = "cps_depl"

    def __init__(self, student, cfg, num_classes, prior=None, student2=None):
        # B differs from A by its initialisation (DHC: kaiming vs xavier): a separately seeded network
        super().__init__(student, cfg, num_classes, prior, student2)
        self.debias = DebiasOptions.from_section(cfg["debias"])
        check_ignored_keys(cfg, ("debias",))
        self.bias_kwargs = self.debias.bias_kwargs()
        m = self.debias.momentum
        self.response_a = ResponseEMA(num_classes, momentum=m, init=initial_qhat(self.debias, self.prior))
        self.response_b = ResponseEMA(num_classes, momentum=m, init=initial_qhat(self.debias, self.prior))

    @torch.no_grad()
    def pseudo_label_probs(self, logits):
        qhat = self.response_a.qhat
        return debiased_probs(logits.float(), qhat, self.debias.tau,
                              reference_prior(self.debias, self.prior, qhat), **self.bias_kwargs)

    def state_report(self) -> dict[str, list[float]]:
        return {"qhat": [float(v) for v in self.response_a.qhat]}

    def train_step(self, batch, step):
        x_l, y_l = batch["image"], batch["label"]
        tau, thr, kw = self.debias.tau, self.threshold, self.bias_kwargs
        x = torch.cat([x_l, batch["image_weak"]], dim=0)
        n = x_l.shape[0]
        out_a, out_b = self.student(x), self.student2(x)
        sup = self.supervised_loss(out_a[:n], y_l) + self.supervised_loss(out_b[:n], y_l)
        u_a, u_b = out_a[n:], out_b[n:]
        ref_a = reference_prior(self.debias, self.prior, self.response_a.qhat)
        ref_b = reference_prior(self.debias, self.prior, self.response_b.qhat)
        with torch.no_grad():
            lab_a, mask_a = pseudo_labels(debiased_probs(u_a.detach(), self.response_a.qhat, tau, ref_a, **kw), thr)
            lab_b, mask_b = pseudo_labels(debiased_probs(u_b.detach(), self.response_b.qhat, tau, ref_b, **kw), thr)
            masked = self.debias.masked
            update_response(self.response_a, u_a, self.debias, mask_a if masked else None)
            update_response(self.response_b, u_b, self.debias, mask_b if masked else None)
        ref_a = reference_prior(self.debias, self.prior, self.response_a.qhat)
        ref_b = reference_prior(self.debias, self.prior, self.response_b.qhat)
        cps = (masked_cross_entropy(margin_adjusted_logits(u_b, self.response_a.qhat, tau, ref_a, **kw), lab_a, mask_a)
               + masked_cross_entropy(margin_adjusted_logits(u_a, self.response_b.qhat, tau, ref_b, **kw), lab_b, mask_b))
        weight = self.unsup_weight(step)
        mask = torch.cat([mask_a, mask_b])
        return StepResult(sup + weight * cps,
                          {"loss/sup": sup.detach(), "loss/unsup": cps.detach(), "unsup_weight": weight,
                           "mask_ratio": mask.float().mean()},
                          {"pl_share": class_share(torch.cat([lab_a, lab_b]), mask, self.num_classes),
                           "qhat": self.response_a.qhat.detach().clone()})
