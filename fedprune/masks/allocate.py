"""Allocation: how many weights each prunable tensor keeps at a global density.

The global budget is ``K = round(density * N)`` over the ``N`` prunable weights. A real-valued
per-layer allocation ``a_l`` (summing to about ``K``) is rounded to integers ``k_l`` by
largest-remainder rounding with bounds ``1 <= k_l <= n_l``, so ``sum_l k_l == K`` exactly and
no layer is cut off.

Uniform: ``a_l = density * n_l``.

ERK, Erdős–Rényi-Kernel (Evci et al. 2020, "Rigging the Lottery: Making All Tickets Winners",
Sec. 3 and RigL's ``sparse_utils.get_sparsities``): for a weight of shape ``(d_1, ..., d_r)``

    density_l = eps * (d_1 + ... + d_r) / (d_1 * ... * d_r)

(conv ``(c_out + c_in + kh + kw) / (c_out c_in kh kw)``, linear ``(n_out + n_in) /
(n_out n_in)``), with ``eps`` solved so that ``sum_l density_l n_l = density * N``. While the
largest ``density_l`` exceeds 1, the layer(s) with the largest raw ratio are made dense and
``eps`` is re-solved over the rest, as RigL's reference code does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def check_density(density: float) -> None:
    """Raise ValueError naming ``mask.density`` unless it lies in (0, 1]."""
    if not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise ValueError(f"mask.density={density!r} is not valid: must be in (0, 1]")


def budget(numels: dict[str, int], density: float) -> int:
    """Global kept count ``round(density * N)``; must leave every tensor at least one weight."""
    check_density(density)
    total = sum(numels.values())
    k = round(density * total)
    if k < len(numels):
        raise ValueError(
            f"mask.density={density!r} keeps {k} of {total} prunable weights, fewer than the "
            f"{len(numels)} prunable tensors (each keeps at least 1)"
        )
    return k


def largest_remainder(targets: Sequence[float], caps: Sequence[int], total: int,
                      floor: int = 1) -> list[int]:
    """Integers ``floor <= k_i <= caps[i]`` summing to ``total``, each as close to ``targets[i]``.

    Start from ``floor(targets)`` clipped to the bounds, then add one to the entry furthest
    below its target (or remove one from the entry furthest above) until the sum is ``total``.
    Ties go to the earlier entry.
    """
    if not sum(min(floor, c) for c in caps) <= total <= sum(caps):
        raise ValueError(f"cannot allocate {total} within bounds [{floor}, {list(caps)}]")
    counts = [min(max(math.floor(t), floor), c) for t, c in zip(targets, caps)]
    while sum(counts) != total:
        grow = sum(counts) < total
        open_ = [i for i, c in enumerate(counts)
                 if (c < caps[i] if grow else c > max(floor, 0))]
        sign = 1.0 if grow else -1.0
        best = max(open_, key=lambda i: (sign * (targets[i] - counts[i]), -i))
        counts[best] += 1 if grow else -1
    return counts


def uniform_counts(numels: dict[str, int], density: float) -> dict[str, int]:
    """Every tensor keeps about ``density`` of its weights; the total is exact."""
    k = budget(numels, density)
    names = list(numels)
    counts = largest_remainder([density * numels[n] for n in names],
                               [numels[n] for n in names], k)
    return dict(zip(names, counts))


def _erk_raw(shape: Sequence[int]) -> float:
    """ERK ratio (sum of dims) / (product of dims)."""
    return sum(shape) / math.prod(shape)


def erk_densities(shapes: dict[str, Sequence[int]], density: float) -> dict[str, float]:
    """Real-valued ERK densities (before integer rounding), capped at 1."""
    check_density(density)
    raw = {n: _erk_raw(s) for n, s in shapes.items()}
    numel = {n: math.prod(s) for n, s in shapes.items()}
    target = density * sum(numel.values())
    dense: set[str] = set()
    while True:
        free = [n for n in shapes if n not in dense]
        if not free:
            return {n: 1.0 for n in shapes}
        eps = (target - sum(numel[n] for n in dense)) / sum(raw[n] * numel[n] for n in free)
        top = max(raw[n] for n in free)
        if eps * top <= 1.0:
            return {n: 1.0 if n in dense else eps * raw[n] for n in shapes}
        dense.update(n for n in free if raw[n] == top)


def erk_counts(shapes: dict[str, Sequence[int]], density: float) -> dict[str, int]:
    """ERK densities rounded to integer kept counts with an exact total."""
    numels = {n: math.prod(s) for n, s in shapes.items()}
    k = budget(numels, density)
    dens = erk_densities(shapes, density)
    names = list(shapes)
    counts = largest_remainder([dens[n] * numels[n] for n in names],
                               [numels[n] for n in names], k)
    return dict(zip(names, counts))
