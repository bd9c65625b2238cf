"""Dynamic-sparse baselines, Flower-free: PruneFL and FedDST mask re-selection.

**PruneFL** (Jiang et al., "Model Pruning Enables Efficient Federated Learning on Edge
Devices", TNNLS 2022). Clients accumulate the squared *dense* gradient of every masked
tensor while they train (pruned positions included); every ``delta_r`` rounds the server
re-selects the kept set M of each layer. The paper maximises the approximate empirical-risk
reduction of a round over the round's time,

    max_M  Delta(M) / T(M),   Delta(M) = sum_{j in M} g_j^2,   T(M) = c + sum_{j in M} t_j,

with g_j^2 the accumulated squared gradient of parameter j and t_j its per-parameter
(computation + communication) time. With a uniform t_j and a fixed |M|, T(M) is a constant,
so the optimum keeps the |M| largest g_j^2: that is :func:`prunefl_reselect`.

Simplifications and differences from the paper / reference code (github jiangyuang/PruneFL,
``control/algorithm.py``, ``bases/fl/simulation/adaptive.py``):

- We keep every layer's count fixed (density exact per layer). The paper's greedy search
  also changes the model size and moves budget between layers (it adds candidates while
  g_j^2 / t_j beats the running ratio); the reference further limits removals per
  adjustment to a decaying fraction of each layer's smallest-magnitude kept weights.
- Newly kept positions start at zero. The reference server keeps the dense values of
  pruned weights (pruning only edits the mask), so re-added weights return with stale values.
- Clients report the *mean over local steps* of the per-step g^2 (comparable across clients
  with different step counts); the server takes the example-weighted mean over clients
  (``consensus.average_scores``). The reference client squares the round's *summed*
  gradient, scales it by the examples processed, and the server sums over clients.

**FedDST** (Bibikar et al., "Federated Dynamic Sparse Training: Computing Less,
Communicating Less, Yet Learning Better", AAAI 2022). Every ``delta_r`` rounds each client,
after its local training, runs RigL (Evci et al. 2020) on every layer: drop the K
smallest-|w| active weights, grow the K pruned positions with the largest |dense gradient|,
grown weights zero, ``K = alpha_t * active`` with ``alpha_t = alpha/2 (1 + cos(pi t / r_end))``
(:func:`layer_moves` with ``progressive.Schedule``; the step itself is
``fedprune.masks.regrow.prune_and_grow``, shared with FedTiny's server). The server
aggregates by the sparse weighted average

    w[j] = sum_i n_i m_i[j] w_i[j] / sum_i n_i m_i[j]      (0 where no client keeps j)

and keeps, per layer, the ``counts[name]`` positions with the largest example-weighted vote
share sum_i n_i m_i[j] / sum_i n_i, ties by |w[j]|, then C order (:func:`vote_masks`).

Differences from the reference code (github bibikar/feddst, ``dst.py``, ``models.py``):

- Server mask: the reference keeps the union of the clients' masks (``--min-votes 0``) and,
  when that is denser than the target, magnitude-prunes the sparse average per layer; vote
  share plays no part in the ranking. Here the vote ranks and magnitude only breaks ties.
- Client growth: the reference takes the top |grad| over *all* positions, so it can
  re-grow a just-dropped weight or pick an active one (growing fewer than K). Here growth
  is over the positions pruned before the step, so exactly K move each way.
- The reference multiplies alpha in twice (``alpha * _decay(t, alpha)``, i.e.
  alpha^2/2 (1 + cos)) and ends the decay at rounds // 2 by default; we use alpha_t above
  with ``dst.r_end`` (default: three quarters of the rounds).
- The reference adjusts on the gradient of the last local batch; :func:`client_adjust`
  takes whatever batches the caller passes (one batch reproduces the reference).
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..fedtiny.progressive import Schedule
from ..masks.regrow import prune_and_grow
from ..masks.select import topk_mask
from .aggregate import weighted_average
from .consensus import average_scores

State = dict[str, np.ndarray]
NpMasks = dict[str, np.ndarray]


# ----------------------------------------------------------------------------- selection


def _as_bool(mask: object, shape: tuple[int, ...], name: str) -> np.ndarray:
    """A mask as a numpy bool array of ``shape`` (accepts numpy or torch masks)."""
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    arr = np.asarray(mask)
    if arr.dtype != np.bool_:
        raise ValueError(f"tensor {name!r}: mask dtype {arr.dtype} is not bool")
    if arr.shape != tuple(shape):
        raise ValueError(f"tensor {name!r}: mask shape {arr.shape} != tensor shape {tuple(shape)}")
    return arr


def top_with_tiebreak(primary: np.ndarray, k: int, secondary: np.ndarray) -> np.ndarray:
    """Bool mask keeping the ``k`` largest ``primary``; ties by larger ``secondary``, then C order.

    Sorting stably by ``secondary`` first and then selecting on ``primary`` with the
    shared stable :func:`topk_mask` gives exactly that lexicographic order.
    """
    if primary.shape != secondary.shape:
        raise ValueError(f"scores {primary.shape} and tie-breaker {secondary.shape} differ")
    second = np.asarray(secondary, dtype=np.float64).reshape(-1)  # (n,)
    if np.isnan(second).any():
        raise ValueError("tie-breaker contains NaN")
    order = np.argsort(-second, kind="stable")  # (n,) larger secondary first, C order in ties
    first = np.asarray(primary, dtype=np.float64).reshape(-1)[order]  # (n,) permuted
    picked = topk_mask(torch.from_numpy(first), k).numpy()  # (n,) over the permutation
    keep = np.zeros(first.size, dtype=bool)
    keep[order[picked]] = True
    return keep.reshape(primary.shape)


def masked_state(state: Mapping[str, np.ndarray], masks: Mapping[str, object]) -> State:
    """Copy of ``state`` with each masked tensor zeroed outside its mask."""
    out = {k: np.array(v, copy=True) for k, v in state.items()}
    for name, mask in masks.items():
        out[name][~_as_bool(mask, out[name].shape, name)] = 0
    return out


# ----------------------------------------------------------------------------- PruneFL


class GradSquareAccumulator:
    """Mean over local steps of the squared dense gradient of the named tensors (PruneFL).

    Pass :meth:`hook` as ``train_local(..., on_backward=...)``: it runs after each backward
    pass and before the gradient is masked, so pruned positions are seen too. Memory: one
    dense float32 accumulator per named tensor (PruneFL uploads these dense anyway).
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        params = dict(model.named_parameters())
        unknown = sorted(set(names) - set(params))
        if unknown:
            raise KeyError(f"GradSquareAccumulator: no parameters named {unknown[:5]}")
        self._params = {n: params[n] for n in names}
        self._sum: dict[str, torch.Tensor] = {}
        self.steps = 0

    @torch.no_grad()
    def add_(self) -> None:
        """Add this step's g**2; a tensor without a gradient this step adds zero."""
        for name, param in self._params.items():
            if param.grad is None:
                continue
            grad = param.grad.detach().float()
            if name not in self._sum:
                self._sum[name] = torch.zeros_like(grad)
            self._sum[name].addcmul_(grad, grad)
        self.steps += 1

    def hook(self) -> Callable[[], None]:
        """The ``on_backward`` callback for ``train_local``."""
        return self.add_

    def result(self) -> dict[str, np.ndarray]:
        """name -> mean over steps of grad**2 (float32, shaped like the tensor)."""
        if self.steps == 0:
            raise ValueError("GradSquareAccumulator.result(): no training step was recorded")
        out = {}
        for name, param in self._params.items():
            acc = self._sum.get(name)
            mean = (acc / self.steps).cpu() if acc is not None else torch.zeros(param.shape)
            out[name] = mean.numpy().astype(np.float32)
        return out


