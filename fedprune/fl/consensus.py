"""Server-side consensus of client masks and scores (Flower-free).

- ``average_scores``: example-weighted mean of per-weight importance scores; a mask is then
  selected from the mean with the shared selection module.
- ``majority_vote``: a position is kept when the (example-weighted) share of clients keeping
  it exceeds one half; an exact tie is resolved by ``tie`` ("keep" or "prune").
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _weights(n: int, weights: Sequence[float] | None) -> np.ndarray:
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be {n} non-negative numbers with a positive sum, got {weights}")
    return w / w.sum()


def average_scores(scores: Sequence[np.ndarray], weights: Sequence[float] | None = None
                   ) -> np.ndarray:
    """Weighted mean of the clients' score arrays (float64)."""
    if not scores:
        raise ValueError("average_scores needs at least one client's scores")
    shapes = {s.shape for s in scores}
    if len(shapes) != 1:
        raise ValueError(f"clients sent scores of different shapes {shapes}")
    w = _weights(len(scores), weights)
    return sum(wi * s.astype(np.float64) for wi, s in zip(w, scores))


def majority_vote(masks: Sequence[np.ndarray], weights: Sequence[float] | None = None,
                  tie: str = "keep") -> np.ndarray:
    """Keep a position when more than half the (weighted) clients keep it."""
    if tie not in ("keep", "prune"):
        raise ValueError(f"tie={tie!r}; choose one of ['keep', 'prune']")
    if not masks:
        raise ValueError("majority_vote needs at least one client's mask")
    for m in masks:
        if m.dtype != np.bool_ and not np.isin(m, (0, 1)).all():
            raise ValueError("majority_vote: a client mask is not binary")
    share = average_scores([m.astype(np.float64) for m in masks], weights)
    half = np.isclose(share, 0.5, rtol=0, atol=1e-12)
    return np.where(half, tie == "keep", share > 0.5)
