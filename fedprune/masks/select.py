"""Selection: turn scores into masks with exact kept counts.

Shared by every mask initialiser (and by pruners that score weights): the caller computes
scores, these functions pick exactly ``k`` entries. Ties are broken deterministically by a
stable sort: among equal scores the entry earlier in C order (and, globally, in the earlier
tensor) wins, so the same scores always give the same mask.
"""

from __future__ import annotations

import torch

from .core import Masks


def _check_k(k: int, numel: int, what: str) -> None:
    if not 0 <= k <= numel:
        raise ValueError(f"{what}: cannot keep {k} of {numel} entries")


def _top_flat(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries of a 1-D tensor, earliest first among ties."""
    if torch.isnan(flat).any():
        raise ValueError("scores contain NaN")
    order = torch.sort(flat, descending=True, stable=True).indices  # (n,)
    return order[:k]


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask shaped like ``scores`` with exactly ``k`` True at the largest scores."""
    _check_k(k, scores.numel(), "topk_mask")
    flat = scores.detach().reshape(-1)  # (n,)
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[_top_flat(flat, k)] = True
    return keep.view(scores.shape)


def select_per_layer(scores: dict[str, torch.Tensor], counts: dict[str, int]) -> Masks:
    """Top-``counts[name]`` entries of each tensor's scores."""
    masks = {}
    for name, score in scores.items():
        _check_k(counts[name], score.numel(), f"tensor {name!r}")
        masks[name] = topk_mask(score, counts[name])
    return masks


def select_global(scores: dict[str, torch.Tensor], k: int, min_per_layer: int = 1) -> Masks:
    """Top-``k`` entries over all tensors together; each tensor keeps at least ``min_per_layer``.

    The guaranteed entries (each tensor's best ``min_per_layer``) are taken first, the rest of
    the budget goes to the globally largest remaining scores, so no layer is cut off entirely.
    """
    names = list(scores)
    reserved = select_per_layer(scores, {n: min(min_per_layer, scores[n].numel()) for n in names})
    flat = torch.cat([scores[n].detach().reshape(-1).float() for n in names])  # (N,)
    fixed = torch.cat([reserved[n].reshape(-1) for n in names])  # (N,)
    _check_k(k, flat.numel(), "select_global")
    if k < int(fixed.sum()):
        raise ValueError(f"select_global: k={k} is below {int(fixed.sum())} reserved entries")
    free = torch.nonzero(~fixed).squeeze(1)  # (N - reserved,) indices still open
    keep = fixed.clone()
    keep[free[_top_flat(flat[free], k - int(fixed.sum()))]] = True
    masks, start = {}, 0
    for n in names:
        size = scores[n].numel()
        masks[n] = keep[start:start + size].view(scores[n].shape)
        start += size
    return masks