def prunefl_reselect(state: Mapping[str, np.ndarray], masks: Mapping[str, object],
                     importance: Mapping[str, np.ndarray]) -> tuple[State, NpMasks]:
    """Per layer, keep as many positions as now, the largest by ``importance``.

    ``importance``: the clients' example-weighted mean squared gradient. Ties prefer the
    currently kept positions (then C order): equal evidence should not churn the mask and
    reset trained weights. Positions kept before and after keep their values; newly kept
    ones start at zero and dropped ones are zeroed. Inputs are not modified.
    """
    old_masks, new_masks = {}, {}
    for name, mask in masks.items():
        old = _as_bool(mask, np.shape(state[name]), name)
        if name not in importance:
            raise KeyError(f"prunefl_reselect: no importance for masked tensor {name!r}")
        score = np.asarray(importance[name])
        if score.shape != old.shape:
            raise ValueError(f"tensor {name!r}: importance shape {score.shape} != {old.shape}")
        old_masks[name] = old
        new_masks[name] = top_with_tiebreak(score, int(old.sum()), secondary=old)
    stayed = {n: old_masks[n] & new_masks[n] for n in new_masks}
    return masked_state(state, stayed), new_masks


# ----------------------------------------------------------------------------- FedDST client


def layer_moves(schedule: Schedule, server_round: int, masks: Mapping[str, object]
                ) -> dict[str, int]:
    """K per layer for this round: ``alpha_t * active``, bounded by what can move."""
    moves = {}
    for name, mask in masks.items():
        m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
        active = int(m.sum())
        moves[name] = schedule.k(server_round, active, m.size - active)
    return moves


def _mean_gradient_(model: nn.Module, batches: Iterable, device: torch.device) -> None:
    """Leave in ``.grad`` the mean per-example cross-entropy gradient over ``batches``."""
    model.zero_grad(set_to_none=True)
    seen = 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        F.cross_entropy(model(x), y, reduction="sum").backward()
        seen += len(y)
    if seen == 0:
        raise ValueError("client_adjust got no examples")
    for p in model.parameters():
        if p.grad is not None:
            p.grad.div_(seen)


