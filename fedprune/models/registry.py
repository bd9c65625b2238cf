"""Model registry: one builder per name; a duplicate name is refused."""

from __future__ import annotations

from typing import Callable

from torch import nn

from ..config import ModelConfig

ModelBuilder = Callable[[ModelConfig, int], nn.Module]
_MODELS: dict[str, ModelBuilder] = {}

# (channels, height, width) of one example, per dataset.
INPUT_SHAPES = {"cifar10": (3, 32, 32), "mnist": (1, 28, 28)}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    def deco(fn: ModelBuilder) -> ModelBuilder:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = fn
        return fn

    return deco


def input_shape(dataset: str) -> tuple[int, int, int]:
    if dataset not in INPUT_SHAPES:
        raise ValueError(f"data.dataset={dataset!r} has no known input shape; "
                         f"known: {sorted(INPUT_SHAPES)}")
    return INPUT_SHAPES[dataset]


def build_model(cfg: ModelConfig, dataset: str = "cifar10") -> nn.Module:
    """Build ``cfg.name`` for ``dataset``'s input channels."""
    if cfg.name not in _MODELS:
        raise ValueError(f"model.name={cfg.name!r} is not registered; choose one of "
                         f"{sorted(_MODELS)}")
    return _MODELS[cfg.name](cfg, input_shape(dataset)[0])


def registered_models() -> list[str]:
    return sorted(_MODELS)
