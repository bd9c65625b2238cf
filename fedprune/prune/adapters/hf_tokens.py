"""Token sites in Hugging Face transformer layers, BERT-style encoders (``encoder.layer``,
post-norm) and ViT/DeiT image models (``vit.layers``, pre-norm): what the token pruners of
``fedprune.prune.tokens`` need from a block, installed without changing a weight or a
state-dict key.

Each layer's ``forward`` is replaced (an instance attribute, so ``state_dict`` names stay
the model's) by one that runs the layer's own attention, keeps its probabilities and keys
(``last_attention`` (B, H, N, N), ``last_keys`` (B, H, N, d)), calls the block's
``reducer`` on the residual stream between attention and feed-forward (where ToMe and
Zero-TPrune change the token set), and runs the layer's own feed-forward on what is left.
``sizes`` (tokens merged into each token) travel in a per-model state reset at each
encoder call; with ``proportional`` on they enter attention as an additive log(size) mask
(ToMe's proportional attention). The state also records the tokens entering each layer and
leaving the last, for FLOPs, and the final sizes, for size-weighted mean pooling.

Limits, checked with a clear error: the batch must be unpadded (every sequence the same
length; batch sentences of equal length together), the encoder must not run
cross-attention, and the attention implementation must return probabilities (``eager``:
fused kernels such as ``sdpa`` return none).
"""

from __future__ import annotations

from types import MethodType

import torch
from torch import nn

_STATE = "_fedprune_token_state"


class TokenState:
    """Per-model token bookkeeping of the current forward pass."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sizes: torch.Tensor | None = None  # (B, N, 1)
        self.tokens: list[int] = []  # entering each layer, then leaving the last


def _check_unpadded(mask: torch.Tensor | None) -> None:
    if mask is None:
        return
    open_ = mask.all() if mask.dtype == torch.bool else (mask == 0).all()
    if not bool(open_):
        raise ValueError("token pruning on a BERT-style encoder needs unpadded batches (every "
                         "sequence the same length, attention_mask all ones): batch "
                         "sentences of equal token length together")


def _enter(self, hidden_states: torch.Tensor, attention_mask) -> torch.Tensor | None:
    """Token bookkeeping on entering a layer; the additive attention mask to use."""
    state: TokenState = getattr(self, _STATE)
    b, n, _ = hidden_states.shape
    if state.sizes is None:
        _check_unpadded(attention_mask)
        state.sizes = hidden_states.new_ones(b, n, 1)
    state.tokens.append(n)
    return state.sizes.log().view(b, 1, 1, n) if self.proportional else None


def _reduce(self, stream: torch.Tensor, probs: torch.Tensor | None) -> torch.Tensor:
    """Keep what the reducer needs, run it on the residual stream between attention and
    the feed-forward, and count the tokens leaving the last layer."""
    state: TokenState = getattr(self, _STATE)
    if self.reducer is not None or self.record:
        if probs is None:
            impl = getattr(self._fedprune_config, "_attn_implementation", "?")
            raise ValueError(f"token pruning reads attention probabilities, and this model's "
                             f"attention implementation ({impl!r}) returns none: load it with "
                             "attn_implementation='eager' (fedprune.lm.load_encoder(..., "
                             "attn_implementation='eager'))")
        self.last_attention, self.last_keys = probs, self._fedprune_keys
    if self.reducer is not None:
        stream, state.sizes = self.reducer(self, stream, state.sizes)
    if not self.record:
        self.last_attention = self.last_keys = None
    self._fedprune_keys = None
    if self is self._fedprune_last:
        state.tokens.append(stream.shape[1])
    return stream


def _bert_site_forward(self, hidden_states: torch.Tensor, attention_mask=None,
                       encoder_hidden_states=None, *args, **kwargs) -> torch.Tensor:
    """Post-norm BERT layer: the attention block's output (its own residual and LayerNorm
    included) is the stream the reducer shrinks."""
    if encoder_hidden_states is not None:
        raise ValueError("token pruning does not support cross-attention encoder layers")
    mask = _enter(self, hidden_states, attention_mask)
    out, probs = self.attention(hidden_states, mask)
    return self.feed_forward_chunk(_reduce(self, out, probs))


def _prenorm_site_forward(self, hidden_states: torch.Tensor, attention_mask=None,
                          **kwargs) -> torch.Tensor:
    """Pre-norm ViT layer (transformers 5: layernorm_before, attention, layernorm_after,
    mlp): the stream after the attention's residual addition is what the reducer shrinks,
    as in fedprune's own ViT."""
    mask = _enter(self, hidden_states, attention_mask)
    out, probs = self.attention(self.layernorm_before(hidden_states), mask)
    stream = _reduce(self, hidden_states + self.dropout(out), probs)
    return stream + self.dropout(self.mlp(self.layernorm_after(stream)))


