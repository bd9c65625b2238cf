"""Hugging Face transformer stacks, and the decoder-only LM adapter.

Blocks are the decoder layers: ``model.layers`` (Llama, SmolLM, Qwen2, Mistral: ``*ForCausalLM``
wraps them as ``model.model.layers``), ``model.decoder.layers`` (OPT), ``transformer.h``
(GPT-2). Prunable layers are every ``nn.Linear`` and GPT-2 ``Conv1D`` inside a block
(attention q/k/v/o or c_attn/c_proj, MLP); embeddings, final norms and ``lm_head`` live
outside the blocks and are never touched. GPT-2's ``Conv1D`` stores its weight as (in, out)
and computes ``x @ weight``: its matrix is ``weight.T`` and is written back transposed.

Block 0's inputs are captured the way the reference Wanda/SparseGPT ``Catcher`` does, but
without replacing the layer: a forward pre-hook (with kwargs) on block 0 stores the call's
args and kwargs (hidden states, attention mask, rotary ``position_embeddings``, position ids,
``use_cache=False``) and raises a private exception that stops the forward pass, so nothing
after the embeddings runs. Every later block is called with the same kwargs and the previous
block's output as hidden state. In transformers 5.x decoder layers return a tensor; older
versions return a tuple whose first entry is the hidden state: both are handled.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .base import Adapter, Block, BlockInput, as_batches, register_adapter, to_device
from .hf_structure import (
    block_groups,
    drop_blocks_,
    enable_biases_,
    layer_shape,
    set_block_attrs_,
    write_config_,
)


class _BlockZeroReached(Exception):
    """Raised by the capture hook to stop the forward pass at block 0."""


def _is_hf_model(model: nn.Module) -> bool:
    return any(c.__name__ == "PreTrainedModel" for c in type(model).__mro__)


def _conv1d_type() -> type:
    from transformers.pytorch_utils import Conv1D  # lazy: only HF models reach here

    return Conv1D


class HFStackAdapter(Adapter):
    """Shared logic of HF transformer stacks: a ModuleList of layers found at a known path."""

    @classmethod
    def stack_path(cls, model: nn.Module) -> str | None:
        """Dotted path of the ModuleList of blocks, or None when the model has none."""
        raise NotImplementedError

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return _is_hf_model(model) and cls.stack_path(model) is not None

    def blocks(self, model: nn.Module) -> list[Block]:
        path = self.stack_path(model)
        if path is None:
            raise ValueError(f"{type(model).__name__} has no {self.family} block stack")
        return [Block(i, f"{path}.{i}", layer)
                for i, layer in enumerate(model.get_submodule(path))]

    def prunable(self, block: Block) -> dict[str, nn.Module]:
        kinds = (nn.Linear, _conv1d_type())
        return {block.qualify(name): m for name, m in block.module.named_modules()
                if isinstance(m, kinds)}

    def get_matrix(self, module: nn.Module) -> torch.Tensor:
        if isinstance(module, _conv1d_type()):
            return module.weight.data.T  # (in, out) stored -> (out, in)
        return super().get_matrix(module)

    def to_native(self, module: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
        if isinstance(module, _conv1d_type()):
            return matrix.T  # (out, in) -> (in, out) as stored
        return super().to_native(module, matrix)

    def from_native(self, module: nn.Module, native: torch.Tensor) -> torch.Tensor:
        if isinstance(module, _conv1d_type()):
            return native.T  # (in, out) as stored -> (out, in)
        return super().from_native(module, native)

    def layer_rows(self, module: nn.Module, inp: torch.Tensor) -> torch.Tensor:
        if isinstance(module, _conv1d_type()):
            return inp.reshape(-1, module.weight.shape[0])  # (B*T, in)
        return super().layer_rows(module, inp)

    def capture_inputs(self, model: nn.Module, calib_inputs: Any,
                       device: torch.device | str) -> list[BlockInput]:
        first = self.blocks(model)[0].module
        calls: list[BlockInput] = []

        def catch(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            calls.append(BlockInput(to_device(args, device), to_device(kwargs, device)))
            raise _BlockZeroReached

        model_device = _input_device(model)
        handle = first.register_forward_pre_hook(catch, with_kwargs=True)
        try:
            for batch in as_batches(calib_inputs):
                try:
                    self._call_model(model, to_device(batch, model_device))
                except _BlockZeroReached:
                    continue
                raise RuntimeError(f"{type(model).__name__}: the forward pass never reached "
                                   "block 0")
        finally:
            handle.remove()
        return calls

    def structure_groups(self, model: nn.Module, heads: str = "kv",
                         residual: str = "group") -> list:
        # a transformer's residual stream is its hidden size, which is never pruned here
        return [gs for block in self.blocks(model) for gs in block_groups(block, heads)]

    def finish_surgery_(self, model: nn.Module, groups: list, keep: Mapping) -> None:
        blocks = self.blocks(model)
        for block in blocks:
            set_block_attrs_(block)
        write_config_(model.config, blocks)

    def layer_shapes(self, model: nn.Module) -> list[dict[str, int]]:
        return [layer_shape(block) for block in self.blocks(model)]

    def enable_biases_(self, model: nn.Module) -> None:
        enable_biases_(model, self.blocks(model))

    def drop_blocks_(self, model: nn.Module, keep: list[int]) -> None:
        n = len(self.blocks(model))
        if not keep or any(not 0 <= i < n for i in keep) or sorted(set(keep)) != list(keep):
            raise ValueError(f"blocks to keep must be distinct, ascending, in [0, {n}), and "
                             f"at least one; got {keep}")
        drop_blocks_(model, self.stack_path(model), list(keep))

    @staticmethod
    def _call_model(model: nn.Module, batch: Any) -> Any:
        """Run the model on one batch (input_ids tensor or mapping of kwargs), no KV cache."""
        kwargs = dict(batch) if isinstance(batch, Mapping) else {"input_ids": batch}
        return model(**kwargs, use_cache=False)


def _input_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go: its token embedding's device, else (a ViT's patch
    embedding is a module with no ``weight``; a wrapper may have no embeddings at all) its
    first parameter's."""
    get = getattr(model, "get_input_embeddings", None)
    weight = getattr(get(), "weight", None) if callable(get) else None
    return weight.device if isinstance(weight, torch.Tensor) else \
        next(model.parameters()).device


_DECODER_PATHS = ("model.layers", "model.decoder.layers", "transformer.h",
                  "layers", "decoder.layers", "h")


@register_adapter
class HFDecoderAdapter(HFStackAdapter):
    family = "hf_decoder"
    description = ("Hugging Face decoder-only LMs: Llama/SmolLM/Qwen2/Mistral (model.layers), "
                   "OPT (model.decoder.layers), GPT-2 (transformer.h)")

    @classmethod
    def stack_path(cls, model: nn.Module) -> str | None:
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            return None
        for path in _DECODER_PATHS:
            try:
                stack = model.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(stack, nn.ModuleList) and len(stack) > 0:
                return path
        return None
