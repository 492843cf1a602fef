"""Class-weighted losses and per-class statistics shared by the class-imbalance methods (dhc, cld).

Shapes: ``logits``/``probs`` ``(N, C, *)``, hard ``target`` long ``(N, *)`` (no class axis),
``weight`` ``(C,)``, ``mask`` ``(N, *)`` bool or float.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

EPS = 1e-8


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over DDP ranks (a no-op in one process), so every rank's state stays equal."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def one_hot(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(N, *)`` class indices -> ``(N, C, *)`` float one-hot."""
    return F.one_hot(target.long(), num_classes).movedim(-1, 1).float()


def weighted_ce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                mask: Optional[torch.Tensor] = None, normalize: str = "weights") -> torch.Tensor:
    """Σ w_y·m·CE over positions, divided by Σ w_y·m (``"weights"``: PyTorch's weighted mean)
    or by the number of positions (``"voxels"``: masked ones count as zeros)."""
    ce = F.cross_entropy(logits.float(), target.long(), reduction="none")
    w = weight.to(ce.device, ce.dtype)[target.long()]
    if mask is not None:
        w = w * mask.to(ce.dtype)
    if normalize == "weights":
        return (w * ce).sum() / w.sum().clamp_min(EPS)
    if normalize == "voxels":
        return (w * ce).mean()
    raise ValueError(f"normalize: expected weights or voxels, got {normalize!r}")


def dice_stats(pred: torch.Tensor, target_1h: torch.Tensor) -> torch.Tensor:
    """``(3, C)``: tp, fp, fn summed over the batch and space ("batch Dice")."""
    dims = (0, *range(2, pred.ndim))
    tp = (pred * target_1h).sum(dims)
    fp = (pred * (1 - target_1h)).sum(dims)
    fn = ((1 - pred) * target_1h).sum(dims)
    return torch.stack([tp, fp, fn])


def dice_from_stats(stats: torch.Tensor, smooth: float) -> torch.Tensor:
    """``(C,)`` (2tp + s) / (2tp + fp + fn + s) from :func:`dice_stats`."""
    tp, fp, fn = stats
    return (2 * tp + smooth) / (2 * tp + fp + fn + smooth + EPS)


def weighted_dice_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                       smooth: float = 1.0) -> torch.Tensor:
    """mean over organs c ≥ 1 of w_c·(1 − soft batch Dice_c) (background excluded, as nnU-Net/DHC)."""
    probs = torch.softmax(logits.float(), dim=1)
    dice = dice_from_stats(dice_stats(probs, one_hot(target, probs.shape[1])), smooth)
    return (weight.to(dice.device, dice.dtype)[1:] * (1 - dice[1:])).mean()


def weighted_dice_ce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """DHC's supervised ``w_ce+dice``: weighted CE (weighted mean) + weighted organ Dice."""
    return weighted_ce(logits, target, weight) + weighted_dice_loss(logits, target, weight)


# ----------------------------------------------------------------------------- shared supervised loss
# The one supervised loss every method trains its labeled crops with (``loss.name``); a method's
# own idea (DHC's and CLD's class weights) enters only as ``weight``. Each entry: Dice form
# (include_background, batch) of MONAI's DiceLoss + cross-entropy.
SUP_LOSSES = {
    "dice_ce": {"include_background": True, "batch": False},         # MONAI DiceCELoss defaults
    "organ_dice_ce": {"include_background": False, "batch": False},  # per-crop Dice over organs + CE
    "batch_dice_ce": {"include_background": False, "batch": True},   # nnU-Net: batch Dice over organs + CE
    # not a Dice form: GACE (top-k %) + GADice (:func:`ga_loss`) at the published k and γ
    "ga": {"k": 10.0, "gamma": 0.5},
}
DICE_CE_LOSSES = tuple(n for n in SUP_LOSSES if n != "ga")   # the MONAI Dice + CE forms


