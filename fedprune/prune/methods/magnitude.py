"""Magnitude pruning: keep the largest ``|W_ij|``.

Score ``S_ij = |W_ij|`` (Han et al. 2015, "Learning both Weights and Connections for Efficient
Neural Networks"; the LLM baseline of the SparseGPT and Wanda papers). No calibration data.
Selection by ``target``: one threshold per layer (scope "layer"), per output row (scope
"row"), or N:M (prune the ``n`` smallest of every ``m`` consecutive inputs of a row).
Scope "global" compares across layers: the pipeline does that with :meth:`scores` and
``select_global``; ``prune`` refuses it.

Difference from the Wanda repository's ``prune_magnitude`` (the usual LLM reference): it
prunes every ``|W| <= sorted(|W|)[int(s * numel)]``, i.e. ``int(s * numel) + 1`` weights plus
ties; here exactly ``round(s * numel)`` are pruned, ties broken by position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...masks.select import select_target
from ..base import LayerStats, Pruner, PruneResult, SparsityTarget, register_pruner


@dataclass
class MagnitudeConfig:
    """Magnitude pruning has no options; everything is in the ``SparsityTarget``."""

    def __post_init__(self) -> None:
        pass


@register_pruner("magnitude", MagnitudeConfig)
class MagnitudePruner(Pruner):
    """Keep the largest-magnitude weights."""

    needs = frozenset()

    def scores(self, weight: torch.Tensor, stats: LayerStats | None) -> torch.Tensor:
        return weight.detach().float().abs()  # (out, in)

    def prune(self, weight: torch.Tensor, stats: LayerStats | None, target: SparsityTarget
              ) -> PruneResult:
        if target.scope == "global" and not target.m:
            raise ValueError("magnitude: scope 'global' is selected by the pipeline over all "
                             "layers' scores() (select_global), not by prune() on one layer")
        return PruneResult(select_target(self.scores(weight, stats), target))
