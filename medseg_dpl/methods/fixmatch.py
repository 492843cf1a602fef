"""FixMatch for segmentation with an EMA teacher (the DebiasPL paper's "EMAN" setting).

The teacher sees the weak view; its confident voxels (max prob >= threshold) become hard
pseudo-labels for the student's strong view (same voxels). The strong view is further mixed
across the unlabeled batch by 3D CutMix (``method.cutmix``: a random box of crop i is replaced
by the same box of crop i+1, image and pseudo-label alike, as UniMatch/CutMix-Seg do), so it
really differs from the weak view. The unsupervised loss (``method.unsup_loss``) is the
masked cross-entropy (``ce``), that plus a Dice loss on the confident voxels (``dice_ce``,
the supervised loss's form: Dice does not let the background's voxel count drown the organs),
or the CE averaged per pseudo-label class (``balanced_ce``, background one class among C).
Labeled and strong-unlabeled crops go through the student in one forward pass.
Subclasses change :meth:`teacher_probs` (the pseudo-label), :meth:`thresholds` and
:meth:`unsup_logits`.
"""
from __future__ import annotations

import torch
from monai.losses import MaskedDiceLoss

from medseg_dpl.core.debias import (ResponseEMA, class_balanced_cross_entropy, classwise_thresholds,
                                    masked_cross_entropy, pseudo_labels, soft_cross_entropy)
from medseg_dpl.methods.base import Algorithm, StepResult, class_share
from medseg_dpl.methods.checks import check_ignored_keys
from medseg_dpl.methods.options import PseudoLabelOptions, parse


def cutmix_boxes(n: int, spatial: tuple[int, ...], prob: float, device) -> torch.Tensor:
    """Boolean ``(n, *spatial)`` boxes, one per sample with probability ``prob`` (else empty).

    Each box covers a random share (0.1–0.5) of the crop's volume with a random aspect
    (sides drawn per axis), at a random position; drawn from the global torch RNG, which the
    trainer seeds per step.
    """
    boxes = torch.zeros((n, *spatial), dtype=torch.bool, device=device)
    for i in range(n):
        if torch.rand(()) >= prob:
            continue
        share = 0.1 + 0.4 * torch.rand(())
        aspect = torch.empty(len(spatial)).uniform_(0.7, 1.4)
        side = (share * aspect.prod() ** -1) ** (1 / len(spatial)) * aspect
        idx = []
        for ax, s in enumerate(spatial):
            w = int(min(s, max(1, round(float(side[ax]) * s))))
            start = int(torch.randint(0, s - w + 1, ()))
            idx.append(slice(start, start + w))
        boxes[(i, *idx)] = True
    return boxes


