"""Structured (width) pruning of a model, end to end: groups -> evidence -> scores -> keep ->
(bias compensation) -> surgery, with a report.

``fraction`` is the share of the *decoder's* parameters (every parameter inside the blocks)
to remove; only the chosen kinds (heads, MLP channels) in the chosen blocks are candidates,
so e.g. MLP-only pruning needs a larger share of the MLP. ``skip_first`` / ``skip_last``
leave blocks whole (LLM-Pruner prunes layers 4..29 of 32 in its scripts).

``evidence`` may be passed in (statistics and gradients summed over federated clients);
otherwise it is computed here on ``calib`` (a list of token-id batches).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...config import ConfigError
from ..adapters import adapter_for
from ..pipeline import collect_model_stats
from .evidence import collect_beta_stats, collect_gradients, loss_for
from .groups import GroupSet
from .importance import Evidence, get_criterion
from .select import (
    KIND_OF,
    adaptive_keep,
    ratio_for_fraction,
    rounded,
    total_params,
    uniform_keep,
)
from .surgery import compensate_bias_, remove_units_

ALLOCATIONS = ("uniform", "adaptive")


@dataclass
class StructuredConfig:
    criterion: str = "taylor"  # see fedprune.prune.structured.importance
    allocation: str = "uniform"  # "uniform": same ratio per layer; "adaptive": FLAP's AL-AM
    fraction: float = 0.2  # share of the decoder's parameters to remove
    prune: str = "both"  # "both", "heads", "mlp"
    heads: str = "kv"  # head unit under GQA: "kv" (a kv head + its query heads) or "query"
    skip_first: int = 0  # blocks left whole at the start
    skip_last: int = 0  # ... and at the end
    bias_compensation: bool = False  # FLAP: removed inputs' mean moved into the bias
    residual: str = "group"  # CNN: channels tied by residual additions pruned together, "skip"
    round_to: int = 0  # keep a multiple of this many channels per layer (0/1: exact counts)

    def __post_init__(self) -> None:
        get_criterion(self.criterion)  # ValueError naming the criteria
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"structured.allocation={self.allocation!r}; choose one of "
                              f"{list(ALLOCATIONS)}")
        if not 0.0 < self.fraction < 1.0:
            raise ConfigError(f"structured.fraction={self.fraction!r} must be in (0, 1)")
        if self.prune not in ("both", "heads", "mlp"):
            raise ConfigError(f"structured.prune={self.prune!r}; choose 'both', 'heads' or 'mlp'")
        if self.heads not in ("kv", "query"):
            raise ConfigError(f"structured.heads={self.heads!r}; choose 'kv' or 'query'")
        if self.residual not in ("group", "skip"):
            raise ConfigError(f"structured.residual={self.residual!r}; choose 'group' or 'skip'")
        if self.round_to < 0:
            raise ConfigError(f"structured.round_to={self.round_to} must be >= 0")
        if self.skip_first < 0 or self.skip_last < 0:
            raise ConfigError("structured.skip_first/skip_last must be >= 0")


@dataclass
class ShrinkReport:
    """What a structured pruning run did."""

    config: StructuredConfig
    params_before: int
    params_after: int
    decoder_before: int
    decoder_after: int
    ratio: float | None  # the uniform ratio used (None for adaptive)
    layers: list[dict[str, int]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    keep: dict[str, torch.Tensor] = field(default_factory=dict)  # kept units per group set

    @property
    def decoder_removed(self) -> float:
        return 1.0 - self.decoder_after / self.decoder_before

    def as_dict(self) -> dict[str, Any]:
        return {"criterion": self.config.criterion, "allocation": self.config.allocation,
                "fraction": self.config.fraction, "prune": self.config.prune,
                "heads": self.config.heads, "ratio": self.ratio,
                "params_before": self.params_before, "params_after": self.params_after,
                "decoder_before": self.decoder_before, "decoder_after": self.decoder_after,
                "decoder_removed": round(self.decoder_removed, 6), "layers": self.layers,
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()}}


def decoder_params(model: nn.Module) -> int:
    """Parameters inside the model's blocks."""
    return sum(p.numel() for b in adapter_for(model).blocks(model)
               for p in b.module.parameters())


