"""Supervised baseline: Dice + cross-entropy on labeled crops only."""
from __future__ import annotations

import torch

from medseg_dpl.methods.base import Algorithm


class Supervised(Algorithm):
    name = "supervised"

    def train_step(self, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        logits = self.student(batch["image"])
        loss = self.supervised_loss(logits, batch["label"])
        return loss, {"loss/sup": loss.detach()}
