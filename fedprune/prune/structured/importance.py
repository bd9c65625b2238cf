"""Importance of structural units: one registered criterion per method, larger = keep.

Every criterion scores the units of a group set (``groups.GroupSet``) from per-position
scores of its member layers: a *position* is a row (axis "out") or a column / input channel
(axis "in") of a member's weight; a unit's score is the sum over the positions it owns in
all its members (LLM-Pruner's ``group_reduction="sum"``; a head sums its ``head_dim`` rows).

=================  ==========================================================================
criterion          position score (W a member's weight, g its gradient, F the Fisher diagonal)
=================  ==========================================================================
``l1``             sum |W| over the position's entries
``l2``             sum W^2 (LLM-Pruner's p=2 magnitude: squared, no root)
``taylor-vector``  |sum W*g|            (LLM-Pruner ``vectorize``)
``taylor-first``   sum |W*g|            (``param_first``, LLM-Pruner's default; alias ``taylor``)
``taylor-second``  sum |W*F*W|          (``param_second``; F = mean of squared per-sample grads)
``taylor-mix``     sum |W*g - W*F*W/2|  (``param_mix``)
``wanda-sp``       mean_i |W_ij| * sqrt(mean ||X_j||^2), output-projection columns only
``flap``           Var(X_j) * sum_i W_ij^2, output-projection columns only (FLAP's WIFV)
``beta-rank``      sum |W_k| * mean_p sigma_in(p) / sigma_out(k, p), producer rows only
=================  ==========================================================================

Beta-Rank (Homayounfar et al. 2023, Eq. 5): a filter's L1 norm times ``|sigma_in / sigma_out|``,
the spread of the input patch it reads over the spread of its own output, over the samples
(a standardized regression coefficient: the filter rescaled as if input and output had unit
variance). Eq. 5 has one patch; a conv applies the filter at every output position ``p``, so
the ratio is averaged over positions (the public code sums: same ranking). Positions where
the filter's output does not vary are skipped. Differences from the public code
(mohofar/Beta-Rank ``rank_generation.py``, ``std_filters``): it multiplies by
``sigma_out / sigma_in`` (the reciprocal of Eq. 5), and it slices the NCHW input as if it were
NHWC (``inp[:, d1*s : d1*s+kh, d2*s : d2*s+kw, :]`` takes *channels* d1*s.. and rows d2*s..,
all columns, no padding), so its "patch" is not the filter's receptive field; it also uses
only the last batch. Ours follows the paper, with the true receptive field (``unfold``,
zero padding included) over all calibration images.

Activation criteria (``wanda-sp``, ``flap``) read the input statistics of the members that
carry them (``Member.stats``: attention output projection, MLP down projection) from the
calibration engine; their other members do not contribute, as in FLAP. Differences from the
reference code: FLAP squares the attention metric once more before ranking (``W_metric**2``
for ``o_proj``), which the paper does not; ours follows the paper (Eq. 6, fluctuation times
squared column norm). Within one group set squaring does not change the ranking; across
layers (adaptive allocation) scores are standardized per group set first. Wanda-sp's row
scale uses input rows (tokens) where FLAP averages over samples: one constant per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..base import LayerStats
from .evidence import BetaStats, GradEvidence
from .groups import GroupSet, Member, member_layout, positions_view


@dataclass
class Evidence:
    """Inputs of criteria besides the weights: per-layer input statistics and gradients."""

    stats: Mapping[str, LayerStats] | None = None
    grads: GradEvidence | None = None
    beta: Mapping[str, BetaStats] | None = None


def unit_scores(gs: GroupSet, per_member: list[torch.Tensor | None]) -> torch.Tensor:
    """Sum over members (``per_member[i]``: member i's position scores, or None) of each
    unit's positions, (units,) float64. A layer that is a member twice (its input and
    output channels tied by a residual addition) counts once per role."""
    total = torch.zeros(gs.units, dtype=torch.float64)
    for m, pos in zip(gs.members, per_member):
        if pos is not None:
            total += pos.to(torch.float64).cpu()[m.index].sum(1)  # (units, width) -> (units,)
    return total


class Criterion:
    """One importance criterion. ``needs``: statistics (``sq_norm``, ``col_sum``) of the
    stats members; ``grads``: "", "first" or "second" (gradient evidence it reads);
    ``beta``: Beta-Rank spreads of the producer layers."""

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    grads: ClassVar[str] = ""
    beta: ClassVar[bool] = False  # reads Beta-Rank spreads of the producers

    def position_scores(self, member: Member, module: nn.Module, ev: Evidence
                        ) -> torch.Tensor | None:
        """(positions,) scores of one member, or None when it does not contribute."""
        raise NotImplementedError

    def scores(self, gs: GroupSet, modules: Mapping[str, nn.Module], ev: Evidence
               ) -> torch.Tensor:
        per = [self.position_scores(m, modules[m.module], ev) for m in gs.members]
        if all(p is None for p in per):
            raise ValueError(f"{self.name}: no member of {gs.name} carries what it reads")
        return unit_scores(gs, per)


_CRITERIA: dict[str, Callable[[], Criterion]] = {}


def register_criterion(name: str, *aliases: str) -> Callable[[type], type]:
    """Register a criterion class under ``name`` (and aliases); duplicates refused."""
    def deco(cls: type) -> type:
        for key in (name, *aliases):
            if key in _CRITERIA:
                raise ValueError(f"structured criterion {key!r} is already registered")
            _CRITERIA[key] = cls
        cls.name = name
        return cls

    return deco


def criterion_names() -> list[str]:
    return sorted(_CRITERIA)


def get_criterion(name: str) -> Criterion:
    if name not in _CRITERIA:
        raise ValueError(f"criterion={name!r} is not registered; choose one of "
                         f"{criterion_names()}")
    return _CRITERIA[name]()


def _cpu(t: torch.Tensor) -> torch.Tensor:
    """Scores are computed on the CPU in float64 (statistics may live on the run device)."""
    return t.detach().to("cpu", torch.float64)


def _weight(module: nn.Module) -> torch.Tensor:
    return module.weight.detach().to(torch.float64).cpu()


@register_criterion("l1")
class L1(Criterion):
    def position_scores(self, member, module, ev):
        return positions_view(module, _weight(module), member.axis).abs().sum(1)


@register_criterion("l2")
class L2(Criterion):
    def position_scores(self, member, module, ev):
        return positions_view(module, _weight(module), member.axis).pow(2).sum(1)


class _Taylor(Criterion):
    """Salience ``s`` per weight entry, reduced per position as the variant says."""

    grads = "first"
    vector = False

    def salience(self, w: torch.Tensor, name: str, ev: GradEvidence) -> torch.Tensor:
        return w * ev.grad(name)

    def position_scores(self, member, module, ev):
        if ev.grads is None:
            raise ValueError(f"{self.name} needs gradients on calibration data")
        s = positions_view(module, self.salience(_weight(module), member.module, ev.grads),
                           member.axis)
        return s.sum(1).abs() if self.vector else s.abs().sum(1)


@register_criterion("taylor-vector")
class TaylorVector(_Taylor):
    vector = True


@register_criterion("taylor-first", "taylor")
class TaylorFirst(_Taylor):
    pass


@register_criterion("taylor-second")
class TaylorSecond(_Taylor):
    grads = "second"

    def salience(self, w, name, ev):
        return w * ev.fisher(name) * w


@register_criterion("taylor-mix")
class TaylorMix(_Taylor):
    grads = "second"

    def salience(self, w, name, ev):
        return w * ev.grad(name) - 0.5 * w * ev.fisher(name) * w


def _column_stats(member: Member, module: nn.Module, ev: Evidence) -> LayerStats | None:
    if not member.stats:
        return None
    if ev.stats is None or member.module not in ev.stats:
        raise ValueError(f"no input statistics for {member.module!r}")
    return ev.stats[member.module]


def _to_positions(module: nn.Module, columns: torch.Tensor) -> torch.Tensor:
    """Column scores of a layer's (out, in) matrix as per-input-position scores (a
    convolution's input channel sums its kernel taps)."""
    channels = module.weight.shape[member_layout(module, "in")]
    return columns.reshape(channels, -1).sum(1)


