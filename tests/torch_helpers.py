"""Small torch builders shared by tests."""

from __future__ import annotations

import torch
from torch import nn


def linear(weight: list[list[float]]) -> nn.Linear:
    """A bias-free Linear holding exactly ``weight`` (out x in)."""
    w = torch.tensor(weight)
    layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    return layer
