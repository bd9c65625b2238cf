"""Binary masks over the prunable tensors of a model: which tensors, applying, counting.

A mask is a bool tensor shaped like its weight (True = kept). Prunable tensors are the
weights of ``nn.Conv1d/2d/3d`` and ``nn.Linear`` modules; BatchNorm parameters, biases and
buffers are never masked. Unstructured masking keeps the model dense in memory and computes
``w ⊙ m`` by zeroing pruned entries (``apply_masks_``) and their gradients (``mask_grads_``).
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

import torch
from torch import nn

Masks = dict[str, torch.Tensor]  # parameter name -> bool tensor shaped like the parameter

PRUNABLE_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _all_prunable(model: nn.Module) -> list[str]:
    """Weight names of conv/linear modules in module order, each parameter once."""
    names, seen = [], set()
    for prefix, module in model.named_modules():
        if not isinstance(module, PRUNABLE_MODULES):
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or id(weight) in seen:
            continue
        seen.add(id(weight))
        names.append(f"{prefix}.weight" if prefix else "weight")
    return names


def prunable_names(model: nn.Module, exclude: Sequence[str] = ()) -> list[str]:
    """Conv/linear weight names in module order, minus those matching an ``exclude`` pattern.

    A pattern that matches no conv/linear weight is a ValueError (likely a typo).
    """
    names = _all_prunable(model)
    for pattern in exclude:
        if not any(fnmatchcase(n, pattern) for n in names):
            raise ValueError(
                f"mask.exclude pattern {pattern!r} matches no prunable tensor; "
                f"prunable tensors: {names}"
            )
    return [n for n in names if not any(fnmatchcase(n, p) for p in exclude)]


def full_masks(model: nn.Module, exclude: Sequence[str] = ()) -> Masks:
    """All-True masks for every prunable tensor."""
    params = dict(model.named_parameters())
    return {
        n: torch.ones_like(params[n], dtype=torch.bool) for n in prunable_names(model, exclude)
    }


def _lookup(params: dict[str, nn.Parameter], name: str, mask: torch.Tensor) -> nn.Parameter:
    if name not in params:
        raise ValueError(f"tensor {name!r}: mask names no parameter of the model")
    param = params[name]
    if tuple(mask.shape) != tuple(param.shape):
        raise ValueError(
            f"tensor {name!r}: mask shape {tuple(mask.shape)} != parameter shape "
            f"{tuple(param.shape)}"
        )
    return param


@torch.no_grad()
def apply_masks_(model: nn.Module, masks: Masks) -> None:
    """Zero the pruned entries of each masked weight in place."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        param = _lookup(params, name, mask)
        param.masked_fill_(~mask.to(device=param.device, dtype=torch.bool), 0)


@torch.no_grad()
def mask_grads_(model: nn.Module, masks: Masks) -> None:
    """Zero ``.grad`` at pruned positions in place; parameters without a grad are skipped."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        param = _lookup(params, name, mask)
        if param.grad is not None:
            param.grad.masked_fill_(~mask.to(device=param.grad.device, dtype=torch.bool), 0)


def kept_counts(masks: Masks) -> dict[str, int]:
    """Number of kept (True) entries per tensor."""
    return {n: int(m.sum().item()) for n, m in masks.items()}


def layer_densities(masks: Masks) -> dict[str, float]:
    """Kept fraction per tensor."""
    return {n: int(m.sum().item()) / m.numel() for n, m in masks.items()}


def global_density(masks: Masks) -> float:
    """Kept fraction over all masked tensors together (1.0 when there are none)."""
    total = sum(m.numel() for m in masks.values())
    if total == 0:
        return 1.0
    return sum(kept_counts(masks).values()) / total


def check_masks(model: nn.Module, masks: Masks) -> None:
    """Raise ValueError naming the tensor on an unknown name, non-bool dtype or wrong shape."""
    params = dict(model.named_parameters())
    prunable = set(_all_prunable(model))
    for name, mask in masks.items():
        if name not in params:
            raise ValueError(f"tensor {name!r}: mask names no parameter of the model")
        if name not in prunable:
            raise ValueError(f"tensor {name!r}: not a conv/linear weight, cannot be masked")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"tensor {name!r}: mask must be a torch.bool tensor, got {got}")
        _lookup(params, name, mask)
