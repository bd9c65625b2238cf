"""Physical removal of units: slice every member layer, then let the adapter fix the config.

``remove_units_(model, groups, keep)`` takes, for each group set, the sorted indices of the
units that stay, slices each member's weight (rows or columns of its (out, in) matrix, in
the module's own layout), bias and BatchNorm vectors with ``index_select`` (new, smaller
Parameters: no mask, no zeros), updates the module's size attributes, and finally calls the
adapter's ``finish_surgery_`` to update the family's own bookkeeping (the Hugging Face config:
heads, key/value heads, intermediate size; attention modules' head counts).

``mask_units_(model, groups, keep)`` is the same decision as zeros instead of removal (rows,
columns, biases, BatchNorm scale and shift set to 0) on a model of unchanged shape: the
reference against which surgery is tested (outputs must be equal).

Every check (unknown group set, a unit index out of range, all units removed, unequal
buckets) runs before any weight is touched.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .groups import GroupSet, member_layout, positions_view

_BN_VECTORS = ("running_mean", "running_var")


def check_keep(groups: list[GroupSet], keep: Mapping[str, torch.Tensor]) -> None:
    """Raise ValueError naming the group set when ``keep`` cannot be applied."""
    known = {g.name for g in groups}
    unknown = sorted(set(keep) - known)
    if unknown:
        raise ValueError(f"keep names unknown group sets {unknown}")
    for gs in groups:
        if gs.name not in keep:
            continue
        k = keep[gs.name]
        if k.dim() != 1 or k.dtype != torch.long:
            raise ValueError(f"{gs.name}: keep must be a 1-D long tensor of unit indices")
        if k.numel() == 0:
            raise ValueError(f"{gs.name}: every {gs.unit_label} would be removed; keep at "
                             "least one (lower the ratio for this layer)")
        if k.min() < 0 or k.max() >= gs.units or k.unique().numel() != k.numel():
            raise ValueError(f"{gs.name}: keep indices must be distinct and in [0, {gs.units})")
        if gs.bucket:
            counts = torch.bincount(k // gs.bucket, minlength=gs.units // gs.bucket)
            if counts.unique().numel() != 1:
                raise ValueError(f"{gs.name}: every group of {gs.bucket} {gs.unit_label}s "
                                 f"sharing a key/value head must keep the same count; got "
                                 f"{counts.tolist()}")


def removed_units(gs: GroupSet, kept: torch.Tensor) -> torch.Tensor:
    """The units of ``gs`` not in ``kept``, ascending."""
    gone = torch.ones(gs.units, dtype=torch.bool)
    gone[kept] = False
    return gone.nonzero().flatten()


def _slice_param(module: nn.Module, name: str, dim: int, pos: torch.Tensor) -> None:
    old = getattr(module, name)
    if old is None:
        return
    new = old.data.index_select(dim, pos.to(old.device)).clone()
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        module.register_buffer(name, new)


def _resize_attrs(module: nn.Module) -> None:
    """Keep a layer's size attributes consistent with its new weight."""
    w = module.weight
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = w.shape
    elif isinstance(module, nn.modules.conv._ConvNd):
        module.out_channels = w.shape[0]
        module.in_channels = w.shape[1] * module.groups
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        module.num_features = w.shape[0]
    elif type(module).__name__ == "Conv1D":
        module.nf = w.shape[1]


def slice_member_(module: nn.Module, axis: str, pos: torch.Tensor) -> None:
    """Keep only positions ``pos`` along ``axis`` of ``module`` (in place)."""
    dim = member_layout(module, axis)
    _slice_param(module, "weight", dim, pos)
    if axis == "out":
        _slice_param(module, "bias", 0, pos)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            for name in _BN_VECTORS:
                _slice_param(module, name, 0, pos)
    _resize_attrs(module)


@torch.no_grad()
def remove_units_(model: nn.Module, groups: list[GroupSet],
                  keep: Mapping[str, torch.Tensor]) -> None:
    """Remove every unit not in ``keep[gs.name]`` (sets absent from ``keep`` stay whole)."""
    from ..adapters import adapter_for

    check_keep(groups, keep)
    modules = dict(model.named_modules())
    for gs in groups:
        if gs.name not in keep or keep[gs.name].numel() == gs.units:
            continue
        units = keep[gs.name].sort().values
        for m in gs.members:
            slice_member_(modules[m.module], m.axis, m.positions(units))
    adapter_for(model).finish_surgery_(model, groups, keep)


@torch.no_grad()
def mask_units_(model: nn.Module, groups: list[GroupSet],
                keep: Mapping[str, torch.Tensor]) -> None:
    """Zero every slice of the units not in ``keep`` (shapes unchanged)."""
    check_keep(groups, keep)
    modules = dict(model.named_modules())
    for gs in groups:
        if gs.name not in keep:
            continue
        units = removed_units(gs, keep[gs.name])
        if units.numel() == 0:
            continue
        for m in gs.members:
            module = modules[m.module]
            pos = m.positions(units).to(module.weight.device)
            module.weight.data.index_fill_(member_layout(module, m.axis), pos, 0.0)
            if m.axis == "out" and getattr(module, "bias", None) is not None:
                module.bias.data.index_fill_(0, pos, 0.0)


@torch.no_grad()
def compensate_bias_(model: nn.Module, groups: list[GroupSet], keep: Mapping[str, torch.Tensor],
                     means: Mapping[str, torch.Tensor]) -> None:
    """FLAP's bias compensation, before removal: a removed input column ``j`` of an output
    projection contributed ``W[:, j] * x_j``; its mean part ``W[:, j] * mean(x_j)`` moves into
    the bias, ``b += W[:, removed] @ mean[removed]`` (FLAP Eq. 8), so the layer's output stays
    right on average. ``means[name]``: the stats member's input column means (``col_sum/rows``).
    The layer must have a bias (``Adapter.enable_biases_`` adds zero biases where needed)."""
    modules = dict(model.named_modules())
    for gs in groups:
        if gs.name not in keep:
            continue
        units = removed_units(gs, keep[gs.name])
        for m in gs.stats_members:
            module = modules[m.module]
            if getattr(module, "bias", None) is None:
                raise ValueError(f"{m.module}: bias compensation needs a bias on this layer")
            cols = m.positions(units)
            if isinstance(module, nn.modules.conv._ConvNd):
                raise ValueError(f"{m.module}: bias compensation is for linear layers")
            w = positions_view(module, module.weight.data, "out")  # (out, in)
            mean = means[m.module].to(w.device, torch.float64)
            shift = w[:, cols].to(torch.float64) @ mean[cols]
            module.bias.add_(shift.to(module.bias.dtype))

