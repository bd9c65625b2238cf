"""Hugging Face BERT-style encoders: blocks are ``encoder.layer`` (``BertModel``), also under
a task model's backbone (``bert.encoder.layer``, ``roberta.encoder.layer``, ...).

Prunable layers are every ``nn.Linear`` inside a layer (attention query/key/value, attention
output, intermediate, output); embeddings, the pooler and task heads are outside the blocks.
Capture and block-by-block execution are shared with the decoder adapter (``HFStackAdapter``):
block 0's call (hidden states, bidirectional attention mask, ...) is caught by a pre-hook.
"""

from __future__ import annotations

from torch import nn

from .base import register_adapter
from .hf_decoder import HFStackAdapter


@register_adapter
class HFEncoderAdapter(HFStackAdapter):
    family = "hf_encoder"
    description = "Hugging Face BERT-style encoders (encoder.layer)"

    @classmethod
    def stack_path(cls, model: nn.Module) -> str | None:
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            return None
        paths = [name for name, m in model.named_modules()
                 if (name == "encoder.layer" or name.endswith(".encoder.layer"))
                 and isinstance(m, nn.ModuleList) and len(m) > 0]
        return paths[0] if len(paths) == 1 else None
