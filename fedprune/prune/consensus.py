"""Combining clients' locally pruned layers on the server (Flower-free).

Two published federated protocols for LLM pruning, per layer (an (out, in) matrix), at a
``SparsityTarget`` whose comparison group is the layer, the output row, or N:M groups:

``mask_vote`` (FedPrLLM, Guo et al. 2025): every client prunes on its own data and sends
only its mask. A position's score is the number of clients that kept it; the server keeps
the top-k of each group and applies the mask to its dense weights (optionally scaling
each kept weight by the fraction of clients that kept it, the paper's "weight scaling",
off by default: the paper finds it worse).

``l0_average`` (FedSpaLLM, Bai et al. 2025): every client prunes and sends its kept
weights. Each position is averaged over the clients that kept it ("l0-norm
aggregation"): w[j] = sum_c m_c[j] w_c[j] / sum_c m_c[j], 0 where no client kept it. The
union of the clients' masks keeps more than the target, so the mask is then cut back to
the exact target per group (the paper's adaptive mask expansion): positions kept by fewer
clients go first. N:M is re-imposed the same way, per group of M.

Ties (where the sources are silent or random, see experiments/notes/
fedllm_references.md): among equal vote counts the larger |weight| (the server's dense
weight for mask_vote, the averaged weight for l0_average) is kept, then the earlier
position in C order. Votes are unweighted counts, as in both sources.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..masks.select import select_target
from .base import SparsityTarget


def _check(masks: Sequence[torch.Tensor], shape: torch.Size, what: str) -> torch.Tensor:
    """The clients' masks stacked (C, out, in) as bool, each checked against ``shape``."""
    if not masks:
        raise ValueError(f"{what}: no client masks")
    for i, m in enumerate(masks):
        if m.dtype != torch.bool or m.shape != shape:
            raise ValueError(f"{what}: client {i}'s mask is {m.dtype} {tuple(m.shape)}, "
                             f"expected torch.bool {tuple(shape)}")
    return torch.stack(list(masks))


def lexicographic(votes: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Scores ordering by ``votes`` (integers) first, then by ``magnitude``: votes plus a
    tie-break in [0, 0.5), exact in float64 while votes stay integers."""
    mag = magnitude.detach().abs().double()
    top = float(mag.max()) if mag.numel() else 0.0
    return votes.double() + (0.5 * mag / (top * (1 + 1e-9)) if top > 0 else 0.0 * mag)


@torch.no_grad()
def mask_vote(masks: Sequence[torch.Tensor], weight: torch.Tensor, target: SparsityTarget,
              scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, mask) of one layer from the clients' keep-masks and the dense ``weight``."""
    stacked = _check(masks, weight.shape, "mask_vote")
    return vote_select(stacked.sum(0), len(masks), weight, target, scale)


@torch.no_grad()
def vote_select(votes: torch.Tensor, clients: int, weight: torch.Tensor,
                target: SparsityTarget, scale: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``mask_vote`` from the vote counts (clients keeping each position) of ``clients``
    clients, e.g. accumulated one client at a time."""
    mask = select_target(lexicographic(votes, weight), target)
    new = weight.masked_fill(~mask, 0)
    if scale:
        new = new * (votes.to(weight.dtype) / clients)
    return new, mask


@torch.no_grad()
def l0_average(weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor],
               target: SparsityTarget) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, mask) of one layer from the clients' pruned weights and their masks."""
    if len(weights) != len(masks) or not weights:
        raise ValueError(f"l0_average: {len(weights)} weights for {len(masks)} masks")
    shape = weights[0].shape
    stacked = _check(masks, shape, "l0_average")
    if any(w.shape != shape for w in weights):
        shapes = [tuple(w.shape) for w in weights]
        raise ValueError(f"l0_average: client weights of shapes {shapes}")
    values = torch.stack([w.double() for w in weights]).masked_fill(~stacked, 0)
    return l0_select(values.sum(0), stacked.sum(0), target, weights[0].dtype)


@torch.no_grad()
def l0_select(total: torch.Tensor, count: torch.Tensor, target: SparsityTarget,
              dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``l0_average`` from the sum of the kept values (float64) and the keep counts."""
    average = torch.where(count > 0, total / count.clamp(min=1), torch.zeros((), dtype=total.dtype))
    mask = select_target(lexicographic(count, average), target)
    return average.masked_fill(~mask, 0).to(dtype), mask
