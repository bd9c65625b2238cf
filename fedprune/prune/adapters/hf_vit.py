"""Hugging Face ViT-family image classifiers (transformers 5: ``vit.layers`` of pre-norm
``ViTLayer``: layernorm_before, attention with q/k/v_proj, layernorm_after, mlp), such as
the DeiT-S checkpoint Zero-TPrune and ToMe report on (``facebook/deit-small-patch16-224``
is a ViT in transformers). Found by the layers' shape, not the class name, so the same
adapter serves a model wrapped for fedprune's datasets (``fedprune.models.hf_image``).

Token pruning is what this family is here for (token sites from ``hf_tokens``); weight
pruning goes through the shared stack logic of the BERT-style encoders (blocks captured
from the model's own forward, pixel values or images in), so ``fedprune prune --model
cifar10:hf:FOLDER --method wanda`` works on it too.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import register_adapter_before
from .hf_encoder import HFEncoderAdapter
from .hf_tokens import encoder_flops, is_prenorm_vit_layer


@register_adapter_before("hf_decoder")  # a bare ViTModel's ``layers`` would look like one
class HFViTAdapter(HFEncoderAdapter):
    family = "hf_vit"
    description = "Hugging Face ViT/DeiT image models (pre-norm layers at *.layers)"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return hasattr(model, "config") and cls.stack_path(model) is not None

    @classmethod
    def stack_path(cls, model: nn.Module) -> str | None:
        paths = [name for name, m in model.named_modules()
                 if isinstance(m, nn.ModuleList) and len(m) > 0
                 and all(is_prenorm_vit_layer(layer) for layer in m)]
        return paths[0] if len(paths) == 1 else None

    def token_flops(self, model: nn.Module, tokens: list[int]) -> float:
        """The encoder's (``encoder_flops``) plus the patch embedding's, which every
        image pays whatever is pruned after it; the classifier head is not counted."""
        config = model.config
        patches = (config.image_size // config.patch_size) ** 2
        embed = 2 * patches * config.num_channels * config.patch_size ** 2 * config.hidden_size
        return encoder_flops(config, tokens) + embed

    @staticmethod
    def _call_model(model: nn.Module, batch: Any) -> Any:
        return model(**batch) if isinstance(batch, dict) else model(batch)
