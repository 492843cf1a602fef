"""Debiased pseudo-labeling (Wang et al., CVPR 2022) in three small pieces, shape-agnostic.

Shapes: logits ``z`` and probabilities are ``(N, C)`` (classification) or ``(N, C, *spatial)``
(segmentation, e.g. ``(N, C, D, H, W)``); the class axis is always 1. ``qhat`` and the optional
reference ``prior`` are ``(C,)`` probability vectors. Masks are boolean ``(N, *spatial)``.

- :class:`ResponseEMA`: q̂ <- m·q̂ + (1-m)·mean(softmax(z_weak)) over unlabeled positions.
- :func:`debiased_probs`: counterfactual probabilities softmax(z - τ·log q̂).
- :func:`margin_adjusted_logits`: adaptive-margin logits z + τ·log q̂ for the student's loss.

With a reference ``prior`` π the bias term is log(q̂/π) instead of log q̂: debias only the
part of the model's response that exceeds the class frequencies of the labeled data. The paper
assumes a uniform truth (ImageNet); CT voxels are far from uniform, so uniform debiasing can
over-correct. With π uniform the two agree (log π is a constant that softmax ignores).

Voxel-aware additions (used by ``debias.variant=organ_prior``; the paper's form is the default
of every argument): ``log_bias(..., ignore_index=0, clip=b)`` compares q̂ and π over the organ
classes only (both renormalised without the background), gives the background a bias of 0 and
clips the rest to ±b; :func:`classwise_thresholds` turns a per-class confident-prediction rate
into FlexMatch-style per-class thresholds normalised by the prior.

All math runs in float32 whatever the autocast dtype: log q̂ of a rare organ is large and
bf16 would round the margin away.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

EPS = 1e-8  # keeps log q̂ finite for a class the model never predicts


def _per_class(vec: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A ``(C,)`` vector viewed as ``(1, C, 1, ..., 1)`` to broadcast against ``like``."""
    if vec.ndim != 1 or vec.shape[0] != like.shape[1]:
        raise ValueError(f"expected a ({like.shape[1]},) class vector, got shape {tuple(vec.shape)}")
    return vec.to(device=like.device, dtype=torch.float32).view(1, -1, *([1] * (like.ndim - 2)))


def log_bias(qhat: torch.Tensor, prior: Optional[torch.Tensor] = None,
             ignore_index: Optional[int] = None, clip: Optional[float] = None) -> torch.Tensor:
    """``log q̂`` or, with a reference prior π, ``log(q̂/π)``; all ``(C,)``, float32.

    ``ignore_index`` (e.g. 0, background): q̂ and π are renormalised over the other classes
    and that class's bias is 0, so its huge, well-estimated share neither moves nor rescales
    the others. ``clip``: the bias is clipped to [-clip, clip] (a class the model has not
    predicted yet would otherwise get a bias of log(EPS) ≈ −18 nats).
    """
    q = qhat.float()
    p = None if prior is None else prior.to(q.device).float()
    keep = None
    if ignore_index is not None:
        keep = torch.ones_like(q, dtype=torch.bool)
        keep[ignore_index] = False
        q = q * keep / (q * keep).sum().clamp_min(EPS)
        if p is not None:
            p = p * keep / (p * keep).sum().clamp_min(EPS)
    bias = torch.log(q.clamp_min(EPS))
    if p is not None:
        bias = bias - torch.log(p.clamp_min(EPS))
    if clip is not None:
        bias = bias.clamp(-clip, clip)
    if keep is not None:
        bias = bias * keep
    return bias


def debiased_probs(logits: torch.Tensor, qhat: torch.Tensor, tau: float,
                   prior: Optional[torch.Tensor] = None, ignore_index: Optional[int] = None,
                   clip: Optional[float] = None) -> torch.Tensor:
    """Counterfactual probabilities ``softmax(z - τ·log(q̂[/π]))`` over axis 1, float32.

    ``ignore_index`` / ``clip``: see :func:`log_bias`.
    """
    bias = log_bias(qhat, prior, ignore_index, clip)
    return torch.softmax(logits.float() - tau * _per_class(bias, logits), dim=1)


