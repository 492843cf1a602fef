"""The unlabeled losses of FixMatch and DebiasPL, built only from the shared core.

Both take the student's logits on strongly augmented unlabeled images ``(N, C)`` and the
teacher's logits on the weakly augmented views of the same images ``(N, C)`` (the EMA teacher,
or an external teacher's stored logits in teacher mode).

- FixMatch (EMAN): pseudo-label = argmax softmax(teacher), kept where its confidence >= threshold;
  loss = masked cross-entropy of the student.
- DebiasPL: q̂ <- EMA of softmax(teacher); pseudo-labels from the counterfactual
  ``debiased_probs`` (softmax(z - τ·log q̂)); the student's loss uses the adaptive margin
  ``margin_adjusted_logits`` (z + τ·log q̂). Same threshold and masked cross-entropy.

FixMatch keeps a q̂ as well, for monitoring only (it is what DebiasPL would subtract).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from medseg_dpl.core.debias import (ResponseEMA, debiased_probs, margin_adjusted_logits,
                                    masked_cross_entropy, pseudo_labels)
from medseg_dpl.methods.base import StepResult


class PseudoLabelMethod(nn.Module):
    """FixMatch (``debias=False``) or DebiasPL (``debias=True``); q̂ lives in ``state_dict``."""

    def __init__(self, num_classes: int, threshold: float, debias: bool, tau: float = 0.4,
                 qhat_momentum: float = 0.999, prior: Optional[torch.Tensor] = None):
        super().__init__()
        self.threshold = threshold
        self.debias = debias
        self.tau = tau
        self.response = ResponseEMA(num_classes, qhat_momentum)
        self.register_buffer("prior", prior.float() if prior is not None else None)

    @property
    def qhat(self) -> torch.Tensor:
        return self.response.qhat

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> StepResult:
        """The unlabeled loss as the segmentation methods report a step (``StepResult``): the
        loss, q̂ as a per-class vector, the pseudo-labels ``(N,)`` and their confidence mask."""
        teacher_logits = teacher_logits.detach().float()
        self.response.update(torch.softmax(teacher_logits, dim=1))
        if self.debias:
            probs = debiased_probs(teacher_logits, self.qhat, self.tau, self.prior)
            student_logits = margin_adjusted_logits(student_logits, self.qhat, self.tau,
                                                    self.prior)
        else:
            probs = torch.softmax(teacher_logits, dim=1)
        labels, mask = pseudo_labels(probs, self.threshold)
        loss = masked_cross_entropy(student_logits, labels, mask)
        return StepResult(loss, {}, {"qhat": self.qhat.detach().clone()}, labels, mask)


def build_method(cfg: dict, num_classes: int,
                 labeled_counts: Optional[torch.Tensor] = None) -> Optional[PseudoLabelMethod]:
    """The unlabeled part of ``cfg["method"]["name"]`` (``cfg``: a classify config, its ``debias``
    section for τ, q̂ momentum and reference prior); ``None`` for supervised."""
    name, d = cfg["method"]["name"], cfg["debias"]
    if name == "supervised":
        return None
    if name not in ("fixmatch", "debiaspl"):
        raise ValueError(f"method.name: unknown method {name!r} (supervised, fixmatch, debiaspl)")
    prior = None
    if d["reference"] == "labeled_prior":
        if labeled_counts is None:
            raise ValueError("debias.reference=labeled_prior needs the labeled class counts")
        prior = labeled_counts.float() / labeled_counts.sum()
    elif d["reference"] != "uniform":
        raise ValueError(f"debias.reference: expected 'uniform' or 'labeled_prior', "
                         f"got {d['reference']!r}")
    return PseudoLabelMethod(num_classes, cfg["method"]["threshold"], debias=name == "debiaspl",
                             tau=d["tau"], qhat_momentum=d["momentum"], prior=prior)
