"""Coupled structures: what must be removed together for a model to stay well formed.

A *group set* is one prunable dimension of one place in a model: the key/value heads of one
attention layer, the intermediate channels of one MLP, the output channels of one
convolution. It has ``units`` interchangeable units (heads, channels). Each unit owns slices
of several layers, its *members*: unit ``u`` owns entries ``member.index[u]`` along
``member.axis`` of ``member.module``'s (out, in) matrix ("out": rows, with the bias entries
and, for BatchNorm, the per-channel vectors; "in": columns). Removing a unit removes all its
slices at once; the rest of the model never sees a difference in shape.

``bucket > 0`` says the units come in consecutive buckets of that size that must all keep
the same count (query heads sharing one key/value head under grouped-query attention: the
attention kernel repeats each key/value head for a fixed number of query heads).

The adapter of a model family builds these (``Adapter.structure_groups``); criteria score
units, ``structured.select`` decides which to keep, ``structured.surgery`` slices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

AXES = ("out", "in")
KINDS = ("attn", "mlp", "channels")


@dataclass(frozen=True)
class Member:
    """The slices of one layer that the units of a group set own.

    ``index``: (units, width) long tensor of positions along ``axis`` of the layer's (out, in)
    matrix. For a convolution's "in" axis the positions are input *channels* (a channel owns
    all its kernel taps). ``stats``: this layer's input columns carry the group's activation
    statistics (the output projection of a head or an MLP: Wanda-sp and FLAP read them).
    """

    module: str
    axis: str
    index: torch.Tensor
    stats: bool = False

    def __post_init__(self) -> None:
        if self.axis not in AXES:
            raise ValueError(f"member {self.module!r}: axis={self.axis!r}, choose one of {AXES}")
        if self.index.dim() != 2 or self.index.dtype != torch.long:
            raise ValueError(f"member {self.module!r}: index must be a (units, width) long "
                             f"tensor, got {tuple(self.index.shape)} {self.index.dtype}")

    def positions(self, units: torch.Tensor) -> torch.Tensor:
        """Sorted positions along ``axis`` owned by ``units`` (1-D long)."""
        return self.index[units].reshape(-1).sort().values


@dataclass(frozen=True)
class GroupSet:
    """One prunable dimension of one place in the model (see the module docstring)."""

    name: str
    kind: str
    block: int
    units: int
    members: tuple[Member, ...]
    bucket: int = 0
    unit_label: str = "channel"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"group set {self.name!r}: kind={self.kind!r}, choose one of {KINDS}")
        for m in self.members:
            if m.index.shape[0] != self.units:
                raise ValueError(f"group set {self.name!r}: member {m.module!r} has "
                                 f"{m.index.shape[0]} units, expected {self.units}")
        if self.bucket and self.units % self.bucket:
            raise ValueError(f"group set {self.name!r}: {self.units} units do not split into "
                             f"buckets of {self.bucket}")

    @property
    def stats_members(self) -> list[Member]:
        return [m for m in self.members if m.stats]


def member_layout(module: nn.Module, axis: str) -> int:
    """The dimension of ``module.weight`` that ``axis`` of its (out, in) matrix is."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):  # stored (in, out)
        return 1 if axis == "out" else 0
    return 0 if axis == "out" else 1


def positions_view(module: nn.Module, native: torch.Tensor, axis: str) -> torch.Tensor:
    """``native`` (laid out like ``module.weight``) as (positions along ``axis``, rest)."""
    moved = native.movedim(member_layout(module, axis), 0)
    return moved.reshape(moved.shape[0], -1)


def params_per_unit(gs: GroupSet, modules: dict[str, nn.Module]) -> int:
    """Parameters one unit of ``gs`` owns (weights, biases, normalization vectors)."""
    total = 0
    for m in gs.members:
        module = modules[m.module]
        width = m.index.shape[1]
        weight = module.weight
        dim = member_layout(module, m.axis)
        other = weight.numel() // weight.shape[dim]  # entries per row/column (kernel taps too)
        total += width * other
        if m.axis == "out":
            total += width * sum(1 for n in ("bias",) if getattr(module, n, None) is not None)
    return total


def contiguous_index(units: int, width: int, offset: int = 0) -> torch.Tensor:
    """Unit ``u`` owns ``offset + u*width ... offset + (u+1)*width - 1``: (units, width)."""
    return offset + torch.arange(units * width, dtype=torch.long).reshape(units, width)
