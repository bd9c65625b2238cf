"""Candidate pruned models for adaptive BN selection (FedTiny, Huang et al. 2023, Sec. IV-A).

The server builds ``count`` candidate masks at the same global density from the initial
model, differing in their layer-wise density allocation: uniform, ERK, global magnitude,
then seeded perturbations of the ERK allocation (each layer's target scaled by a
log-uniform factor in [1/spread, spread], rounded back to the exact global budget).
Positions inside a layer are always the largest |w|. The candidate whose model, with
BN statistics pooled from the clients, has the lowest example-weighted loss wins.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..masks import init_masks, prunable_names
from ..masks.allocate import budget, erk_densities, largest_remainder
from ..masks.init import magnitude_scores
from ..masks.select import select_per_layer

BASE = ("uniform", "erk", "global_magnitude")


def build_candidates(model: nn.Module, density: float, count: int, seed: int = 0,
                     spread: float = 2.0, exclude: Sequence[str] = ()
                     ) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """``count`` (name, masks) candidates, all keeping exactly round(density * N) weights
    of the prunable tensors outside ``exclude``."""
    if count < 1:
        raise ValueError(f"method.candidates={count} must be >= 1")
    out = [(name, init_masks(model, density, name, exclude=exclude)) for name in BASE[:count]]
    params = dict(model.named_parameters())
    weights = {n: params[n].detach() for n in prunable_names(model, exclude)}
    shapes = {n: tuple(w.shape) for n, w in weights.items()}
    numels = {n: w.numel() for n, w in weights.items()}
    base = erk_densities(shapes, density)
    gen = torch.Generator().manual_seed(seed)
    for i in range(count - len(out)):
        logs = (torch.rand(len(base), generator=gen) * 2 - 1) * math.log(spread)
        targets = [min(base[n] * math.exp(float(f)), 1.0) * numels[n]
                   for n, f in zip(base, logs)]
        counts = largest_remainder(targets, list(numels.values()), budget(numels, density))
        masks = select_per_layer(magnitude_scores(weights), dict(zip(base, counts)))
        out.append((f"erk_perturbed_{i}", masks))
    return out


def select_candidate(losses: list[list[float]], counts: list[int],
                     tie_break: Sequence[float] | None = None) -> int:
    """Index of the candidate with the lowest example-weighted loss over clients; equal
    ones are told apart by ``tie_break`` (lower wins), then by index.

    ``losses[c][k]``: client c's mean loss (or error) of candidate k; ``counts[c]``: its
    examples.
    """
    if not losses or len(losses) != len(counts):
        raise ValueError(f"{len(losses)} loss lists for {len(counts)} client counts")
    width = {len(row) for row in losses}
    if len(width) != 1:
        raise ValueError(f"clients reported losses for different numbers of candidates {width}")
    weighted = weighted_losses(losses, counts)
    second = tie_break if tie_break is not None else [0.0] * len(weighted)
    return min(range(len(weighted)), key=lambda k: (weighted[k], second[k], k))


def weighted_losses(losses: list[list[float]], counts: Sequence[int]) -> list[float]:
    """Each candidate's loss over all clients, weighted by their examples."""
    total = float(sum(counts))
    return [sum(c * row[k] for row, c in zip(losses, counts)) / total
            for k in range(len(losses[0]))]


def selection_margin(losses: list[list[float]], best: int, rival: int,
                     counts: Sequence[int] | None = None) -> dict[str, float]:
    """How sure the choice of ``best`` over ``rival`` is: the clients' per-client loss
    differences (rival - best), their mean weighted by ``counts`` (the clients' examples,
    as in ``select_candidate``, so the margin is exactly the difference of the weighted
    losses the choice was made on; equal weights when None) and its 95% t interval over
    clients (a paired comparison: a client's data difficulty cancels). ``confident`` when
    the interval excludes zero. With one client there is no interval (not confident)."""
    from ..study import weighted_mean_interval

    diffs = [row[rival] - row[best] for row in losses]
    iv = weighted_mean_interval(diffs, list(counts) if counts is not None else [1] * len(diffs))
    return {"rival": rival, "margin": iv.mean, "low": iv.low, "high": iv.high,
            "clients": iv.n, "confident": bool(iv.distinguishable and iv.mean > 0)}
