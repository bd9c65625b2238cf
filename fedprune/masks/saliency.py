"""Saliency scores for masks at initialisation, computed by each client on its own side.

SNIP (Lee et al., ICLR 2019, "SNIP: Single-shot Network Pruning based on Connection
Sensitivity", Eq. 6): with a mask ``c`` over the weights (``w ⊙ c``, evaluated at ``c = 1``)

    s_j = | dL/dc_j | = | dL/dw_j * w_j |

for the cross-entropy loss ``L`` (mean over a batch). Here ``s`` is averaged over the
client's batches and left unnormalised (the paper divides by ``sum_k s_k``, which does not
change one client's top-k; averaging raw scores keeps clients on one scale).

SynFlow (Tanaka et al., NeurIPS 2020, "Pruning neural networks without any data by
iteratively conserving synaptic flow", Eq. 2 and Algorithm 1): with every parameter replaced
by its absolute value and an all-ones input,

    R = 1^T ( prod_l |θ^[l]| ) 1,        S(θ) = | θ ⊙ dR/dθ |,

recomputed over ``n`` iterations; at iteration ``k = 1..n`` the global top
``density ** (k / n)`` of the scored weights is kept and the rest zeroed before the next score.

Both return CPU float32 scores per named tensor; ``masks_from_scores`` turns (possibly
client-averaged) scores into masks by an exact global top-k. ``SCORERS`` registers both under
one keyword signature so a client can look a method up by its ``mask.init`` name.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from types import MappingProxyType
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .allocate import budget, check_density
from .core import Masks
from .select import select_global

Scores = dict[str, torch.Tensor]  # parameter name -> float32 CPU scores shaped like it
Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]  # (x (B, ...), y (B,)) pairs

# (model, names, *, batches, input_shape, density, device) -> scores; each scorer ignores
# the keywords it does not need (SNIP needs batches, SynFlow input_shape and density).
Scorer = Callable[..., Scores]
_SCORERS: dict[str, Scorer] = {}
SCORERS = MappingProxyType(_SCORERS)  # read-only view: name -> scorer


def register_scorer(name: str) -> Callable[[Scorer], Scorer]:
    """Register a scorer under ``name``; a duplicate name is refused."""
    def deco(fn: Scorer) -> Scorer:
        if name in _SCORERS:
            raise ValueError(f"saliency scorer {name!r} is already registered")
        _SCORERS[name] = fn
        return fn

    return deco


def get_scorer(name: str) -> Scorer:
    """Look up a scorer; an unknown name lists the valid ones."""
    if name not in _SCORERS:
        raise ValueError(f"mask.init={name!r} is not a registered saliency scorer; choose one "
                         f"of {sorted(_SCORERS)}")
    return _SCORERS[name]


def _named_params(model: nn.Module, names: Sequence[str]) -> list[nn.Parameter]:
    """The parameters called ``names``, in that order; an unknown name is a ValueError."""
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"tensors {missing} name no parameter of the model")
    return [params[n] for n in names]


def _grads(out: torch.Tensor, params: list[nn.Parameter]) -> list[torch.Tensor]:
    """d out / d p for each p; a parameter the output does not reach gets zeros."""
    grads = torch.autograd.grad(out, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _check_finite(scores: Scores, method: str) -> None:
    for name, s in scores.items():
        if not torch.isfinite(s).all():
            raise ValueError(f"{method}: scores of tensor {name!r} are not finite (inf/nan)")


# ----------------------------------------------------------------------------- SNIP


def snip_scores(model: nn.Module, batches: Batches, names: Sequence[str],
                device: str | torch.device = "cpu") -> Scores:
    """SNIP ``|dL/dw ⊙ w|`` per named tensor, averaged over ``batches``; ``model`` is untouched.

    Runs on a deepcopy in train mode, as SNIP scores the freshly initialised network: BN
    normalises with each batch's statistics (the copy's running stats move, the caller's do
    not). The caller's weights, buffers, grads and training flag are left as they were.
    """
    work = copy.deepcopy(model).to(device).train()
    params = _named_params(work, names)
    totals = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    count = 0
    for x, y in batches:
        logits = work(x.to(device))  # (B, classes)
        loss = F.cross_entropy(logits, y.to(device))  # mean over the batch
        for total, p, g in zip(totals, params, _grads(loss, params)):
            total += (g.detach() * p.detach()).abs()
        count += 1
    if count == 0:
        raise ValueError("snip_scores: no batches to score")
    # Divide by the batch count: a client with 10 batches and one with 2 then score on the
    # same scale, so the server's example-weighted mean compares like with like.
    scores = {n: (t / count).float().cpu() for n, t in zip(names, totals)}
    _check_finite(scores, "snip")
    return scores


# ----------------------------------------------------------------------------- SynFlow


@torch.no_grad()
def _linearize_(model: nn.Module) -> None:
    """Replace every floating parameter and buffer by its absolute value, in place.

    As the reference code (``model.state_dict()`` entries ``abs_()``), BN running stats are
    included; in eval mode BN is then an affine map with positive scale, so every unit is
    positive on the all-ones input and ReLUs pass it through: the network is linear in each
    layer's |θ|.
    """
    for tensor in model.state_dict().values():
        if tensor.is_floating_point():
            tensor.abs_()


def _synflow_step(model: nn.Module, params: list[nn.Parameter], ones: torch.Tensor
                  ) -> list[torch.Tensor]:
    """One SynFlow score ``|θ ⊙ dR/dθ|`` with ``R = sum(model(ones))`` (float64)."""
    r = model(ones).sum()  # synaptic flow through the linearized net
    return [(g * p.detach()).abs() for p, g in zip(params, _grads(r, params))]


def synflow_scores(model: nn.Module, input_shape: Sequence[int], names: Sequence[str],
                   density: float, iterations: int = 100,
                   device: str | torch.device = "cpu") -> Scores:
    """Iterative SynFlow scores; pruned positions score 0 so top-k at ``density`` is the mask.

    Works on a float64 deepcopy in eval mode (BN uses its running stats) with all parameters
    made positive. Step ``k = 1..iterations`` scores the copy, keeps the global top
    ``round(density ** (k / iterations) * N)`` (each layer at least one, so no layer's flow
    is cut to zero) and zeroes the rest from the original |θ| before the next step. Returns the
    last step's scores with the positions it pruned set to exactly 0.
    """
    check_density(density)
    if iterations < 1:
        raise ValueError(f"synflow_scores: iterations={iterations} must be >= 1")
    work = copy.deepcopy(model).to(device=device, dtype=torch.float64).eval()
    _linearize_(work)
    params = _named_params(work, names)
    original = [p.detach().clone() for p in params]  # |θ| before any masking
    numels = {n: p.numel() for n, p in zip(names, params)}
    ones = torch.ones((1, *input_shape), dtype=torch.float64, device=device)  # (1, C, H, W)
    for step in range(1, iterations + 1):
        scores = dict(zip(names, _synflow_step(work, params, ones)))
        _check_finite(scores, "synflow")
        # Masks from a fresh top-k each step (as the reference re-selects its mask); a weight
        # pruned earlier scores 0, so it only returns through ties at 0.
        masks = select_global(scores, budget(numels, density ** (step / iterations)))
        with torch.no_grad():
            for p, w, n in zip(params, original, names):
                p.copy_(w * masks[n])
    final = {n: (s * masks[n]).float().cpu() for n, s in scores.items()}
    _check_finite(final, "synflow")  # float64 flow beyond float32's range turns inf here
    return final


# ----------------------------------------------------------------------------- selection


def masks_from_scores(scores: Scores, density: float) -> Masks:
    """Exact global top-k, ``k = round(density * N)``, each tensor keeping at least one."""
    k = budget({n: s.numel() for n, s in scores.items()}, density)
    return select_global(scores, k, min_per_layer=1)


# ----------------------------------------------------------------------------- registry


@register_scorer("snip")
def _snip(model: nn.Module, names: Sequence[str], *, batches: Batches,
          input_shape: Sequence[int] = (), density: float = 1.0,
          device: str | torch.device = "cpu") -> Scores:
    return snip_scores(model, batches, names, device=device)


@register_scorer("synflow")
def _synflow(model: nn.Module, names: Sequence[str], *, input_shape: Sequence[int],
             density: float, batches: Batches = (), device: str | torch.device = "cpu"
             ) -> Scores:
    return synflow_scores(model, input_shape, names, density, device=device)
