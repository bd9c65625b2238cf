"""The adapter interface: everything the pruner core knows about a model family.

A model is a list of *blocks* run one after another (a transformer's decoder layers; for a
plain CNN, the whole model is one block). Inside a block, the *prunable layers* are seen as
matrices ``W`` (out, in) acting on input rows ``x`` (rows, in), see ``fedprune.prune.base``.
An adapter answers, for its family: where the blocks are, which layers are prunable, how a
layer's weight maps to and from its (out, in) matrix, how a layer's input becomes rows, how
to capture block 0's call (args + kwargs) for calibration inputs, and how to run one block
on captured inputs to get the next block's inputs. Nothing outside ``fedprune.prune.adapters``
may know where a family keeps its layers.

``adapter_for(model)`` picks the first registered adapter whose ``matches(model)`` is true
(transformer families before the CNN fallback).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from ..structured.groups import GroupSet


@dataclass
class Block:
    """One block of a model: its position, qualified name ("" = the model itself), module."""

    index: int
    name: str
    module: nn.Module

    def qualify(self, sub: str) -> str:
        """Qualified name of ``sub`` (a name inside the block) within the model."""
        return ".".join(p for p in (self.name, sub) if p)


@dataclass
class BlockInput:
    """One calibration batch's call of a block: positional args and keyword args.

    The hidden state (the tensor the block transforms) is ``args[0]`` when there are
    positional args, else ``kwargs["hidden_states"]``; everything else (attention mask,
    position embeddings, position ids) is passed through unchanged from block to block.
    """

    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def hidden(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def with_hidden(self, hidden: torch.Tensor) -> BlockInput:
        """The same call with the hidden state replaced (the next block's input)."""
        if self.args:
            return BlockInput((hidden, *self.args[1:]), self.kwargs)
        return BlockInput((), {**self.kwargs, "hidden_states": hidden})


def to_device(obj: Any, device: torch.device | str) -> Any:
    """``obj`` with every tensor inside (tuples, lists, dicts) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def as_batches(calib_inputs: Any) -> list[Any]:
    """Calibration inputs as a list of batches; one tensor or one mapping is one batch."""
    if calib_inputs is None:
        raise ValueError("this pruning method needs calibration inputs; got calib_inputs=None")
    if isinstance(calib_inputs, (torch.Tensor, Mapping)):
        return [calib_inputs]
    batches = list(calib_inputs) if isinstance(calib_inputs, Iterable) else None
    if not batches:
        raise ValueError("calib_inputs must be a tensor, a mapping of model kwargs, or a "
                         f"non-empty sequence of those; got {type(calib_inputs).__name__}")
    return batches


class Adapter(ABC):
    """Model-family knowledge for the pruner core. Stateless: one instance serves any model
    of the family. Default layer handling covers ``nn.Linear`` (matrix = weight)."""

    family: ClassVar[str] = ""
    description: ClassVar[str] = ""

    @classmethod
    @abstractmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether this adapter handles ``model``."""

    @abstractmethod
    def blocks(self, model: nn.Module) -> list[Block]:
        """The model's blocks in execution order."""

    @abstractmethod
    def prunable(self, block: Block) -> dict[str, nn.Module]:
        """Prunable layers of ``block`` by qualified name (within the model), in order."""

    @abstractmethod
    def capture_inputs(self, model: nn.Module, calib_inputs: Any,
                       device: torch.device | str) -> list[BlockInput]:
        """Block 0's call for each calibration batch, tensors on ``device``."""

    # ---- layers -------------------------------------------------------------------------

    def get_matrix(self, module: nn.Module) -> torch.Tensor:
        """The layer's weight as a matrix (out, in); a view where possible."""
        if isinstance(module, nn.Linear):
            return module.weight.data
        raise TypeError(f"{self.family} adapter: cannot prune a {type(module).__name__}")

    def to_native(self, module: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
        """A tensor (out, in) laid out like ``module.weight`` (same mapping as get_matrix)."""
        if isinstance(module, nn.Linear):
            return matrix
        raise TypeError(f"{self.family} adapter: cannot prune a {type(module).__name__}")

    def from_native(self, module: nn.Module, native: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`to_native`: a tensor laid out like ``module.weight`` (a
        mask, say) as the (out, in) matrix."""
        if isinstance(module, nn.Linear):
            return native
        raise TypeError(f"{self.family} adapter: cannot prune a {type(module).__name__}")

    @torch.no_grad()
    def set_matrix_(self, module: nn.Module, matrix: torch.Tensor) -> None:
        """Write ``matrix`` (out, in) into ``module.weight`` in place (dtype and device kept)."""
        weight = module.weight
        weight.copy_(self.to_native(module, matrix).to(device=weight.device, dtype=weight.dtype))

    def layer_rows(self, module: nn.Module, inp: torch.Tensor) -> torch.Tensor:
        """The layer's input as rows (rows, in) such that output rows = rows @ matrix.T."""
        if isinstance(module, nn.Linear):
            return inp.reshape(-1, module.in_features)  # (B*T, in)
        raise TypeError(f"{self.family} adapter: cannot prune a {type(module).__name__}")

    def check_layer(self, name: str, module: nn.Module, needs_rows: bool) -> None:
        """Raise ValueError naming ``name`` when the layer cannot be pruned as asked
        (``needs_rows``: the method reads calibration statistics of its inputs)."""

    # ---- tokens (token pruning and merging: fedprune.prune.tokens) --------------------------

    def token_blocks(self, model: nn.Module) -> list[nn.Module]:
        """The model's transformer blocks, each able to run a token reducer between its
        attention and its MLP (``reducer``, ``record``, ``proportional``, and the
        ``last_attention`` / ``last_keys`` of its last forward pass)."""
        raise ValueError(f"{self.family} adapter: token pruning needs a transformer whose "
                         f"attention probabilities can be read; {type(model).__name__} "
                         "has none (supported: fedprune's ViT, model.name=vit, Hugging "
                         "Face BERT-style encoders and ViT/DeiT image classifiers)")

    def token_counts(self, model: nn.Module) -> list[int]:
        """Tokens entering each token block in the last forward pass, then those leaving
        the last block."""
        self.token_blocks(model)
        raise NotImplementedError

    def token_flops(self, model: nn.Module, tokens: list[int]) -> float:
        """FLOPs (multiply-accumulates x 2) of one example given ``token_counts``."""
        self.token_blocks(model)
        raise NotImplementedError

    # ---- structure (structured and depth pruning) -----------------------------------------

    def structure_groups(self, model: nn.Module, heads: str = "kv",
                         residual: str = "group") -> list[GroupSet]:
        """The model's coupled structures (``fedprune.prune.structured.groups``): ``heads``
        picks the attention unit under GQA, ``residual`` whether channels tied by a residual
        addition are pruned together ("group") or left alone ("skip")."""
        raise ValueError(f"{self.family} adapter: structured pruning is not supported for "
                         f"{type(model).__name__}")

    def finish_surgery_(self, model: nn.Module, groups: list[GroupSet],
                        keep: Mapping[str, torch.Tensor]) -> None:
        """Update the family's bookkeeping (config, head counts) after units were removed."""

    def layer_shapes(self, model: nn.Module) -> list[dict[str, int]]:
        """Per block, the sizes structured pruning changes (heads, channels, ...)."""
        raise ValueError(f"{self.family} adapter: structured pruning is not supported for "
                         f"{type(model).__name__}")

    def enable_biases_(self, model: nn.Module) -> None:
        """Give every layer a structured pruner touches a bias (zeros where it had none)."""
        raise ValueError(f"{self.family} adapter: cannot add biases to {type(model).__name__}")

    def drop_blocks_(self, model: nn.Module, keep: list[int]) -> None:
        """Keep only the blocks ``keep`` (depth pruning), config updated."""
        raise ValueError(f"{self.family} adapter: depth pruning is not supported for "
                         f"{type(model).__name__}")

    # ---- blocks -------------------------------------------------------------------------

    def run_block(self, block: Block, inp: BlockInput) -> torch.Tensor:
        """Run ``block`` on one captured call; return its output hidden state."""
        out = block.module(*inp.args, **inp.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out  # some layers return tuples

    def next_input(self, inp: BlockInput, out: torch.Tensor) -> BlockInput:
        """The next block's call, given this block's call and output."""
        return inp.with_hidden(out)


_ADAPTERS: list[type[Adapter]] = []


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Register an adapter class; earlier registrations are tried first. Duplicates refused."""
    if not cls.family or any(a.family == cls.family for a in _ADAPTERS):
        raise ValueError(f"adapter family {cls.family!r} is empty or already registered")
    _ADAPTERS.append(cls)
    return cls


def register_adapter_before(family: str):
    """Register an adapter class to be tried just before ``family``'s (a more specific
    kind of that family, e.g. the ViT among CNN-like modules)."""
    def deco(cls: type[Adapter]) -> type[Adapter]:
        register_adapter(cls)
        _ADAPTERS.remove(cls)
        at = next(i for i, a in enumerate(_ADAPTERS) if a.family == family)
        _ADAPTERS.insert(at, cls)
        return cls
    return deco


def adapter_families() -> list[str]:
    return [a.family for a in _ADAPTERS]


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for ``model``'s family; ValueError naming the class and the families."""
    for cls in _ADAPTERS:
        if cls.matches(model):
            return cls()
    supported = "; ".join(f"{a.family}: {a.description}" for a in _ADAPTERS)
    raise ValueError(f"no pruning adapter for model class {type(model).__name__}; "
                     f"supported families: {supported}")