def supervised_loss(logits: torch.Tensor, target: torch.Tensor, name: str = "dice_ce",
                    weight: Optional[torch.Tensor] = None,
                    ce_offset: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Soft Dice (MONAI's ``DiceLoss``, form ``SUP_LOSSES[name]``) + CE, optionally class-weighted.

    ``logits`` ``(B, C, *)``, ``target`` ``(B, *)`` class indices, ``weight`` ``(C,)`` or None.
    With ``weight``, CE is PyTorch's weighted mean (Σ w_y·CE / Σ w_y) and the Dice term the mean
    of w_c·(1 − Dice_c) over the classes the form includes. ``name`` ``dice_ce`` without weight is
    exactly MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True)``. ``name`` ``ga`` is
    :func:`ga_loss` with k = 10, γ = 0.5 (the published values; ``ga.*`` configures method ga).
    ``ce_offset`` ``(C,)``: added to the logits of the CE term only (logit adjustment).
    """
    from monai.losses import DiceLoss

    if name not in SUP_LOSSES:
        raise ValueError(f"loss.name: expected one of {', '.join(SUP_LOSSES)}, got {name!r}")
    form = SUP_LOSSES[name]
    if name == "ga":   # class weights as in ga_loss: per-voxel CE weight, per-class Dice factor
        if ce_offset is not None:
            raise ValueError("loss.logit_adjust: not available with loss.name=ga")
        return ga_loss(logits, target, weight=weight, **form)
    logits = logits.float()
    w = None if weight is None else weight.to(logits.device, logits.dtype)
    dice_w = None if w is None else (w if form["include_background"] else w[1:])
    dice = DiceLoss(to_onehot_y=True, softmax=True, weight=dice_w, **form)
    # ce_offset (C,): logit adjustment of the CE only, so the Dice term still sees the raw softmax
    ce_in = logits if ce_offset is None else logits + _class_axis(ce_offset.to(logits), logits)
    return dice(logits, target[:, None].float()) + F.cross_entropy(ce_in, target.long(), weight=w)


def _class_axis(vec: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(C,)`` -> broadcastable against ``(N, C, *)``."""
    return vec.reshape(1, -1, *([1] * (like.ndim - 2)))


# ----------------------------------------------------------------------------- GA loss
# Qi et al., ECCV 2024 (cicailalala/GALoss): GADice + GACE. Both flatten ``(N, C, *)`` to
# voxels ``(M, C)``: the batch is one pool, as in the published code (its Dice sums over the
# batch, its top-k ranks the batch's voxels together).
GA_SMOOTH = 1e-10   # the published Dice smoothing
GA_TIES = ("index", "topk")


def _ga_voxels(logits: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor]):
    """``(N, C, *)`` logits, ``(N, *)`` target and mask -> kept voxels: ``(M, C)`` float logits
    (float64 stays float64, else float32), ``(M,)`` long labels."""
    C = logits.shape[1]
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"GA loss: target {tuple(target.shape)} does not fit logits {tuple(logits.shape)}")
    z = logits.movedim(1, -1).reshape(-1, C)
    z = z if z.dtype == torch.float64 else z.float()
    t = target.reshape(-1).long()
    if mask is not None:
        if mask.shape != target.shape:
            raise ValueError(f"GA loss: mask {tuple(mask.shape)} does not fit target {tuple(target.shape)}")
        keep = mask.reshape(-1) > 0
        z, t = z[keep], t[keep]
    return z, t


