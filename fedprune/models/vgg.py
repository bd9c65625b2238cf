"""VGG-11 with BatchNorm (Simonyan & Zisserman 2015, config "A"), for 32x32 inputs.

Channel counts scale with ``width`` (64 = the original); after five 2x2 pools a 32x32
input is 1x1, so the classifier is a single linear layer, as in common CIFAR ports.
"""

from __future__ import annotations

from torch import nn

from ..config import ModelConfig
from .registry import register_model

VGG11 = [1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M"]  # multiples of width


@register_model("vgg11_bn")
def vgg11_bn(cfg: ModelConfig, in_channels: int) -> nn.Module:
    layers: list[nn.Module] = []
    c_in = in_channels
    for item in VGG11:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        c_out = int(item) * cfg.width
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                   nn.ReLU(inplace=True)]
        c_in = c_out
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c_in, cfg.num_classes))