def _keep_keys(layer: nn.Module, heads: int):
    def hook(module, inputs, output):
        b, n, _ = output.shape
        layer._fedprune_keys = output.view(b, n, heads, -1).transpose(1, 2)
    return hook


def is_prenorm_vit_layer(layer: nn.Module) -> bool:
    """A transformers-5 ViT layer: layernorm_before, attention.k_proj, layernorm_after, mlp."""
    return all(hasattr(layer, a) for a in ("layernorm_before", "layernorm_after", "mlp")) \
        and hasattr(getattr(layer, "attention", None), "k_proj")


def _site_kind(layer: nn.Module) -> tuple | None:
    """(site forward, key projection, heads, config) of a supported layer, else None."""
    attention = getattr(layer, "attention", None)
    if hasattr(layer, "feed_forward_chunk") and hasattr(attention, "self"):
        own = attention.self
        return _bert_site_forward, own.key, own.num_attention_heads, getattr(own, "config", None)
    if is_prenorm_vit_layer(layer):
        return (_prenorm_site_forward, attention.k_proj, attention.num_attention_heads,
                getattr(attention, "config", None))
    return None


def install_token_sites(model: nn.Module, encoder: nn.Module, layers: nn.ModuleList
                        ) -> list[nn.Module]:
    """Give every layer of ``layers`` (the ``encoder``'s) a token site, once per model."""
    if getattr(model, _STATE, None) is not None:
        return list(layers)
    kinds = [_site_kind(layer) for layer in layers]
    for i, (layer, kind) in enumerate(zip(layers, kinds)):
        if kind is None:
            raise ValueError(f"layer {i} ({type(layer).__name__}) is neither a BERT-style layer "
                             "(attention.self + feed_forward_chunk) nor a pre-norm ViT layer "
                             "(layernorm_before, attention.k_proj, layernorm_after, mlp): no "
                             "token site for it")
    state = TokenState()
    object.__setattr__(model, _STATE, state)  # not a submodule: no state-dict entry
    encoder.register_forward_pre_hook(lambda module, args: state.reset())
    for layer, (forward, key, heads, config) in zip(layers, kinds):
        object.__setattr__(layer, _STATE, state)
        object.__setattr__(layer, "_fedprune_last", layers[-1])
        object.__setattr__(layer, "_fedprune_config", config)
        layer.reducer, layer.record, layer.proportional = None, False, False
        layer.last_attention = layer.last_keys = layer._fedprune_keys = None
        key.register_forward_hook(_keep_keys(layer, heads))
        layer.forward = MethodType(forward, layer)
    return list(layers)


def token_state(model: nn.Module) -> TokenState:
    state = getattr(model, _STATE, None)
    if state is None:
        raise ValueError("the model has no token sites: attach a token pruner first")
    return state


def encoder_flops(config, tokens: list[int]) -> float:
    """Multiply-accumulates x 2 of one sequence through the encoder layers, given the
    tokens entering each layer and leaving the last (attention on a layer's input, the
    feed-forward on what its reducer left). Embedding lookups cost none; pooling is not
    counted."""
    layers = config.num_hidden_layers
    if len(tokens) != layers + 1:
        raise ValueError(f"encoder FLOPs need {layers + 1} token counts (each layer's input "
                         f"and the last layer's output), got {len(tokens)}")
    d, ff, total = config.hidden_size, config.intermediate_size, 0.0
    for i in range(layers):
        n, after = tokens[i], tokens[i + 1]
        total += 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d  # qkv, scores, out
        total += 2 * 2 * after * d * ff
    return total
