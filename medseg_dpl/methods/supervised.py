"""Supervised baseline: Dice + cross-entropy on labeled crops only.

It keeps an EMA teacher of its network although it never uses one in training, so that it is
evaluated by the same rule as FixMatch and DebiasPL (the EMA weights; an EMA alone is worth a
point or two of Dice, which would otherwise be credited to semi-supervision).
"""
from __future__ import annotations

import torch

from medseg_dpl.methods.base import Algorithm, StepResult


class Supervised(Algorithm):
    name = "supervised"
    uses_teacher = True  # evaluated with its EMA, like the SSL methods (not used in training)

    def train_step(self, batch: dict, step: int) -> StepResult:
        logits = self.student(batch["image"])
        loss = self.supervised_loss(logits, batch["label"])
        return StepResult(loss, {"loss/sup": loss.detach()})
