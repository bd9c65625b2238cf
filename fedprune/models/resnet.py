"""ResNets for 32x32 inputs.

CIFAR ResNet-8/20 follow He et al. 2016 (Sec. 4.2): a 3x3 stem, three stages of
basic blocks at widths (w, 2w, 4w), stride 2 between stages, global average pooling.
ResNet-18 is the common CIFAR variant of the ImageNet network: a 3x3 stem with no
max-pool and four stages at (w, 2w, 4w, 8w) (w=64 is the standard width).
Shortcuts that change shape use a 1x1 conv + BN ("option B"), which is prunable too.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from ..config import ModelConfig
from .registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, in_channels: int, widths: list[int], blocks: list[int],
                 num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, c_in = [], widths[0]
        for i, (width, n) in enumerate(zip(widths, blocks)):
            stride = 1 if i == 0 else 2
            stage = []
            for j in range(n):
                stage.append(BasicBlock(c_in, width, stride if j == 0 else 1))
                c_in = width
            layers.append(nn.Sequential(*stage))
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, classes)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


@register_model("resnet8")
def resnet8(cfg: ModelConfig, in_channels: int) -> nn.Module:
    w = cfg.width
    return ResNet(in_channels, [w, 2 * w, 4 * w], [1, 1, 1], cfg.num_classes)


@register_model("resnet20")
def resnet20(cfg: ModelConfig, in_channels: int) -> nn.Module:
    w = cfg.width
    return ResNet(in_channels, [w, 2 * w, 4 * w], [3, 3, 3], cfg.num_classes)


@register_model("resnet18")
def resnet18(cfg: ModelConfig, in_channels: int) -> nn.Module:
    w = cfg.width
    return ResNet(in_channels, [w, 2 * w, 4 * w, 8 * w], [2, 2, 2, 2], cfg.num_classes)