class FixMatch(Algorithm):
    name = "fixmatch"
    uses_unlabeled = True
    uses_teacher = True

    def __init__(self, student, cfg, num_classes, prior=None):
        super().__init__(student, cfg, num_classes, prior)
        check_ignored_keys(cfg, ("method",))
        self.opts = parse(PseudoLabelOptions, cfg, "method")
        self.unsup_dice = MaskedDiceLoss(to_onehot_y=True, softmax=True)
        if self.opts.class_thresholds:  # the confident pseudo-labels' class shares, starting at π
            self.confident = ResponseEMA(num_classes, momentum=self.opts.threshold_momentum, init=self.prior)

    @torch.no_grad()
    def weak_logits(self, batch: dict) -> torch.Tensor:
        """Teacher logits of the weak view ``(U, C, *)``; in teacher mode log of the external
        probabilities (softmax of them gives them back, so debiasing applies unchanged)."""
        if "teacher_probs" in batch:
            return torch.log(batch["teacher_probs"].float().clamp_min(1e-8))
        return self.teacher(batch["image_weak"]).float()

    def teacher_probs(self, logits_w: torch.Tensor, thresholds=None) -> tuple[torch.Tensor, dict]:
        """Probabilities to pseudo-label from (plain softmax here) and extra logs; ``thresholds``
        are this step's (a subclass may count its statistics on the confident voxels)."""
        return torch.softmax(logits_w, dim=1), {}

    def thresholds(self):
        """The confidence threshold: a float, or ``(C,)`` per-class thresholds
        (``method.class_thresholds``: T_c from the confident pseudo-labels' class shares over π,
        :func:`~medseg_dpl.core.debias.classwise_thresholds`; background keeps
        ``method.threshold`` unless ``method.background_threshold=adaptive``, since lowering it
        makes ambiguous voxels confident background)."""
        o = self.opts
        if not o.class_thresholds:
            return o.threshold
        thr = classwise_thresholds(self.confident.qhat, self.prior, o.threshold, o.threshold_floor)
        if o.background_threshold == "fixed":
            thr[0] = o.threshold
        return thr

    def unsup_logits(self, logits_s: torch.Tensor) -> torch.Tensor:
        """Logits the unsupervised loss is computed on."""
        return logits_s

    @torch.no_grad()
    def pseudo_label_probs(self, logits: torch.Tensor) -> torch.Tensor:
        return self.teacher_probs(logits.float())[0]

    def unsup_loss(self, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``logits`` ``(U, C, *)``, ``labels`` long and ``mask`` bool ``(U, *)``."""
        if self.opts.unsup_loss == "balanced_ce":
            return class_balanced_cross_entropy(logits, labels, mask)
        loss = masked_cross_entropy(logits, labels, mask)
        if self.opts.unsup_loss == "dice_ce" and mask.any():
            loss = loss + self.unsup_dice(logits.float(), labels[:, None].float(), mask[:, None].float())
        return loss

    def train_step(self, batch: dict, step: int) -> StepResult:
        x_l, y_l = batch["image"], batch["label"]
        logits_w = self.weak_logits(batch)
        thr = self.thresholds()             # once per step, from the statistics so far
        probs, extra = self.teacher_probs(logits_w, thr)
        labels_u, mask = pseudo_labels(probs, thr)
        if self.opts.class_thresholds:
            self.confident.update_labels(labels_u, mask)

        x_s, mixed_labels, mixed_mask, mixed_probs = batch["image_strong"], labels_u, mask, probs
        if self.opts.cutmix > 0 and x_s.shape[0] > 1:
            box = cutmix_boxes(x_s.shape[0], tuple(x_s.shape[2:]), self.opts.cutmix, x_s.device)
            other = torch.roll(torch.arange(x_s.shape[0], device=x_s.device), -1)
            x_s = torch.where(box[:, None], x_s[other], x_s)
            mixed_labels = torch.where(box, labels_u[other], labels_u)
            mixed_mask = torch.where(box, mask[other], mask)
            if self.opts.soft_weight > 0:
                mixed_probs = torch.where(box[:, None], probs[other], probs)

        logits = self.student(torch.cat([x_l, x_s], dim=0))
        logits_l, logits_s = logits[: x_l.shape[0]], logits[x_l.shape[0]:]
        sup = self.supervised_loss(logits_l, y_l)
        z_u = self.unsup_logits(logits_s)
        unsup = self.unsup_loss(z_u, mixed_labels, mixed_mask)
        scalars = {}
        if self.opts.soft_weight > 0:   # the (debiased) teacher's soft targets where no hard label is kept
            soft = soft_cross_entropy(z_u, mixed_probs, ~mixed_mask)
            unsup = unsup + self.opts.soft_weight * soft
            scalars["loss/soft"] = soft.detach()
        weight = self.unsup_weight(step)
        loss = sup + weight * unsup
        per_class = {"pl_share": class_share(labels_u, mask, self.num_classes), **extra}
        if isinstance(thr, torch.Tensor):
            per_class["thresholds"] = thr.detach().clone()
        return StepResult(loss, {"loss/sup": sup.detach(), "loss/unsup": unsup.detach(),
                                 "unsup_weight": weight, "mask_ratio": mask.float().mean(), **scalars},
                          per_class, labels_u, mask)
