"""A small CNN for low-resolution images (8x8 digits up to ~64x64 folder images)."""
from __future__ import annotations

import math

import torch
from torch import nn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """``(N, in_channels, S, S)`` -> logits ``(N, num_classes)``.

    Stages of two 3x3 conv-BN-ReLU blocks; between stages a 2x2 max-pool and twice the width,
    until the feature map is about 4x4; then global average pooling, dropout and a linear layer.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int, width: int = 32,
                 dropout: float = 0.0):
        super().__init__()
        stages = max(2, int(math.log2(max(image_size, 4) / 4)) + 1)
        layers, cin = [], in_channels
        for s in range(stages):
            cout = width * 2 ** s
            if s:
                layers.append(nn.MaxPool2d(2))
            layers += [_block(cin, cout), _block(cout, cout)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(cin, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_classifier(model_cfg: dict, in_channels: int, num_classes: int,
                     image_size: int) -> SmallCNN:
    """The classifier a config's ``model`` section describes."""
    return SmallCNN(in_channels, num_classes, image_size, width=model_cfg["width"],
                    dropout=model_cfg["dropout"])
