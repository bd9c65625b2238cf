"""A small ConvNet with BatchNorm for MNIST-sized inputs (28x28, any channel count).

Two 5x5 conv-BN-ReLU-maxpool stages (w, 2w channels) and a two-layer classifier; the
shape LeNet-style federated benchmarks use (McMahan et al. 2017's "CNN"), plus BN.
"""

from __future__ import annotations

from torch import nn

from ..config import ModelConfig
from .registry import register_model


@register_model("convnet")
def convnet(cfg: ModelConfig, in_channels: int) -> nn.Module:
    w = cfg.width
    return nn.Sequential(
        nn.Conv2d(in_channels, w, 5, padding=2, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
        nn.MaxPool2d(2),  # 28 -> 14
        nn.Conv2d(w, 2 * w, 5, padding=2, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(),
        nn.MaxPool2d(2),  # 14 -> 7
        nn.Flatten(),
        nn.Linear(2 * w * 7 * 7, 8 * w), nn.ReLU(),
        nn.Linear(8 * w, cfg.num_classes),
    )
