"""Wanda: pruning by weights and activations (Sun, Liu, Bair, Kolter 2023, "A Simple and
Effective Pruning Approach for Large Language Models", arXiv 2306.11695).

Score (paper Eq. 1): ``S_ij = |W_ij| * ||X_j||_2``, where ``||X_j||_2`` is the L2 norm of
input feature ``j`` over all calibration tokens (``LayerStats.col_norms()``). Since the norms
are plain sums of squares, federated statistics combine exactly.

Comparison group (paper Sec. 3, "comparison group": per output): weights compete only within
their output row; each row keeps ``in - round(s * in)``. ``wanda.scope = "layer"`` gives the
per-layer comparison the paper ablates against. ``target.scope`` is *not* used for
unstructured selection: the ``SparsityTarget`` default "layer" cannot be told apart from an
explicit choice, and the paper's method is per row. Scope "global" is the pipeline's
(``scores`` + ``select_global``); ``prune`` refuses it. N:M (the paper's 2:4 / 4:8 results):
the ``n`` lowest scores of every ``m`` consecutive inputs of a row are pruned.

Differences from the reference code (locuslab/wanda ``lib/prune.py``): it prunes
``int(s * in)`` per row (floor) and breaks ties by ``torch.topk``/``torch.sort`` order; here
``round(s * in)`` (same at 50% on even widths) with ties to the earlier input. No weight update.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...config import ConfigError
from ...masks.select import select_layer, select_nm, select_rows
from ..base import LayerStats, Pruner, PruneResult, SparsityTarget, register_pruner

SCOPES = ("row", "layer")


@dataclass
class WandaConfig:
    scope: str = "row"  # comparison group: "row" (paper, per output) or "layer" (ablation)

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ConfigError(f"wanda.scope={self.scope!r} is not valid; choose one of "
                              f"{list(SCOPES)}")


def wanda_scores(weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
    """``|W_ij| * ||X_j||_2`` (out, in), float32 on the weight's device."""
    if stats.sq_norm.shape[0] != weight.shape[1]:
        raise ValueError(f"wanda: stats of width {stats.sq_norm.shape[0]} for weight "
                         f"{tuple(weight.shape)}")
    norms = stats.col_norms().to(device=weight.device, dtype=torch.float32)  # (in,)
    return weight.detach().float().abs() * norms  # (out, in)


@register_pruner("wanda", WandaConfig)
class WandaPruner(Pruner):
    """Keep the largest ``|W| * ||X_j||`` per output row (or per layer, or N:M)."""

    needs = frozenset({"sq_norm"})

    def scores(self, weight: torch.Tensor, stats: LayerStats | None) -> torch.Tensor:
        if stats is None:
            raise ValueError("wanda needs calibration statistics (sq_norm); got none")
        return wanda_scores(weight, stats)

    def prune(self, weight: torch.Tensor, stats: LayerStats | None, target: SparsityTarget
              ) -> PruneResult:
        scores = self.scores(weight, stats)  # (out, in)
        if target.m:
            return PruneResult(select_nm(scores, target.n, target.m))
        if target.scope == "global":
            raise ValueError("wanda: scope 'global' is selected by the pipeline over all "
                             "layers' scores() (select_global), not by prune() on one layer")
        select = select_rows if self.cfg.scope == "row" else select_layer
        return PruneResult(select(scores, target.sparsity))
