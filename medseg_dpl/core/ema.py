"""Exponential-moving-average teacher (the "EMAN" setting of the DebiasPL paper).

The teacher's parameters *and* buffers (BatchNorm statistics included) follow the student:
θ_t <- m·θ_t + (1-m)·θ_s. Integer buffers (e.g. ``num_batches_tracked``) are copied.
"""
from __future__ import annotations

import copy

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

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        student = unwrap(model).state_dict()
        for name, t in self.module.state_dict().items():
            s = student[name].detach()
            if t.dtype.is_floating_point:
                t.mul_(self.momentum).add_(s.to(t.dtype), alpha=1.0 - self.momentum)
            else:
                t.copy_(s)

    def train(self, mode: bool = True) -> "ModelEMA":
        # The teacher stays in eval mode: a parent's .train() must not let its forward passes
        # update BatchNorm statistics (those follow the student through update()).
        return super().train(False)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
