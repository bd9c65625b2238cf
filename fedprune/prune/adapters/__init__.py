"""Model-family adapters: all knowledge of where blocks and layers live.

Importing this package registers the families, tried in this order: HF ViT-family image
models, HF decoder-only LMs, HF BERT-style encoders, fedprune's ViT, then any CNN-like
module of conv/linear layers.
"""

from . import hf_decoder, hf_encoder, cnn, vit, hf_vit  # noqa: F401  (order matters)
from .base import (
    Adapter,
    Block,
    BlockInput,
    adapter_families,
    adapter_for,
    as_batches,
    register_adapter,
    to_device,
)

__all__ = ["Adapter", "Block", "BlockInput", "adapter_families", "adapter_for", "as_batches",
           "register_adapter", "to_device"]
