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
}


def supervised_loss(logits: torch.Tensor, target: torch.Tensor, name: str = "dice_ce",
                    weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Soft Dice (MONAI's ``DiceLoss``, form ``SUP_LOSSES[name]``) + CE, optionally class-weighted.

    ``logits`` ``(B, C, *)``, ``target`` ``(B, *)`` class indices, ``weight`` ``(C,)`` or None.
    With ``weight``, CE is PyTorch's weighted mean (Σ w_y·CE / Σ w_y) and the Dice term the mean
    of w_c·(1 − Dice_c) over the classes the form includes. ``name`` ``dice_ce`` without weight is
    exactly MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True)``.
    """
    from monai.losses import DiceLoss

    if name not in SUP_LOSSES:
        raise ValueError(f"loss.name: expected one of {', '.join(SUP_LOSSES)}, got {name!r}")
    form = SUP_LOSSES[name]
    logits = logits.float()
    w = None if weight is None else weight.to(logits.device, logits.dtype)
    dice_w = None if w is None else (w if form["include_background"] else w[1:])
    dice = DiceLoss(to_onehot_y=True, softmax=True, weight=dice_w, **form)
    return dice(logits, target[:, None].float()) + F.cross_entropy(logits, target.long(), weight=w)
