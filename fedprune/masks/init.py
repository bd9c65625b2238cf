"""Mask initialisation at a target density: one registered function per method.

Each method composes the shared steps: allocation (per-layer kept counts, ``allocate.py``),
scores (``|w|`` or seeded uniform noise), selection (top-k per layer or global,
``select.py``). Applying the masks to the weights is left to ``apply_masks_``.

- ``dense``: all ones; the density is ignored.
- ``uniform``: every layer keeps ``density`` of its weights, the largest ``|w|``.
- ``erk``: Erdős–Rényi-Kernel allocation (Evci et al. 2020, RigL), largest ``|w|`` per layer.
- ``global_magnitude``: the largest ``|w|`` over all prunable tensors together (each layer
  keeps at least its single largest weight, so no layer is cut off).
- ``random``: uniform allocation, positions uniformly at random (seeded).

Every method except ``dense`` keeps exactly ``round(density * N)`` of the ``N`` prunable
weights, and each layer keeps at least one.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import MappingProxyType
from typing import Callable

import torch
from torch import nn

from .allocate import budget, check_density, erk_counts, uniform_counts
from .core import Masks, prunable_names
from .select import select_global, select_per_layer

# (weights by name, density, seeded CPU generator) -> masks
MaskInit = Callable[[dict[str, torch.Tensor], float, torch.Generator], Masks]
_MASK_INITS: dict[str, MaskInit] = {}
MASK_INITS = MappingProxyType(_MASK_INITS)  # read-only view: name -> initialiser


def register_mask_init(name: str) -> Callable[[MaskInit], MaskInit]:
    """Register a mask initialiser under ``name``; a duplicate name is refused."""
    def deco(fn: MaskInit) -> MaskInit:
        if name in _MASK_INITS:
            raise ValueError(f"mask initialiser {name!r} is already registered")
        _MASK_INITS[name] = fn
        return fn

    return deco


def mask_init_names() -> list[str]:
    """Registered initialiser names, sorted."""
    return sorted(_MASK_INITS)


def get_mask_init(name: str) -> MaskInit:
    """Look up an initialiser; an unknown name lists the valid ones."""
    if name not in _MASK_INITS:
        raise ValueError(f"mask.init={name!r} is not registered; choose one of "
                         f"{mask_init_names()}")
    return _MASK_INITS[name]


# ----------------------------------------------------------------------------- scores


def magnitude_scores(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``|w|`` per tensor (float32)."""
    return {n: w.detach().abs().float() for n, w in weights.items()}


def random_scores(weights: dict[str, torch.Tensor], generator: torch.Generator
                  ) -> dict[str, torch.Tensor]:
    """Uniform noise per tensor, drawn on CPU in tensor order (device-independent)."""
    return {n: torch.rand(w.shape, generator=generator).to(w.device) for n, w in weights.items()}


def _numels(weights: dict[str, torch.Tensor]) -> dict[str, int]:
    return {n: w.numel() for n, w in weights.items()}


# ----------------------------------------------------------------------------- methods


@register_mask_init("dense")
def dense_init(weights: dict[str, torch.Tensor], density: float, generator: torch.Generator
               ) -> Masks:
    return {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}


@register_mask_init("uniform")
def uniform_init(weights: dict[str, torch.Tensor], density: float, generator: torch.Generator
                 ) -> Masks:
    return select_per_layer(magnitude_scores(weights), uniform_counts(_numels(weights), density))


@register_mask_init("erk")
def erk_init(weights: dict[str, torch.Tensor], density: float, generator: torch.Generator
             ) -> Masks:
    shapes = {n: tuple(w.shape) for n, w in weights.items()}
    return select_per_layer(magnitude_scores(weights), erk_counts(shapes, density))


@register_mask_init("global_magnitude")
def global_magnitude_init(weights: dict[str, torch.Tensor], density: float,
                          generator: torch.Generator) -> Masks:
    return select_global(magnitude_scores(weights), budget(_numels(weights), density))


@register_mask_init("random")
def random_init(weights: dict[str, torch.Tensor], density: float, generator: torch.Generator
                ) -> Masks:
    scores = random_scores(weights, generator)
    return select_per_layer(scores, uniform_counts(_numels(weights), density))


# ----------------------------------------------------------------------------- entry point


def init_masks(model: nn.Module, density: float, method: str, seed: int = 0,
               exclude: Sequence[str] = ()) -> Masks:
    """Masks for ``model``'s prunable tensors at global ``density`` by ``method``."""
    check_density(density)
    init = get_mask_init(method)
    params = dict(model.named_parameters())
    weights = {n: params[n].detach() for n in prunable_names(model, exclude)}
    if not weights:
        return {}
    generator = torch.Generator().manual_seed(seed)
    return init(weights, density, generator)
