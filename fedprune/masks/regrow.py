"""Prune-and-grow on one tensor: the single implementation every dynamic method uses.

RigL's step (Evci et al. 2020), which FedTiny's server (Huang et al. 2023, Sec. IV-B) and
FedDST's clients (Bibikar et al. 2022) both take: drop the ``k`` smallest-|w| active
weights, grow the ``k`` pruned positions with the largest growth score, grown weights start
at zero, so the tensor keeps exactly as many weights. Growth candidates are the positions
pruned *before* the step (a just-dropped weight is never re-grown) whose score is not NaN;
when fewer than ``k`` exist (FedTiny's clients report only their top-K), ``k`` shrinks to
their number on both sides. Ties go to the earlier position in C order (``topk_mask``), so
the same inputs always move the same positions.
"""

from __future__ import annotations

import torch

from .select import topk_mask


def sparse_scores(numel: int, index: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A dense (numel,) growth score: |value| at ``index``, NaN (no candidate) elsewhere."""
    score = torch.full((numel,), float("nan"), dtype=torch.float64)
    score[index.long()] = value.double().abs()
    return score


@torch.no_grad()
def prune_and_grow(weight: torch.Tensor, mask: torch.Tensor, grow_score: torch.Tensor, k: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """New (weight, mask): ``k`` (or fewer, see module doc) positions moved each way.

    ``grow_score``: one score per position, any shape with ``weight.numel()`` entries
    (e.g. |dense gradient|, or :func:`sparse_scores`). Inputs are not modified."""
    if weight.shape != mask.shape or grow_score.numel() != mask.numel():
        raise ValueError(f"weight {tuple(weight.shape)}, mask {tuple(mask.shape)} and grow "
                         f"score {tuple(grow_score.shape)} must describe one tensor")
    kept = mask.reshape(-1).to(torch.bool)  # (n,)
    active = int(kept.sum())
    if not 0 <= k <= min(active, kept.numel() - active):
        raise ValueError(f"K={k} must be in [0, min(active={active}, "
                         f"pruned={kept.numel() - active})]")
    score = grow_score.reshape(-1).to(weight.device, torch.float64)  # (n,)
    candidate = ~kept & ~torch.isnan(score)
    k = min(k, int(candidate.sum()))
    w = weight.reshape(-1).clone()  # (n,)
    drop = topk_mask((-w.abs().double()).masked_fill(~kept, float("-inf")), k)  # active only
    grow = topk_mask(score.masked_fill(~candidate, float("-inf")), k)  # candidates only
    new = (kept & ~drop) | grow
    w[~(new & kept)] = 0  # dropped, grown (start at zero), and anything pruned
    return w.view_as(weight), new.view_as(mask)
