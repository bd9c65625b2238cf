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
- **Curved connectivity** (Garipov et al. 2018): the quadratic Bezier curve
  phi(t) = (1 - t)^2 theta_a + 2t(1 - t) theta_bend + t^2 theta_b, its bend trained to
  minimise the loss at random t (``fit_bend``), and the same barrier along it. A linear
  barrier that a trained curve avoids means the two solutions share a curved valley; one
  left on the curve too means different basins, or a bend trained too briefly. Weights
  zero at both ends (pruned) stay zero.
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
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

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


def bezier_state(a: dict[str, torch.Tensor], bend: dict[str, torch.Tensor],
                 b: dict[str, torch.Tensor], t: float) -> dict[str, torch.Tensor]:
    """The quadratic Bezier curve with control point ``bend`` at ``t`` for the tensors
    ``bend`` names (the parameters); every other tensor (BN buffers, counters) as
    ``interpolate_state``."""
    out = interpolate_state(a, b, t)
    for name, w in bend.items():
        if name not in out:
            raise ValueError(f"bend tensor {name!r} is not in the end models")
        w = w.to(a[name].device, a[name].dtype)
        out[name] = (1 - t) ** 2 * a[name] + 2 * t * (1 - t) * w + t ** 2 * b[name]
    return out


def fit_bend(model_a: nn.Module, model_b: nn.Module, batches: Callable[[int], Batches],
             epochs: int, lr: float, weight_decay: float = 1e-4, seed: int = 0,
             loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
             device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The bend of the quadratic Bezier curve between the two models (Garipov et al. 2018):
    started at the ends' midpoint (the curve is then the linear path), trained by SGD
    (momentum 0.9, lr x0.1 at 50% and 75% of ``epochs``) on ``loss_fn`` at one uniform
    random t per batch, plus Garipov's L2 penalty ``weight_decay / 2 * ||phi(t)||^2``.
    ``batches(epoch)`` yields the training batches of each epoch (1-based). BN layers use
    batch statistics while the bend trains. The ends stay fixed, and a weight zero at
    both ends (a pruned position) gets no gradient, so it stays zero along the curve (the
    reference's gradient mask: github.com/YefanZhou/ThreeRegimePruning, mc_utils.train)."""
    if epochs < 1:
        raise ValueError(f"epochs={epochs}: the bend needs at least one epoch")
    if len(list(model_a.named_parameters(remove_duplicate=False))) != len(
            list(model_a.named_parameters())):
        # state_dict() names a tied tensor twice; loading the curve would keep one alias
        raise ValueError("fit_bend: the model ties weights (e.g. embeddings and LM head); "
                         "curves of tied models are not supported")
    probe = copy.deepcopy(model_a).to(device).train()
    pa = {n: p.detach().to(device) for n, p in model_a.named_parameters()}
    pb = {n: p.detach().to(device) for n, p in model_b.named_parameters()}
    if set(pa) != set(pb):
        raise ValueError(f"the two models differ in parameters: {sorted(set(pa) ^ set(pb))[:5]}")
    buffers = {n: b.clone() for n, b in probe.named_buffers()}  # BN statistics, not used
    bend = {n: nn.Parameter((pa[n] + pb[n]) / 2) for n in pa}
    live = {n: ((pa[n] != 0) | (pb[n] != 0)).to(pa[n].dtype) for n in pa}
    opt = torch.optim.SGD(bend.values(), lr=lr, momentum=0.9)
    # a milestone at 0 would decay the rate before the first epoch (epochs=1)
    steps = [m for m in (epochs // 2, (3 * epochs) // 4) if m > 0]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, steps, 0.1)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        for x, y in batches(epoch):
            t = float(torch.rand((), generator=gen))
            weights = {n: (1 - t) ** 2 * pa[n] + 2 * t * (1 - t) * bend[n] + t ** 2 * pb[n]
                       for n in pa}
            out = functional_call(probe, {**weights, **buffers}, (x.to(device),))
            penalty = sum((w ** 2).sum() for w in weights.values())
            loss = loss_fn(out, y.to(device)) + 0.5 * weight_decay * penalty
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for n, w in bend.items():
                if w.grad is not None:  # None: a parameter this forward did not use
                    w.grad.mul_(live[n])
            opt.step()
        sched.step()
    return {n: w.detach().cpu() for n, w in bend.items()}


def path_losses(model_a: nn.Module, model_b: nn.Module,
                evaluate: Callable[[nn.Module], dict[str, float]], points: int = 11,
                bn_batches: Callable[[], Batches] | None = None,
                device: torch.device | str = "cpu",
                bend: dict[str, torch.Tensor] | None = None) -> list[dict[str, float]]:
    """``evaluate`` (a dict with at least ``loss``) at ``points`` evenly spaced t in
    [0, 1] of the linear path from ``model_a`` to ``model_b`` (with ``bend``: the Bezier
    curve with that control point, see ``fit_bend``), each row with its ``t``.
    ``bn_batches()`` yields the training batches that recompute BN statistics per point."""
    if points < 2:
        raise ValueError(f"points={points}: a path needs both ends (>= 2)")
    sa, sb = model_a.state_dict(), model_b.state_dict()
    probe = copy.deepcopy(model_a)
    rows = []
    for t in np.linspace(0.0, 1.0, points):
        probe.load_state_dict(interpolate_state(sa, sb, float(t)) if bend is None
                              else bezier_state(sa, bend, sb, float(t)))
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
