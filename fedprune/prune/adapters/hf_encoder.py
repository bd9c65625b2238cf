"""Hugging Face BERT-style encoders: blocks are ``encoder.layer`` (``BertModel``), also under
a task model's backbone (``bert.encoder.layer``, ``roberta.encoder.layer``, ...).

Prunable layers are every ``nn.Linear`` inside a layer (attention query/key/value, attention
output, intermediate, output); embeddings, the pooler and task heads are outside the blocks.
Capture and block-by-block execution are shared with the decoder adapter (``HFStackAdapter``):
block 0's call (hidden states, bidirectional attention mask, ...) is caught by a pre-hook.
Token pruning installs token sites in the layers (``hf_tokens``).
"""

from __future__ import annotations

from torch import nn

from .base import register_adapter
from .hf_decoder import HFStackAdapter
from .hf_tokens import encoder_flops, install_token_sites, token_state


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

    def token_blocks(self, model: nn.Module) -> list[nn.Module]:
        path = self.stack_path(model)
        encoder = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
        return install_token_sites(model, encoder, model.get_submodule(path))

    def token_counts(self, model: nn.Module) -> list[int]:
        return list(token_state(model).tokens)

    def token_flops(self, model: nn.Module, tokens: list[int]) -> float:
        return encoder_flops(model.config, tokens)
