"""Whole-volume inference: MONAI sliding windows with Gaussian blending, optional flip TTA."""
from __future__ import annotations

from typing import Sequence

import torch
from monai.inferers import sliding_window_inference
from torch import nn


@torch.no_grad()
def sliding_window_predict(model: nn.Module, image: torch.Tensor, roi_size: Sequence[int],
                           overlap: float = 0.5, sw_batch_size: int = 2, amp: bool = False,
                           tta_flip: bool = False, progress: bool = False) -> torch.Tensor:
    """Softmax probabilities of a whole volume.

    ``image`` ``(N, 1, X, Y, Z)`` on the model's device -> ``(N, C, X, Y, Z)`` float32.
    ``amp`` runs the network in bf16 autocast (CUDA only; ignored on CPU). ``tta_flip``
    averages the softmax over the 8 combinations of flips along the three axes (8x the cost).
    """
    use_amp = amp and image.device.type == "cuda"

    def predictor(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=image.device.type, dtype=torch.bfloat16, enabled=use_amp):
            return model(x).float()

    def probs_of(x: torch.Tensor) -> torch.Tensor:
        logits = sliding_window_inference(x, roi_size=tuple(roi_size), sw_batch_size=sw_batch_size,
                                          predictor=predictor, overlap=overlap, mode="gaussian",
                                          progress=progress)
        return torch.softmax(logits.float(), dim=1)

    if not tta_flip:
        return probs_of(image)
    # Mirroring TTA as nnU-Net's: the softmax of each flipped input is flipped back before
    # averaging, so every term is in the original frame and a voxel keeps its own side's label:
    # a valid TTA although left/right organs are lateralised. Caveat: nnU-Net trains with
    # mirroring, so its network tells sides apart by anatomy; our pipelines train without flips
    # (data/pipelines.py), so a mirrored volume is unseen input and may cost Dice on the paired
    # organs: measured in the README, off by default (eval.tta).
    flips = [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
    total = None
    for dims in flips:
        p = probs_of(image.flip(dims) if dims else image)
        p = p.flip(dims) if dims else p
        total = p if total is None else total + p
    return total / len(flips)