def _matrix(module: nn.Module) -> torch.Tensor:
    """The layer's weight as (out, in) float64 (in = columns the statistics describe)."""
    return positions_view(module, _weight(module), "out")


@register_criterion("wanda-sp")
class WandaSP(Criterion):
    needs = frozenset({"sq_norm"})

    def position_scores(self, member, module, ev):
        stats = _column_stats(member, module, ev)
        if stats is None:
            return None
        w = _matrix(module)  # (out, in)
        rms = (_cpu(stats.sq_norm) / max(stats.rows, 1)).sqrt()  # (in,)
        return _to_positions(module, w.abs().mean(0) * rms)


@register_criterion("flap")
class Flap(Criterion):
    needs = frozenset({"sq_norm", "col_sum"})

    def position_scores(self, member, module, ev):
        stats = _column_stats(member, module, ev)
        if stats is None:
            return None
        var = _cpu(stats.col_mean_var()[1])  # (in,)
        return _to_positions(module, var * _matrix(module).pow(2).sum(0))


@register_criterion("beta-rank")
class BetaRank(Criterion):
    beta = True

    def position_scores(self, member, module, ev):
        if member.axis != "out" or isinstance(module, nn.modules.batchnorm._BatchNorm):
            return None  # the paper ranks filters: only producers' rows count
        if ev.beta is None or member.module not in ev.beta:
            raise ValueError(f"beta-rank needs input/output spreads of {member.module!r}")
        b = ev.beta[member.module]
        s_in, s_out = _cpu(b.sigma_in()), _cpu(b.sigma_out())  # (L,), (K, L)
        varies = s_out > 0
        ratio = torch.where(varies, s_in / s_out.clamp_min(1e-300), torch.zeros_like(s_out))
        beta = ratio.sum(1) / varies.sum(1).clamp_min(1)  # mean over varying positions, (K,)
        l1 = positions_view(module, _weight(module), "out").abs().sum(1)  # (K,)
        return l1 * beta
