"""Server-side aggregation of client updates (Flower-free).

Sparse FedAvg (McMahan et al. 2017, Eq. in Alg. 1, restricted to the mask):
    w_t+1[k] = sum_i n_i * w_i[k] / sum_i n_i      for every kept position k,
with n_i the client's example count. Clients send only kept values, so pruned positions
are exactly zero in every reply and stay exactly zero in the average.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def weighted_average(states: Sequence[dict[str, np.ndarray]], weights: Sequence[float]
                     ) -> dict[str, np.ndarray]:
    """Example-weighted mean per tensor (float64 accumulation, original dtype out).

    Integer tensors (e.g. BatchNorm's ``num_batches_tracked``) are counters, not
    parameters: the result keeps the largest value instead of a rounded mean.
    """
    if not states:
        raise ValueError("weighted_average needs at least one state")
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"example counts must sum to > 0, got {list(weights)}")
    names = list(states[0])
    for i, s in enumerate(states[1:], start=1):
        if list(s) != names:
            raise ValueError(f"state {i} has tensors {sorted(set(s) ^ set(names))[:5]} "
                             "that state 0 does not (or vice versa)")
    out: dict[str, np.ndarray] = {}
    for name in names:
        first = states[0][name]
        if np.issubdtype(first.dtype, np.integer):
            out[name] = np.asarray(np.max(np.stack([s[name] for s in states]), axis=0),
                                   dtype=first.dtype)  # 0-d stays an ndarray, not a scalar
            continue
        acc = np.zeros(first.shape, dtype=np.float64)
        for s, w in zip(states, weights):
            acc += (w / total) * s[name].astype(np.float64)
        out[name] = acc.astype(first.dtype)
    return out