def client_adjust(model: nn.Module, masks: Mapping[str, object], batches: Iterable,
                  k_per_layer: Mapping[str, int], device: torch.device | str = "cpu"
                  ) -> dict[str, torch.Tensor]:
    """FedDST's client step: one dense gradient on ``batches``, then RigL per layer in place.

    The gradient is taken at the masked weights in train mode (batch statistics, as in
    training); BatchNorm running statistics are restored afterwards. Layers missing from
    ``k_per_layer`` keep their mask. Returns the new masks (bool, CPU); the model's weights
    are zero outside them.
    """
    unknown = sorted(set(k_per_layer) - set(masks))
    if unknown:
        raise KeyError(f"k_per_layer names tensors without a mask: {unknown[:5]}")
    device = torch.device(device)
    model.to(device).train()
    params = dict(model.named_parameters())
    masks_t = {n: torch.as_tensor(_as_bool(m, tuple(params[n].shape), n)) for n, m in masks.items()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    with torch.no_grad():
        for name, mask in masks_t.items():
            params[name].mul_(mask.to(device))
    _mean_gradient_(model, batches, device)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            buf.copy_(buffers[name])
        for name, k in k_per_layer.items():
            p = params[name]
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            w, m = prune_and_grow(p.detach(), masks_t[name].to(device), grad.abs(), k)
            p.copy_(w)
            masks_t[name] = m.cpu()
    model.zero_grad(set_to_none=True)
    return masks_t


# ----------------------------------------------------------------------------- FedDST server


def _check_clients(states: Sequence, masks_list: Sequence, weights: Sequence[float]) -> np.ndarray:
    if not states or len(states) != len(masks_list) or len(states) != len(weights):
        raise ValueError(f"need one state, mask set and weight per client; got {len(states)}, "
                         f"{len(masks_list)}, {len(weights)}")
    w = np.asarray(weights, dtype=np.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"example counts must be >= 0 with a positive sum, got {list(weights)}")
    names = set(masks_list[0])
    for i, m in enumerate(masks_list[1:], start=1):
        if set(m) != names:
            raise ValueError(f"client {i} masks tensors {sorted(set(m) ^ names)[:5]} that "
                             "client 0 does not (or vice versa)")
    return w


def sparse_average(states: Sequence[Mapping[str, np.ndarray]],
                   masks_list: Sequence[Mapping[str, object]], weights: Sequence[float]) -> State:
    """FedDST aggregation: per position, the example-weighted mean over the clients that
    keep it (0 where none does); unmasked tensors (BN, biases) are plain weighted means."""
    w = _check_clients(states, masks_list, weights)
    masked = set(masks_list[0])
    plain = weighted_average([{k: v for k, v in s.items() if k not in masked} for s in states],
                             list(weights))
    out: State = {}
    for name in states[0]:
        if name not in masked:
            out[name] = plain[name]
            continue
        shape = np.shape(states[0][name])
        num = np.zeros(shape, dtype=np.float64)  # sum_i n_i m_i w_i
        den = np.zeros(shape, dtype=np.float64)  # sum_i n_i m_i
        for s, ms, wi in zip(states, masks_list, w):
            m = _as_bool(ms[name], shape, name)
            num += wi * np.where(m, s[name], 0.0)
            den += wi * m
        avg = np.divide(num, den, out=np.zeros(shape), where=den > 0)
        out[name] = avg.astype(np.asarray(states[0][name]).dtype)
    return out


def vote_masks(masks_list: Sequence[Mapping[str, object]], weights: Sequence[float],
               counts: Mapping[str, int], magnitude: Mapping[str, np.ndarray]) -> NpMasks:
    """Per layer keep exactly ``counts[name]`` positions by example-weighted vote share;
    ties by |magnitude| (the sparse average), then C order. Zero the weights outside the
    result with :func:`masked_state`."""
    _check_clients(masks_list, masks_list, weights)
    missing = sorted(set(masks_list[0]) - (set(counts) & set(magnitude)))
    if missing:
        raise KeyError(f"vote_masks: no count or magnitude for masked tensors {missing[:5]}")
    out = {}
    for name in masks_list[0]:
        mag = np.abs(np.asarray(magnitude[name], dtype=np.float64))
        votes = [_as_bool(m[name], mag.shape, name).astype(np.float64) for m in masks_list]
        # (shape,) in [0, 1]; rounded so equal shares summed in different orders still tie
        share = np.round(average_scores(votes, weights), 12)
        k = int(counts[name])
        if not 0 <= k <= share.size:
            raise ValueError(f"tensor {name!r}: cannot keep {k} of {share.size} positions")
        out[name] = top_with_tiebreak(share, k, secondary=mag)
    return out