def _class_weight(weight: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    C = like.shape[1]
    return torch.ones(C, dtype=like.dtype, device=like.device) if weight is None else weight.to(like)


def ga_dice_terms(logits: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None,
                  weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """GADice per class, ``(C,)`` (``ga_dice_loss`` is their mean), over the kept voxels v.

    With p = softmax(logits), y the one-hot target, s = 1e-10:

    * class c present (Σ_v y_vc > 0): 1 − (2 Σ p_vc y_vc + s) / (Σ p_vc² + Σ y_vc² + s)
      (the published V-Net form, squared denominator, background included);
    * class c absent: Σ_v β_vc p_vc with β_vc = p_vc / Σ_v (1 − y_vc), β detached, i.e. the
      value mean_v p_vc² and the gradient p_vc / M: predicting an absent organ costs.

    Each term times ``weight[c]`` (as the published ``weight``). Differences from the code:
    ``mask`` drops voxels from every sum (the code's ``weighted_pixel_map`` scales the target
    only, no mask); no kept voxel gives zeros instead of NaN.
    """
    z, t = _ga_voxels(logits, target, mask)
    w = _class_weight(weight, z)
    if t.numel() == 0:
        return z.sum(0) * 0.0
    p = torch.softmax(z, dim=1)
    y = F.one_hot(t, z.shape[1]).to(p.dtype)
    dice = 1 - (2 * (p * y).sum(0) + GA_SMOOTH) / ((p * p).sum(0) + (y * y).sum(0) + GA_SMOOTH)
    beta = (p / (1 - y).sum(0)).detach()     # Σ(1 − y) = M for an absent class
    penalty = (beta * p).sum(0)
    return w * torch.where(y.sum(0) > 0, dice, penalty)


def ga_dice_loss(logits: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None,
                 weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """GADice: (1/C) Σ_c of :func:`ga_dice_terms` (the code divides by C, not by Σ w)."""
    return ga_dice_terms(logits, target, mask, weight).mean()


def _top_k_mask(loss: torch.Tensor, K: int, ties: str) -> torch.Tensor:
    """``(M,)`` bool: the K largest entries of ``loss`` ``(M,)``. ``ties="index"``: among equal
    values at the cut, the first by index (the same voxels on every device); ``"topk"``:
    ``torch.topk``'s own choice among them, as the published code (unspecified)."""
    loss = loss.detach()
    if K >= loss.numel():      # k = 100 (the cross term): every voxel, no ranking needed
        return torch.ones_like(loss, dtype=torch.bool)
    if ties == "topk":
        idx = torch.topk(loss, K, sorted=False).indices
        return torch.zeros_like(loss, dtype=torch.bool).index_fill_(0, idx, True)
    cut = torch.topk(loss, K, sorted=False).values.min()
    above, tied = loss > cut, loss == cut
    need = K - above.sum()
    return above | (tied & (tied.cumsum(0) <= need))


def ga_ce_parts(logits: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None,
                weight: Optional[torch.Tensor] = None, k: float = 10.0, gamma: float = 0.5,
                ties: str = "index") -> tuple[torch.Tensor, torch.Tensor]:
    """GACE per class, ``(C,)`` terms and ``(C,)`` counts n_c of the top-k voxels.

    Over the M kept voxels, ℓ_v = w_{y_v}·CE(z_v, y_v) (``weight`` as PyTorch's per-voxel CE
    weight, as the code's ``GACE(weight=...)``); T = the K = ⌊M·k/100⌋ largest ℓ_v (the k %
    hardest); n_c = #{v ∈ T: y_v = c};
    term_c = Σ_{v∈T, y_v=c} ℓ_v / (n_c^(1−γ)·K^γ), 0 if n_c = 0.
    γ = 1: plain mean CE of the top-k (OHEM); γ = 0: sum over classes of each class's mean.

    Differences from the code: the first K by index among tied losses (``ties="index"``;
    ``"topk"``: the code's ``torch.topk`` choice); its 1e-10 smoothing of n_c and of the
    denominator dropped (a class absent from T adds 0 either way); ``mask`` drops voxels
    before ranking (the code has none); K = 0 gives zeros.
    """
    if ties not in GA_TIES:
        raise ValueError(f"ga.ties: expected one of {', '.join(GA_TIES)}, got {ties!r}")
    z, t = _ga_voxels(logits, target, mask)
    C = z.shape[1]
    K = int(t.numel() * k / 100)
    if K == 0:
        zero = z.sum(0) * 0.0
        return zero, zero.detach()
    ce = _class_weight(weight, z)[t] * F.cross_entropy(z, t, reduction="none")
    top = _top_k_mask(ce, K, ties)
    y = F.one_hot(t, C).to(ce.dtype) * top[:, None]
    n = y.sum(0)
    sums = (ce[:, None] * y).sum(0)
    denom = n.clamp_min(1).pow(1 - gamma) * float(K) ** gamma
    return torch.where(n > 0, sums / denom, torch.zeros_like(sums)), n


def ga_ce_loss(logits: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None,
               weight: Optional[torch.Tensor] = None, k: float = 10.0, gamma: float = 0.5,
               ties: str = "index") -> torch.Tensor:
    """GACE: Σ_c of the per-class terms of :func:`ga_ce_parts` (summed over classes, as published)."""
    return ga_ce_parts(logits, target, mask, weight, k, gamma, ties)[0].sum()


def ga_loss(logits: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None,
            weight: Optional[torch.Tensor] = None, k: float = 10.0, gamma: float = 0.5,
            ties: str = "index") -> torch.Tensor:
    """GA = GACE(k, γ) + GADice, the published supervised loss; ``logits`` ``(N, C, *)``,
    ``target`` ``(N, *)``, ``mask`` ``(N, *)`` (nonzero: kept), ``weight`` ``(C,)``."""
    return (ga_ce_loss(logits, target, mask, weight, k, gamma, ties)
            + ga_dice_loss(logits, target, mask, weight))
