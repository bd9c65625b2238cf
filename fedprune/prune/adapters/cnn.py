"""CNN adapter: any plain ``nn.Module`` built of Conv1d/Conv2d/Conv3d and Linear layers.

The whole model is one block (a CNN's activations are small next to an LLM's, and residual
networks have no single hidden state to hand from block to block), so every layer is
calibrated on the dense model in one forward pass.

A convolution with weight (out, in/g, kh, kw) is the matrix ``W = weight.reshape(out, -1)``
of shape (out, in*kh*kw) acting on unfolded input patches (im2col):
``rows = F.unfold(x, kernel, dilation, padding, stride)`` -> (B, in*kh*kw, L) -> (B*L, in*kh*kw),
so that ``conv(x)`` at every output position is ``rows @ W.T``. A Linear's rows are its input
reshaped to (-1, in). Grouped convolutions (g > 1, e.g. depthwise) mix different input
channels per output group, so one (in, in) Gram cannot describe them: they are refused for
methods that read calibration statistics (magnitude pruning handles them). Conv3d likewise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Adapter, Block, BlockInput, as_batches, register_adapter, to_device

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _is_hf_model(model: nn.Module) -> bool:
    return any(c.__name__ == "PreTrainedModel" for c in type(model).__mro__)


def _unfold_rows(conv: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """im2col rows (B*L, in*kh*kw) of a 1-D or 2-D convolution's input."""
    if isinstance(conv, nn.Conv1d):  # treat (B, C, L) as (B, C, 1, L)
        x = x.unsqueeze(-2) if x.dim() == 3 else x.unsqueeze(0).unsqueeze(-2)
        kernel, stride, dilation = (1, *conv.kernel_size), (1, *conv.stride), (1, *conv.dilation)
        padding = (0, conv.padding[0]) if not isinstance(conv.padding, str) else conv.padding
    else:
        x = x if x.dim() == 4 else x.unsqueeze(0)
        kernel, stride, dilation = conv.kernel_size, conv.stride, conv.dilation
        padding = conv.padding
    if isinstance(padding, str) or conv.padding_mode != "zeros":
        # "same"/"valid" or reflect/replicate/circular: pad explicitly like Conv's forward.
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        pads = conv._reversed_padding_repeated_twice  # (left, right[, top, bottom])
        x = F.pad(x, pads if len(pads) == 4 else (*pads, 0, 0), mode=mode)
        padding = 0
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    # cols: (B, in*kh*kw, L), channel-major like weight.reshape(out, -1)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (B*L, in*kh*kw)


@register_adapter
class CNNAdapter(Adapter):
    family = "cnn"
    description = "any nn.Module of Conv1d/Conv2d/Conv3d/Linear layers (whole model = one block)"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        if _is_hf_model(model):
            return False
        return any(isinstance(m, (*_CONVS, nn.Linear)) for m in model.modules())

    def blocks(self, model: nn.Module) -> list[Block]:
        return [Block(0, "", model)]

    def prunable(self, block: Block) -> dict[str, nn.Module]:
        out, seen = {}, set()
        for name, module in block.module.named_modules():
            if isinstance(module, (*_CONVS, nn.Linear)) and id(module.weight) not in seen:
                seen.add(id(module.weight))
                out[block.qualify(name)] = module
        return out

    def get_matrix(self, module: nn.Module) -> torch.Tensor:
        if isinstance(module, _CONVS):
            return module.weight.data.reshape(module.weight.shape[0], -1)  # (out, in/g*kh*kw)
        return super().get_matrix(module)

    def to_native(self, module: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
        if isinstance(module, _CONVS):
            return matrix.reshape(module.weight.shape)  # (out, in/g, kh, kw)
        return super().to_native(module, matrix)

    def from_native(self, module: nn.Module, native: torch.Tensor) -> torch.Tensor:
        if isinstance(module, _CONVS):
            return native.reshape(native.shape[0], -1)  # (out, in/g*kh*kw)
        return super().from_native(module, native)

    def layer_rows(self, module: nn.Module, inp: torch.Tensor) -> torch.Tensor:
        if isinstance(module, _CONVS):
            self.check_layer(type(module).__name__, module, needs_rows=True)
            return _unfold_rows(module, inp)
        return super().layer_rows(module, inp)

    def check_layer(self, name: str, module: nn.Module, needs_rows: bool) -> None:
        if not needs_rows or not isinstance(module, _CONVS):
            return
        if module.groups != 1:
            raise ValueError(f"layer {name!r}: grouped convolution (groups={module.groups}) has "
                             "no single input Gram; methods that read calibration statistics "
                             "cannot prune it (magnitude can)")
        if isinstance(module, nn.Conv3d):
            raise ValueError(f"layer {name!r}: Conv3d input rows are not supported; methods "
                             "that read calibration statistics cannot prune it (magnitude can)")

    def structure_groups(self, model: nn.Module, heads: str = "kv",
                         residual: str = "group") -> list:
        from .cnn_structure import cnn_groups  # torch.fx only when structure is asked for

        return cnn_groups(model, residual)

    def layer_shapes(self, model: nn.Module) -> list[dict[str, int]]:
        """One dict (the whole CNN is one block): channels per prunable channel space."""
        return [{gs.name: gs.units for gs in self.structure_groups(model)}]

    def capture_inputs(self, model: nn.Module, calib_inputs: Any,
                       device: torch.device | str) -> list[BlockInput]:
        calls = []
        for batch in as_batches(calib_inputs):
            if isinstance(batch, Mapping):
                calls.append(BlockInput((), to_device(dict(batch), device)))
            else:
                calls.append(BlockInput((to_device(batch, device),), {}))
        return calls

