"""DebiasPL (Wang et al., CVPR 2022) on voxels: FixMatch with two changes, nothing else.

1. Counterfactual pseudo-labels from softmax(z_w − τ·log(q̂/π)) (:meth:`teacher_probs`);
2. adaptive-margin unsupervised loss on z_s + τ·log(q̂/π) (:meth:`unsup_logits`);
q̂ ``(C,)`` is a response EMA of the teacher's weak-view softmax over all unlabeled voxels
(``debias.masked``: over confident voxels only), updated after pseudo-labeling and before the
margin loss as in the paper's code, all-reduced under DDP.

Reference π (``debias.reference``): ``uniform`` is the paper (bias log q̂);
``labeled_prior`` uses log(q̂/π) with π the labeled voxels' class frequencies, removing only the
pseudo-labels' excess bias over the labeled data. ``debias.include_background: false`` sets the
background's bias term to 0 so only the organs are debiased.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from medseg_dpl.core.debias import ResponseEMA, debiased_probs, margin_adjusted_logits, pseudo_labels
from medseg_dpl.methods.fixmatch import FixMatch


def reference_prior(cfg: dict, prior: torch.Tensor, qhat: torch.Tensor) -> torch.Tensor:
    """The π handed to the core functions, ``(C,)``.

    ``uniform`` -> ones (log 1 = 0, i.e. plain log q̂; a constant does not change softmax or CE);
    ``include_background: false`` -> π[0] = q̂[0] so background's bias log(q̂₀/π₀) is 0.
    """
    d = cfg["debias"]
    if d["reference"] == "labeled_prior":
        ref = prior.float().clone()
    elif d["reference"] == "uniform":
        ref = torch.ones_like(prior, dtype=torch.float32)
    else:
        raise ValueError(f"debias.reference: expected labeled_prior or uniform, got {d['reference']!r}")
    if not d["include_background"]:
        ref[0] = qhat[0].float().clamp_min(1e-8)
    return ref


def response_probs(logits: torch.Tensor, cfg: dict) -> torch.Tensor:
    """What q̂ averages, ``(N, C, *)`` from logits ``(N, C, *)`` (``debias.response``).

    ``soft``: the softmax (the paper). ``hard``: the one-hot argmax, so q̂ follows the class
    frequencies of the hard labels. Why offer it: in CT the background's diffuse probability
    leaking into a rare organ (0.05 % per voxel over 90 % of the voxels) can outweigh that
    organ's true share, so the soft mean over-states rare organs that the hard pseudo-labels
    under-represent, and debiasing by it pushes them further down.
    """
    probs = torch.softmax(logits.detach().float(), dim=1)
    kind = cfg["debias"]["response"]
    if kind == "soft":
        return probs
    if kind == "hard":
        return F.one_hot(probs.argmax(dim=1), probs.shape[1]).movedim(-1, 1).to(probs.dtype)
    raise ValueError(f"debias.response: expected soft or hard, got {kind!r}")


class DebiasPL(FixMatch):
    name = "debiaspl"

    def __init__(self, student, cfg, num_classes, prior=None):
        super().__init__(student, cfg, num_classes, prior)
        reference_prior(cfg, self.prior, self.prior)  # validate debias.reference early
        response_probs(torch.zeros(1, num_classes), cfg)  # and debias.response
        self.response = ResponseEMA(num_classes, momentum=cfg["debias"]["momentum"])

    @property
    def qhat(self) -> torch.Tensor:
        return self.response.qhat

    def _ref(self) -> torch.Tensor:
        return reference_prior(self.cfg, self.prior, self.qhat)

    def teacher_probs(self, logits_w):
        probs = debiased_probs(logits_w, self.qhat, self.cfg["debias"]["tau"], self._ref())
        if self.training:
            mask = None
            if self.cfg["debias"]["masked"]:
                mask = pseudo_labels(probs, self.cfg["method"]["threshold"])[1]
            self.response.update(response_probs(logits_w, self.cfg), mask)
        return probs, {"qhat": self.qhat.detach().clone()}

    def unsup_logits(self, logits_s):
        return margin_adjusted_logits(logits_s, self.qhat, self.cfg["debias"]["tau"], self._ref())
