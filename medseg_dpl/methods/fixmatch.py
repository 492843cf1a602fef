"""FixMatch for segmentation with an EMA teacher (the DebiasPL paper's "EMAN" setting).

The teacher sees the weak view; its confident voxels (max prob >= threshold) become hard
pseudo-labels for the student's strong view (same voxels). Labeled and strong-unlabeled crops
go through the student in one forward pass (one DDP forward per backward).
Subclasses change only :meth:`teacher_probs` (the pseudo-label) and :meth:`unsup_logits`.
"""
from __future__ import annotations

import torch

from medseg_dpl.core.debias import masked_cross_entropy, pseudo_labels
from medseg_dpl.methods.base import Algorithm, class_share


class FixMatch(Algorithm):
    name = "fixmatch"
    uses_unlabeled = True
    uses_teacher = True

    @torch.no_grad()
    def weak_logits(self, batch: dict) -> torch.Tensor:
        """Teacher logits of the weak view ``(U, C, *)``; in teacher mode log of the external
        probabilities (softmax of them gives them back, so debiasing applies unchanged)."""
        if "teacher_probs" in batch:
            return torch.log(batch["teacher_probs"].float().clamp_min(1e-8))
        return self.teacher(batch["image_weak"]).float()

    def teacher_probs(self, logits_w: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Probabilities to pseudo-label from (plain softmax here) and extra logs."""
        return torch.softmax(logits_w, dim=1), {}

    def unsup_logits(self, logits_s: torch.Tensor) -> torch.Tensor:
        """Logits the unsupervised cross-entropy is computed on."""
        return logits_s

    @torch.no_grad()
    def pseudo_label_probs(self, logits: torch.Tensor) -> torch.Tensor:
        return self.teacher_probs(logits.float())[0]

    def train_step(self, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        x_l, y_l = batch["image"], batch["label"]
        logits_w = self.weak_logits(batch)
        probs, extra = self.teacher_probs(logits_w)
        labels_u, mask = pseudo_labels(probs, self.cfg["method"]["threshold"])

        logits = self.student(torch.cat([x_l, batch["image_strong"]], dim=0))
        logits_l, logits_s = logits[: x_l.shape[0]], logits[x_l.shape[0]:]
        sup = self.supervised_loss(logits_l, y_l)
        unsup = masked_cross_entropy(self.unsup_logits(logits_s), labels_u, mask)
        weight = self.unsup_weight(step)
        loss = sup + weight * unsup
        logs = {"loss/sup": sup.detach(), "loss/unsup": unsup.detach(), "unsup_weight": weight,
                "mask_ratio": mask.float().mean(),
                "pl_share": class_share(labels_u, mask, self.num_classes), **extra}
        return loss, logs
