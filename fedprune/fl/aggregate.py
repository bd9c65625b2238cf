"""Server-side aggregation of client updates and scores (Flower-free).

Sparse FedAvg (McMahan et al. 2017, Eq. in Alg. 1, restricted to the mask):
    w_t+1[k] = sum_i n_i * w_i[k] / sum_i n_i      for every kept position k,
with n_i the client's example count. Clients send only kept values, so pruned positions
are exactly zero in every reply and stay exactly zero in the aggregate.

Robust options (``fed.aggregation``), coordinate-wise over clients and unweighted (a count
is a claim the client makes; robust rules do not let it buy influence):
- ``median``: the coordinate-wise median (Yin et al. 2018, "Byzantine-Robust Distributed
  Learning: Towards Optimal Statistical Rates"): one poisoned client out of three or more
  cannot move a coordinate outside the honest clients' range.
- ``trimmed_mean``: per coordinate, drop the ``fed.trim`` fraction of largest and of
  smallest values, average the rest (Yin et al. 2018).
The same rules combine per-weight scores (SNIP/SynFlow, PruneFL importance, gates).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

Rule = Callable[[np.ndarray, np.ndarray, float], np.ndarray]  # (stacked (c, ...), w, trim)


def _mean(stacked: np.ndarray, weights: np.ndarray, trim: float) -> np.ndarray:
    out = np.zeros(stacked.shape[1:], dtype=np.float64)
    for value, w in zip(stacked, weights / weights.sum()):
        out += w * value.astype(np.float64)  # accumulation in float64, client by client
    return out


def _median(stacked: np.ndarray, weights: np.ndarray, trim: float) -> np.ndarray:
    return np.median(stacked.astype(np.float64), axis=0)


def _trimmed_mean(stacked: np.ndarray, weights: np.ndarray, trim: float) -> np.ndarray:
    cut = math.floor(trim * len(stacked))
    if 2 * cut >= len(stacked):
        raise ValueError(f"fed.trim={trim} removes all {len(stacked)} clients")
    ordered = np.sort(stacked.astype(np.float64), axis=0)
    return ordered[cut:len(stacked) - cut].mean(axis=0)


RULES: dict[str, Rule] = {"mean": _mean, "median": _median, "trimmed_mean": _trimmed_mean}


def _check(weights: Sequence[float], count: int) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if count == 0:
        raise ValueError("aggregation needs at least one client")
    if w.shape != (count,) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"need {count} finite non-negative weights with a positive sum, "
                         f"got {list(weights)}")
    return w


def combine(arrays: Sequence[np.ndarray], weights: Sequence[float], rule: str = "mean",
            trim: float = 0.1) -> np.ndarray:
    """One array from the clients' arrays (float64): example-weighted mean, or a robust rule."""
    if rule not in RULES:
        raise ValueError(f"fed.aggregation={rule!r}; choose one of {sorted(RULES)}")
    w = _check(weights, len(arrays))
    shapes = {np.shape(a) for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"clients sent arrays of different shapes {shapes}")
    return RULES[rule](np.stack([np.asarray(a) for a in arrays]), w, trim)


def weighted_average(states: Sequence[dict[str, np.ndarray]], weights: Sequence[float],
                     rule: str = "mean", trim: float = 0.1) -> dict[str, np.ndarray]:
    """Per tensor, :func:`combine` of the clients' values (original dtype out).

    Integer tensors (e.g. BatchNorm's ``num_batches_tracked``) are counters, not
    parameters: they take the median over clients (rounded down), so no single client can
    set them (the largest value, as before, let one client set 2^62)."""
    if not states:
        raise ValueError("weighted_average needs at least one state")
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    _check(weights, len(states))
    names = list(states[0])
    for i, s in enumerate(states[1:], start=1):
        if list(s) != names:
            raise ValueError(f"state {i} has tensors {sorted(set(s) ^ set(names))[:5]} "
                             "that state 0 does not (or vice versa)")
    out: dict[str, np.ndarray] = {}
    for name in names:
        first = states[0][name]
        values = [s[name] for s in states]
        if np.issubdtype(first.dtype, np.integer):
            median = np.floor(np.median(np.stack(values).astype(np.float64), axis=0))
            out[name] = np.asarray(median, dtype=first.dtype)  # 0-d stays an ndarray
            continue
        out[name] = combine(values, weights, rule, trim).astype(first.dtype)
    return out
