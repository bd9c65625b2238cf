"""Loss-landscape probes of the three-regime model of pruning (Zhou et al., ICML 2023).

Two pruned-and-retrained solutions ``a`` and ``b`` of one cell (same dense model, same
mask, different retraining seeds) are compared two ways:

- **Connectivity**: the loss along the linear path theta(t) = (1 - t) theta_a + t theta_b,
  and its barrier, the largest excess over the straight line between the end losses
  (Frankle et al. 2020; the paper's LMC metric)::

      barrier = max_t  L(theta(t)) - ((1 - t) L(theta_a) + t L(theta_b))

  BN running statistics do not interpolate (the statistics of a mixed model are not the
  mix of the statistics), so each point's BN buffers are recomputed on training batches
  before it is evaluated, when ``bn_batches`` are given. Masked weights stay masked on
  the path: both ends are zero at the same pruned positions.
- **Similarity**: linear CKA (Kornblith et al. 2019) of the two models' outputs on the
  same inputs, ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred
  ``Xc``, ``Yc``: 1 for outputs equal up to rotation and scale, near 0 for unrelated ones.

``regime`` names the cell: I (poorly connected: barrier above a tolerance), II-A (well
connected, dissimilar outputs) or II-B (well connected, similar outputs).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def interpolate_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], t: float
                      ) -> dict[str, torch.Tensor]:
    """(1 - t) a + t b for floating tensors; integer buffers (BN batch counters) from ``a``."""
    if set(a) != set(b):
        raise ValueError(f"the two states differ in keys: {sorted(set(a) ^ set(b))[:5]}")
    out = {}
    for name, x in a.items():
        y = b[name]
        if x.shape != y.shape:
            raise ValueError(f"tensor {name!r}: shapes {tuple(x.shape)} and {tuple(y.shape)}")
        out[name] = torch.lerp(x, y.to(x.dtype), t) if x.is_floating_point() else x.clone()
    return out


def _batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def reset_bn_(model: nn.Module, batches: Batches, device: torch.device | str = "cpu") -> int:
    """Recompute every BN layer's running mean/variance as the plain average over
    ``batches`` (momentum None); returns the number of BN layers (0: nothing to do)."""
    norms = _batch_norms(model)
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over every batch seen
    model.to(device).train()
    seen = 0
    for x, _ in batches:
        model(x.to(device))
        seen += 1
    if not seen:
        raise ValueError("reset_bn_ got no batches")
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)
    return len(norms)


def path_losses(model_a: nn.Module, model_b: nn.Module,
                evaluate: Callable[[nn.Module], dict[str, float]], points: int = 11,
                bn_batches: Callable[[], Batches] | None = None,
                device: torch.device | str = "cpu") -> list[dict[str, float]]:
    """``evaluate`` (a dict with at least ``loss``) at ``points`` evenly spaced t in
    [0, 1] of the linear path from ``model_a`` to ``model_b``, each row with its ``t``.
    ``bn_batches()`` yields the training batches that recompute BN statistics per point."""
    if points < 2:
        raise ValueError(f"points={points}: a path needs both ends (>= 2)")
    sa, sb = model_a.state_dict(), model_b.state_dict()
    probe = copy.deepcopy(model_a)
    rows = []
    for t in np.linspace(0.0, 1.0, points):
        probe.load_state_dict(interpolate_state(sa, sb, float(t)))
        if bn_batches is not None:
            reset_bn_(probe, bn_batches(), device)
        rows.append({"t": float(t), **evaluate(probe)})
    return rows


def barrier(rows: list[dict[str, float]], key: str = "loss") -> float:
    """Largest excess of ``key`` over the straight line between the path's two ends."""
    if len(rows) < 2:
        raise ValueError("a barrier needs a path of at least 2 points")
    first, last = rows[0][key], rows[-1][key]
    return max(r[key] - ((1 - r["t"]) * first + r["t"] * last) for r in rows)


def linear_cka(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> float:
    """Linear CKA of two representations of the same n inputs, (n, p) and (n, q)."""
    x = torch.as_tensor(x, dtype=torch.float64).reshape(len(x), -1)
    y = torch.as_tensor(y, dtype=torch.float64).reshape(len(y), -1)
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"CKA needs the same n >= 2 inputs on both sides, got {len(x)} "
                         f"and {len(y)}")
    x, y = x - x.mean(0), y - y.mean(0)
    denom = torch.linalg.norm(x.T @ x) * torch.linalg.norm(y.T @ y)
    if float(denom) == 0.0:
        raise ValueError("CKA of a constant representation is undefined")
    return float(torch.linalg.norm(y.T @ x) ** 2 / denom)


@torch.no_grad()
def outputs(model: nn.Module, batches: Batches, device: torch.device | str = "cpu"
            ) -> torch.Tensor:
    """The model's outputs (logits) on every batch, concatenated: (n, classes)."""
    model.to(device).eval()
    return torch.cat([model(x.to(device)).float().cpu() for x, _ in batches])


def regime(barrier_value: float, cka: float, barrier_tol: float, cka_split: float) -> str:
    """I: barrier above ``barrier_tol``; else II-A below ``cka_split`` CKA, II-B above."""
    if barrier_value > barrier_tol:
        return "I"
    return "II-B" if cka >= cka_split else "II-A"