def margin_adjusted_logits(logits: torch.Tensor, qhat: torch.Tensor, tau: float,
                           prior: Optional[torch.Tensor] = None, ignore_index: Optional[int] = None,
                           clip: Optional[float] = None) -> torch.Tensor:
    """Adaptive-margin logits ``z + τ·log(q̂[/π])``, float32, same shape as ``logits``.

    Training on these with cross-entropy makes the loss demand a larger margin for classes
    the pseudo-labels over-represent (the logit-adjustment loss of Menon et al.).
    """
    bias = log_bias(qhat, prior, ignore_index, clip)
    return logits.float() + tau * _per_class(bias, logits)


def classwise_thresholds(rate: torch.Tensor, prior: torch.Tensor, threshold: float,
                         floor: float) -> torch.Tensor:
    """Per-class confidence thresholds ``(C,)`` (FlexMatch's learning effect, prior-normalised).

    ``rate`` ``(C,)``: share of the confident pseudo-labels that go to each class (e.g. a
    masked hard q̂); ``prior`` ``(C,)``: the share each class should have. The learning effect
    β_c = (rate_c/π_c) / max_k (rate_k/π_k) is 1 for the class the model labels most fully
    and ~0 for one it never labels; dividing by π keeps the liver from looking "better
    learned" just for being large. T_c = max(floor, threshold · β_c/(2 − β_c)) (FlexMatch's
    convex mapping), so rare organs get pseudo-labels at ``floor`` until they catch up.
    """
    r = rate.float() / prior.to(rate.device).float().clamp_min(EPS)
    beta = r / r.max().clamp_min(EPS)
    return (threshold * beta / (2.0 - beta)).clamp_min(floor)


def pseudo_labels(probs: torch.Tensor, threshold) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard labels and confidence mask from ``(N, C, *)`` probabilities.

    Returns ``labels`` (long, ``(N, *)``) = argmax over classes, and ``mask`` (bool, ``(N, *)``)
    = max probability >= the threshold: a float, or a ``(C,)`` tensor of per-class thresholds
    (each voxel compared with the threshold of its argmax class).
    """
    conf, labels = probs.max(dim=1)
    if isinstance(threshold, torch.Tensor):
        threshold = threshold.to(conf.device, conf.dtype)[labels]
    return labels, conf >= threshold


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                         mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Cross-entropy averaged over *all* positions, masked ones contributing zero (FixMatch).

    ``logits`` ``(N, C, *)``, ``target`` long ``(N, *)``, ``mask`` bool/float ``(N, *)``.
    Dividing by all positions (not by the kept ones) is what the paper does: the loss shrinks
    smoothly while few pseudo-labels pass the threshold instead of exploding on one noisy voxel.
    """
    loss = F.cross_entropy(logits.float(), target, reduction="none")
    if mask is not None:
        loss = loss * mask.to(loss.dtype)
    return loss.mean()