def candidate_groups(model: nn.Module, cfg: StructuredConfig) -> list[GroupSet]:
    adapter = adapter_for(model)
    n = len(adapter.blocks(model))
    lo, hi = cfg.skip_first, n - cfg.skip_last
    if lo >= hi:
        raise ConfigError(f"structured.skip_first={cfg.skip_first} and skip_last="
                          f"{cfg.skip_last} leave none of the {n} blocks to prune")
    kinds = KIND_OF[cfg.prune]
    return [gs for gs in adapter.structure_groups(model, cfg.heads, cfg.residual)
            if gs.kind in kinds and lo <= gs.block < hi]


def gather_evidence(model: nn.Module, groups: list[GroupSet], cfg: StructuredConfig,
                    calib: Any, device: torch.device | str = "cpu") -> Evidence:
    """Statistics and gradients that ``cfg``'s criterion (and compensation) read."""
    crit = get_criterion(cfg.criterion)
    needs = set(crit.needs) | ({"sq_norm", "col_sum"} if cfg.bias_compensation else set())
    batches = list(calib) if calib is not None else []
    if (needs or crit.grads or crit.beta) and not batches:
        raise ValueError(f"criterion {cfg.criterion!r} needs calibration data; got none")
    inputs = [b[0] if isinstance(b, (tuple, list)) else b for b in batches]  # labels dropped
    ev = Evidence()
    if needs:
        ev.stats = collect_model_stats(model, None, inputs, needs, device)
    if crit.grads:
        names = sorted({m.module for gs in groups for m in gs.members})
        ev.grads = collect_gradients(model, batches, names, crit.grads == "second",
                                     loss_for(batches[0]), device)
    if crit.beta:
        modules = dict(model.named_modules())
        producers = sorted({m.module for gs in groups for m in gs.members if m.axis == "out"
                            and isinstance(modules[m.module], (nn.Conv2d, nn.Linear))})
        ev.beta = collect_beta_stats(model, inputs, producers, device)
    return ev


def plan_keep(model: nn.Module, groups: list[GroupSet], scores: dict[str, torch.Tensor],
              cfg: StructuredConfig) -> tuple[dict[str, torch.Tensor], float | None]:
    """Kept units per group set for ``cfg``'s allocation, and the uniform ratio if any."""
    modules = dict(model.named_modules())
    target = cfg.fraction * decoder_params(model)
    if target >= total_params(groups, modules):
        raise ConfigError(f"structured.fraction={cfg.fraction} asks for {int(target)} "
                          f"parameters; pruning {cfg.prune!r} can remove at most "
                          f"{total_params(groups, modules)}")
    if cfg.allocation == "adaptive":
        keep = adaptive_keep(groups, scores, modules, target)
        return rounded(groups, scores, keep, cfg.round_to), None
    kinds = KIND_OF[cfg.prune]
    ratio = ratio_for_fraction(groups, modules, target, kinds, round_to=cfg.round_to)
    return uniform_keep(groups, scores, {k: ratio for k in kinds}, cfg.round_to), ratio


def shrink(model: nn.Module, cfg: StructuredConfig, calib: Any = None,
           evidence: Evidence | None = None, device: torch.device | str = "cpu"
           ) -> ShrinkReport:
    """Structurally prune ``model`` in place as ``cfg`` says; see the module docstring."""
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    before, dec_before = sum(p.numel() for p in model.parameters()), decoder_params(model)
    groups = candidate_groups(model, cfg)
    crit = get_criterion(cfg.criterion)
    if evidence is None:
        evidence = gather_evidence(model, groups, cfg, calib, device)
    times["evidence"] = time.perf_counter() - t0
    modules = dict(model.named_modules())
    scores = {gs.name: crit.scores(gs, modules, evidence) for gs in groups}
    keep, ratio = plan_keep(model, groups, scores, cfg)
    times["score"] = time.perf_counter() - t0 - times["evidence"]
    adapter = adapter_for(model)
    if cfg.bias_compensation:
        adapter.enable_biases_(model)
        means = {name: s.col_mean_var()[0] for name, s in (evidence.stats or {}).items()
                 if s.col_sum is not None}
        compensate_bias_(model, groups, keep, means)
    remove_units_(model, groups, keep)
    times["total"] = time.perf_counter() - t0
    layers = adapter.layer_shapes(model)
    return ShrinkReport(cfg, before, sum(p.numel() for p in model.parameters()), dec_before,
                        decoder_params(model), ratio, layers, times, keep)
