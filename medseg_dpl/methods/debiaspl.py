"""DebiasPL (Wang et al., CVPR 2022) on voxels: FixMatch with two changes, nothing else.

1. Counterfactual pseudo-labels from softmax(z_w − τ·b) (:meth:`teacher_probs`);
2. adaptive-margin unsupervised loss on z_s + τ·b (:meth:`unsup_logits`);
with the bias b ``(C,)`` from a response EMA q̂ of the teacher's weak-view output, updated
after pseudo-labeling and before the margin loss as in the paper's code, all-reduced under DDP.
q̂ starts at the reference it is compared with, so b = 0 until evidence arrives.

``debias.variant``:

* ``paper``: b = log(q̂/ref), q̂ the EMA of the softmax (``debias.response=soft``; ``hard``:
  of the one-hot argmax) over all unlabeled voxels (``debias.masked``: confident ones only);
  ref = uniform (``debias.reference=uniform``: exactly the paper's log q̂) or the labeled prior
  π (``labeled_prior``); ``debias.include_background=false`` zeroes the background's bias.
* ``organ_prior`` (organ-only, prior-matched): q̂ is the EMA of the teacher's *raw* argmax
  (never of the debiased labels, which would feed back), b = log(q̂/π) over the organ classes
  only (both renormalised without background), background's bias 0, clipped to ±``b_max``.
  Why: in CT the background is ~90 % of the voxels and well estimated; its diffuse soft
  probability leaking into rare organs is what made the soft q̂ over-state them (the README's
  measured mechanism), and what the student must learn is the organs' relative shares.

``method.class_thresholds`` (FixMatch's, so the benchmark can tell the thresholds' effect from
the debiasing's): per-class thresholds from the confident (debiased) pseudo-labels' class rates
over π, computed once per step, background at the fixed threshold by default.
π (the trainer's ``prior``) is measured on the voxels random crops see, like q̂ (see
``engine.trainer.labeled_prior``). τ = 0 with ``paper`` is FixMatch exactly (a test checks it).
"""
from __future__ import annotations

import torch

from medseg_dpl.core.debias import (DebiasOptions, ResponseEMA, debiased_probs, initial_qhat, log_bias,
                                    margin_adjusted_logits, pseudo_labels, reference_prior,
                                    update_response)
from medseg_dpl.methods.checks import check_ignored_keys
from medseg_dpl.methods.fixmatch import FixMatch


class DebiasPL(FixMatch):
    name = "debiaspl"

    def __init__(self, student, cfg, num_classes, prior=None):
        super().__init__(student, cfg, num_classes, prior)
        self.debias = DebiasOptions.from_section(cfg["debias"])
        check_ignored_keys(cfg, ("debias",))
        self.bias_kwargs = self.debias.bias_kwargs()
        self.response = ResponseEMA(num_classes, momentum=self.debias.momentum,
                                    init=initial_qhat(self.debias, self.prior))

    @property
    def qhat(self) -> torch.Tensor:
        return self.response.qhat

    def _ref(self) -> torch.Tensor:
        return reference_prior(self.debias, self.prior, self.qhat)

    def bias(self) -> torch.Tensor:
        """The current b ``(C,)`` (what τ multiplies), for logs and reports."""
        return log_bias(self.qhat, self._ref(), **self.bias_kwargs)

    def state_report(self) -> dict[str, list[float]]:
        return {"qhat": [float(v) for v in self.qhat], "bias": [float(v) for v in self.bias()]}

    def teacher_probs(self, logits_w, thresholds=None):
        probs = debiased_probs(logits_w, self.qhat, self.debias.tau, self._ref(), **self.bias_kwargs)
        if self.training:
            # debias.masked: q̂ counts the voxels the loss keeps (this step's thresholds)
            thr = self.thresholds() if thresholds is None else thresholds
            mask = pseudo_labels(probs, thr)[1] if self.debias.masked else None
            update_response(self.response, logits_w, self.debias, mask)
        # after the update: the q̂ and bias the margin loss of this step uses
        return probs, {"qhat": self.qhat.detach().clone(), "bias": self.bias().detach()}

    def unsup_logits(self, logits_s):
        return margin_adjusted_logits(logits_s, self.qhat, self.debias.tau, self._ref(), **self.bias_kwargs)