def class_balanced_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                                 mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Masked CE averaged per pseudo-label class, then over the classes present, times the kept
    share of positions, ``(N, C, *)`` logits, long ``(N, *)`` target, bool/float ``(N, *)`` mask.

    (kept / all) · mean_{c present} [Σ_{y=c} m·CE / Σ_{y=c} m]: background is one class among C
    instead of 80-90 % of the loss; with a single class present it is :func:`masked_cross_entropy`
    exactly (the kept-share factor keeps its smooth start while few voxels pass the threshold).
    """
    ce = F.cross_entropy(logits.float(), target, reduction="none").reshape(-1)
    m = torch.ones_like(ce) if mask is None else mask.reshape(-1).to(ce.dtype)
    C = logits.shape[1]
    t = target.reshape(-1)
    per_class = torch.zeros(C, dtype=ce.dtype, device=ce.device).index_add_(0, t, m * ce)
    counts = torch.zeros(C, dtype=ce.dtype, device=ce.device).index_add_(0, t, m)
    present = counts > 0
    if not present.any():
        return (ce * m).sum() * 0.0   # keeps the graph, no voxel kept
    balanced = (per_class[present] / counts[present]).mean()
    return balanced * m.sum() / m.numel()


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                       mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """−Σ_c p_c·log softmax(z)_c averaged over *all* positions, masked-out ones contributing
    zero (the normalisation of :func:`masked_cross_entropy`, so a kept position weighs the same
    in both), in float32.

    ``logits`` and ``target`` probabilities ``(N, C, *)``, ``mask`` bool ``(N, *)`` or None. Its
    gradient on z is softmax(z) − p: a class whose target probability exceeds the student's is
    pushed up where that holds (the soft counterfactual targets below the threshold, where no
    hard pseudo-label is kept).
    """
    ce = -(target.float() * F.log_softmax(logits.float(), dim=1)).sum(dim=1)
    if mask is not None:
        ce = ce * _flatten_mask(mask, ce[:, None]).reshape(ce.shape).to(ce.dtype)
    return ce.mean()


def _flatten_mask(mask: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    if mask.ndim == probs.ndim and mask.shape[1] == 1:
        mask = mask.squeeze(1)
    expected = probs.shape[:1] + probs.shape[2:]
    if tuple(mask.shape) != tuple(expected):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match probs {tuple(probs.shape)}"
                         f" without its class axis {tuple(expected)}")
    return mask.to(torch.bool)


class ResponseEMA(nn.Module):
    """Running mean q̂ of the model's class response on unlabeled data, a ``(C,)`` buffer.

    q̂ starts at ``init`` (default uniform; DebiasPL passes its reference π).

    ``update(probs, mask)`` sets q̂ <- m·q̂ + (1-m)·mean(probs) where the mean is over every
    non-class position (all samples and voxels), or over the masked positions only. An empty
    mask leaves q̂ unchanged. Under ``torch.distributed`` sums and counts are all-reduced so every
    rank holds the same q̂ (every rank must call ``update``: it is a collective). q̂ is a buffer,
    so it travels with ``state_dict``.
    """

    def __init__(self, num_classes: int, momentum: float = 0.999,
                 init: Optional[torch.Tensor] = None):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.num_classes = num_classes
        self.momentum = momentum
        if init is None:
            init = torch.full((num_classes,), 1.0 / num_classes)
        if tuple(init.shape) != (num_classes,):
            raise ValueError(f"init must have shape ({num_classes},), got {tuple(init.shape)}")
        # start at the reference the bias compares with: log(q̂/π) = 0 until evidence arrives
        # (a uniform start with π far from uniform is a bias of several nats for hundreds of steps)
        self.register_buffer("qhat", (init.float() / init.float().sum()).clone())

    @torch.no_grad()
    def update(self, probs: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Fold a batch ``(N, C, *)`` of probabilities into q̂; returns the new q̂."""
        if probs.shape[1] != self.num_classes:
            raise ValueError(f"probs have {probs.shape[1]} classes, q̂ has {self.num_classes}")
        flat = probs.detach().float().movedim(1, -1).reshape(-1, self.num_classes)
        if mask is not None:
            keep = _flatten_mask(mask, probs).reshape(-1)
            flat = flat[keep]
        return self._fold(flat.sum(dim=0), flat.shape[0])

    @torch.no_grad()
    def update_labels(self, labels: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Fold hard labels ``(N, *)`` (long) in: the same as :meth:`update` with their one-hot
        ``(N, C, *)``, by counting instead of building the one-hot (cheaper on voxels)."""
        kept = labels.detach()[mask.to(torch.bool)] if mask is not None else labels.detach().reshape(-1)
        counts = torch.bincount(kept.reshape(-1), minlength=self.num_classes)[: self.num_classes]
        return self._fold(counts.float(), kept.numel())

    def _fold(self, sums: torch.Tensor, count: int) -> torch.Tensor:
        """q̂ <- m·q̂ + (1-m)·sums/count, sums and count all-reduced under DDP (a collective)."""
        stats = torch.cat([sums.float(), sums.new_tensor([float(count)], dtype=torch.float32)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
        count = stats[-1]
        if count > 0:
            mean = (stats[:-1] / count).to(self.qhat.device)
            self.qhat.mul_(self.momentum).add_(mean, alpha=1.0 - self.momentum)
        return self.qhat


# ----------------------------------------------------------------------------- debias options
@dataclass(frozen=True)
class DebiasOptions:
    """``debias.*`` (see ``engine/defaults.py``), parsed once: what the helpers below need.

    ``variant``: ``paper`` (b = log(q̂/ref), q̂ of the softmax or the one-hot argmax) or
    ``organ_prior`` (q̂ of the raw argmax, b = log(q̂/π) over organs, background 0, clipped).
    """
    variant: str
    tau: float
    momentum: float
    masked: bool
    response: str
    reference: str
    include_background: bool
    b_max: float

    CHOICES = {"variant": ("paper", "organ_prior"), "response": ("soft", "hard"),
               "reference": ("labeled_prior", "uniform")}

    @classmethod
    def from_section(cls, section: dict) -> "DebiasOptions":
        """From ``cfg["debias"]``; a bad choice is a ``ValueError`` naming ``debias.<key>``."""
        for key, allowed in cls.CHOICES.items():
            if section[key] not in allowed:
                raise ValueError(f"debias.{key}: expected one of {', '.join(allowed)}, got {section[key]!r}")
        return cls(**{f: section[f] for f in cls.__dataclass_fields__})

    @property
    def hard(self) -> bool:
        """q̂ counts hard labels (always for ``organ_prior``)."""
        return self.variant == "organ_prior" or self.response == "hard"

    def bias_kwargs(self) -> dict:
        """``ignore_index`` / ``clip`` keyword arguments of :func:`log_bias` and friends."""
        if self.variant == "organ_prior":
            return {"ignore_index": 0, "clip": self.b_max}
        # a hard q̂ of a never-predicted class decays towards 0 (log -> -inf): every hard variant
        # is clipped; the soft paper form is not (its q̂ never reaches 0)
        return {"clip": self.b_max} if self.response == "hard" else {}


def reference_prior(opts: DebiasOptions, prior: torch.Tensor, qhat: torch.Tensor) -> torch.Tensor:
    """The reference ``(C,)`` q̂ is compared with: π (``organ_prior``, or ``labeled_prior``; the
    organ renormalisation happens in ``ignore_index``), ones for ``uniform`` (log 1 = 0: the
    paper's plain log q̂); ``include_background=false`` sets ref[0] = q̂[0] (background's bias 0)."""
    if opts.variant == "organ_prior" or opts.reference == "labeled_prior":
        ref = prior.float().clone()
    else:
        ref = torch.ones_like(prior, dtype=torch.float32)
    if opts.variant == "paper" and not opts.include_background:
        ref[0] = qhat[0].float().clamp_min(EPS)
    return ref


def initial_qhat(opts: DebiasOptions, prior: torch.Tensor) -> torch.Tensor:
    """q̂'s start ``(C,)``: the reference it is compared with, so b = 0 until evidence arrives."""
    ref = reference_prior(opts, prior, prior)
    return ref / ref.sum()


def response_probs(logits: torch.Tensor, opts: DebiasOptions) -> torch.Tensor:
    """What q̂ averages, ``(N, C, *)`` from logits ``(N, C, *)``: the softmax (the paper) or
    the one-hot argmax (hard)."""
    probs = torch.softmax(logits.detach().float(), dim=1)
    if not opts.hard:
        return probs
    return F.one_hot(probs.argmax(dim=1), probs.shape[1]).movedim(-1, 1).to(probs.dtype)


def update_response(ema: "ResponseEMA", logits: torch.Tensor, opts: DebiasOptions,
                    mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fold the teacher's ``(N, C, *)`` logits into ``ema`` (hard labels are counted rather
    than one-hot encoded: same q̂, less work); ``mask`` ``(N, *)`` keeps some positions."""
    if opts.hard:
        # max(dim).indices: the same first-maximum index as argmax, ~10x faster on CPU for a
        # (N, C, D, H, W) class axis (argmax took 3 % of a DebiasPL step)
        return ema.update_labels(logits.detach().max(dim=1).indices, mask)
    return ema.update(response_probs(logits, opts), mask)
