"""fedprune's own ViT (fedprune.models.vit): a CNN-like module for weight pruning (its
linear layers and patch embedding, whole model one block), plus its token sites."""

from __future__ import annotations

from torch import nn

from ...models.vit import ViT
from .base import register_adapter_before
from .cnn import CNNAdapter


@register_adapter_before("cnn")
class ViTAdapter(CNNAdapter):
    family = "vit"
    description = "fedprune's ViT (model.name=vit): weights like a CNN, plus token sites"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, ViT)

    def token_blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.blocks)

    def token_counts(self, model: nn.Module) -> list[int]:
        return list(model.last_tokens)

    def token_flops(self, model: nn.Module, tokens: list[int]) -> float:
        return model.flops(tokens)
