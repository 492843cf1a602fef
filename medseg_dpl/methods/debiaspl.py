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
import torch.nn.functional as F

from medseg_dpl.core.debias import (ResponseEMA, debiased_probs, log_bias, margin_adjusted_logits,
                                    pseudo_labels)
from medseg_dpl.methods.checks import check_ignored_keys
from medseg_dpl.methods.fixmatch import FixMatch

VARIANTS = ("paper", "organ_prior")
def reference_prior(cfg: dict, prior: torch.Tensor, qhat: torch.Tensor) -> torch.Tensor:
    """The reference handed to the core functions, ``(C,)``.

    ``organ_prior`` -> π (the organ renormalisation happens in the core's ``ignore_index``);
    ``paper``: ``uniform`` -> ones (log 1 = 0, i.e. plain log q̂; a constant does not change
    softmax or CE), ``labeled_prior`` -> π; ``include_background: false`` -> ref[0] = q̂[0] so
    background's bias log(q̂₀/ref₀) is 0.
    """
    d = cfg["debias"]
    if d["variant"] == "organ_prior" or d["reference"] == "labeled_prior":
        ref = prior.float().clone()
    elif d["reference"] == "uniform":
        ref = torch.ones_like(prior, dtype=torch.float32)
    else:
        raise ValueError(f"debias.reference: expected labeled_prior or uniform, got {d['reference']!r}")
    if d["variant"] == "paper" and not d["include_background"]:
        ref[0] = qhat[0].float().clamp_min(1e-8)
    return ref


def bias_options(cfg: dict) -> dict:
    """``ignore_index`` / ``clip`` keyword arguments of the core functions for the variant."""
    d = cfg["debias"]
    if d["variant"] == "organ_prior":
        return {"ignore_index": 0, "clip": d["b_max"]}
    if d["variant"] != "paper":
        raise ValueError(f"debias.variant: expected one of {VARIANTS}, got {d['variant']!r}")
    # a hard q̂ of a never-predicted class decays towards 0 (log -> -inf): every hard variant is
    # clipped; the soft paper form is not (its q̂ never reaches 0)
    return {"clip": d["b_max"]} if d["response"] == "hard" else {}


def update_response(ema: ResponseEMA, logits: torch.Tensor, cfg: dict, mask=None) -> torch.Tensor:
    """Fold the teacher's ``(N, C, *)`` logits into ``ema`` as ``debias.response`` says (hard
    labels are counted rather than one-hot encoded: same q̂, less work)."""
    hard = cfg["debias"]["variant"] == "organ_prior" or cfg["debias"]["response"] == "hard"
    if hard:
        return ema.update_labels(logits.detach().argmax(dim=1), mask)
    return ema.update(response_probs(logits, cfg), mask)


def response_probs(logits: torch.Tensor, cfg: dict) -> torch.Tensor:
    """What q̂ averages, ``(N, C, *)`` from logits ``(N, C, *)``.

    ``soft``: the softmax (the paper). ``hard``: the one-hot argmax, so q̂ follows the class
    frequencies of the hard labels (always so for ``organ_prior``).
    """
    probs = torch.softmax(logits.detach().float(), dim=1)
    kind = "hard" if cfg["debias"]["variant"] == "organ_prior" else cfg["debias"]["response"]
    if kind == "soft":
        return probs
    if kind == "hard":
        return F.one_hot(probs.argmax(dim=1), probs.shape[1]).movedim(-1, 1).to(probs.dtype)
    raise ValueError(f"debias.response: expected soft or hard, got {kind!r}")


def initial_qhat(cfg: dict, prior: torch.Tensor) -> torch.Tensor:
    """q̂'s start: the reference it is compared with (π, or uniform for the paper's form)."""
    ref = reference_prior(cfg, prior, prior)
    return ref / ref.sum()


class DebiasPL(FixMatch):
    name = "debiaspl"

    def __init__(self, student, cfg, num_classes, prior=None):
        super().__init__(student, cfg, num_classes, prior)
        d = cfg["debias"]
        bias_options(cfg)                                 # validate the variant early
        check_ignored_keys(cfg, ("debias",))
        response_probs(torch.zeros(1, num_classes), cfg)  # and debias.response
        self.response = ResponseEMA(num_classes, momentum=d["momentum"],
                                    init=initial_qhat(cfg, self.prior))

    @property
    def qhat(self) -> torch.Tensor:
        return self.response.qhat

    def _ref(self) -> torch.Tensor:
        return reference_prior(self.cfg, self.prior, self.qhat)

    def bias(self) -> torch.Tensor:
        """The current b ``(C,)`` (what τ multiplies), for logs and reports."""
        return log_bias(self.qhat, self._ref(), **bias_options(self.cfg))

    def teacher_probs(self, logits_w, thresholds=None):
        d = self.cfg["debias"]
        probs = debiased_probs(logits_w, self.qhat, d["tau"], self._ref(), **bias_options(self.cfg))
        if self.training:
            # debias.masked: q̂ counts the voxels the loss keeps (this step's thresholds)
            thr = self.thresholds() if thresholds is None else thresholds
            mask = pseudo_labels(probs, thr)[1] if d["masked"] else None
            update_response(self.response, logits_w, self.cfg, mask)
        # after the update: the q̂ and bias the margin loss of this step uses
        return probs, {"qhat": self.qhat.detach().clone(), "bias": self.bias().detach()}

    def unsup_logits(self, logits_s):
        return margin_adjusted_logits(logits_s, self.qhat, self.cfg["debias"]["tau"], self._ref(),
                                      **bias_options(self.cfg))
