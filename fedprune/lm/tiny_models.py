"""Tiny random-initialized Hugging Face models and a byte tokenizer, for tests.

Every factory builds a 2-layer model of hidden size 64 with a vocabulary of
:data:`TINY_VOCAB` = 256 tokens, so that :class:`ByteTokenizer` (one token per UTF-8 byte)
feeds all of them. Weights depend only on ``seed`` (the global RNG is left as it was).
Families: LLaMA (grouped-query attention, 4 query heads sharing 2 key/value heads),
GPT-2 (``Conv1D`` layers), OPT (decoder with ``fc1``/``fc2``) and BERT (encoder).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

TINY_VOCAB = 256
HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, POSITIONS = 64, 2, 4, 2, 128, 256


class ByteTokenizer:
    """Tokenizer with one id per UTF-8 byte (ids 0..255); no special tokens."""

    name_or_path = "byte"

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode("utf-8"))}

    def get_vocab(self) -> dict[str, int]:
        return {f"<0x{i:02X}>": i for i in range(TINY_VOCAB)}

    def decode(self, ids: Any) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def _seeded(build: Callable[[], torch.nn.Module], seed: int) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    return model.float().eval()


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    """LlamaForCausalLM, GQA (4 heads, 2 KV heads), untied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         num_key_value_heads=KV_HEADS, max_position_embeddings=POSITIONS,
                         tie_word_embeddings=False)
    return _seeded(lambda: LlamaForCausalLM(config), seed)


def tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    """GPT2LMHeadModel (Conv1D projections, tied embeddings)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=TINY_VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                        n_positions=POSITIONS, n_inner=FFN)
    return _seeded(lambda: GPT2LMHeadModel(config), seed)


def tiny_opt(seed: int = 0) -> torch.nn.Module:
    """OPTForCausalLM."""
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(vocab_size=TINY_VOCAB, hidden_size=HIDDEN, ffn_dim=FFN,
                       num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                       max_position_embeddings=POSITIONS, word_embed_proj_dim=HIDDEN,
                       pad_token_id=1, bos_token_id=2, eos_token_id=2)
    return _seeded(lambda: OPTForCausalLM(config), seed)


def tiny_bert(seed: int = 0) -> torch.nn.Module:
    """BertModel (encoder, no head)."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=TINY_VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                        num_attention_heads=HEADS, intermediate_size=FFN,
                        max_position_embeddings=POSITIONS)
    return _seeded(lambda: BertModel(config), seed)


TINY_FACTORIES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "opt": tiny_opt, "bert": tiny_bert}
TINY_CAUSAL = ("llama", "gpt2", "opt")
