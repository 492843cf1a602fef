"""Exponential-moving-average teacher (the "EMAN" setting of the DebiasPL paper).

The teacher's parameters *and* buffers (BatchNorm statistics included) follow the student:
θ_t <- m·θ_t + (1-m)·θ_s. Integer buffers (e.g. ``num_batches_tracked``) are copied.

Warm-up (Mean Teacher, Tarvainen & Valpola 2017): at optimiser step t the momentum is
m_t = min(m, 1 − 1/(t+1)), so the teacher starts as the student and forgets its random
initialisation at once instead of carrying m^t of it (37 % after 100 steps at m = 0.99).
The step comes from the caller, so nothing extra needs checkpointing for an exact resume.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module behind DistributedDataParallel / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


class ModelEMA(nn.Module):
    """An EMA copy of ``model``; call :meth:`update` after each optimiser step."""

    def __init__(self, model: nn.Module, momentum: float = 0.999):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"EMA momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.module = copy.deepcopy(unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def momentum_at(self, step: Optional[int]) -> float:
        """m_t = min(m, 1 − 1/(t+1)) (``step=None``: the plain momentum)."""
        if step is None:
            return self.momentum
        return min(self.momentum, 1.0 - 1.0 / (step + 1))

    @torch.no_grad()
    def update(self, model: nn.Module, step: Optional[int] = None) -> None:
        """Fold ``model`` in after optimiser step ``step`` (0-based; warm-up when given)."""
        m = self.momentum_at(step)
        student = unwrap(model).state_dict()
        for name, t in self.module.state_dict().items():
            s = student[name].detach()
            if t.dtype.is_floating_point:
                t.mul_(m).add_(s.to(t.dtype), alpha=1.0 - m)
            else:
                t.copy_(s)

    def train(self, mode: bool = True) -> "ModelEMA":
        # The teacher stays in eval mode: a parent's .train() must not let its forward passes
        # update BatchNorm statistics (those follow the student through update()).
        return super().train(False)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
