"""Interfaces shared by every pruning method, adapter and the calibration engine.

A layer is seen as a matrix ``W`` of shape (out, in) acting on input rows ``x`` of length
``in`` (linear: the token's features; conv: an unfolded in*kh*kw patch; GPT-2 Conv1D: the
transposed weight). Methods never see a model: they get ``W`` and the layer's calibration
statistics, and return a mask (and, for reconstruction methods, new weights).

Steps are separate (house style): a pruner *scores* (or reconstructs), the shared
selection module (``fedprune.masks.select``) turns scores into masks, the pipeline
*applies* them through the model-family adapter.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np
import torch


@dataclass
class BatchTerms:
    """One batch's contribution to :class:`LayerStats`: ``sum_n x_nj^2``, ``x^T x``, rows."""

    sq_norm: torch.Tensor  # (in,) float64
    gram: torch.Tensor | None  # (in, in) float64
    rows: int
    col_sum: torch.Tensor | None = None  # (in,) float64: sum_n x_nj (FLAP's input means)


def batch_terms(x: torch.Tensor, width: int, with_gram: bool,
                device: torch.device | str = "cpu", with_sum: bool = False) -> BatchTerms:
    """The sums of input rows ``x`` (rows, in) that :class:`LayerStats` accumulates.

    The Gram of one batch is multiplied in float32 when the rows are float32 or narrower
    (the SparseGPT reference accumulates its whole Hessian in float32; float64 costs twice
    the time of the engine's largest cost) and added into the float64 running sum, so
    only one batch's products round in float32 (relative error ~1e-7 * sqrt(rows)); float64
    rows stay float64 throughout. Squared norms are cheap and always summed in float64.
    """
    if x.dim() != 2 or x.shape[1] != width:
        raise ValueError(f"expected rows of width {width}, got {tuple(x.shape)}")
    x = x.detach().to(device)
    x64 = x.to(torch.float64)
    gram = None
    if with_gram:
        xg = x64 if x.dtype == torch.float64 else x.to(torch.float32)
        gram = (xg.T @ xg).to(torch.float64)  # (in, in)
    col_sum = x64.sum(0) if with_sum else None
    return BatchTerms((x64 * x64).sum(0), gram, x.shape[0], col_sum)


@dataclass
class LayerStats:
    """Sums over a layer's calibration input rows ``X`` (rows, in), accumulated in float64.

    ``sq_norm[j] = sum_n X[n, j]^2`` (Wanda's ||X_j||_2^2), ``gram = X^T X`` (SparseGPT's
    and ADMM's Hessian up to scale), ``rows = n``. All are plain sums, so statistics
    computed on several machines (or halves of the data) combine exactly by ``+``: the
    basis of federated pruning of LLMs. ``col_sum[j] = sum_n X[n, j]`` (optional) gives the
    input means and, with ``sq_norm``, variances (FLAP's fluctuation).
    """

    sq_norm: torch.Tensor  # (in,) float64
    gram: torch.Tensor | None  # (in, in) float64, or None when no method needs it
    rows: int
    col_sum: torch.Tensor | None = None  # (in,) float64, or None when no method needs it

    @classmethod
    def empty(cls, in_features: int, with_gram: bool, device: torch.device | str = "cpu",
              with_sum: bool = False) -> "LayerStats":
        zeros = torch.zeros(in_features, dtype=torch.float64, device=device)
        gram = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        return cls(zeros, gram if with_gram else None, 0, zeros.clone() if with_sum else None)

    def add_batch_(self, x: torch.Tensor) -> None:
        """Accumulate input rows ``x`` (rows, in), any float dtype."""
        self.add_terms_(batch_terms(x, self.sq_norm.shape[0], self.gram is not None,
                                    self.sq_norm.device, self.col_sum is not None))

    def add_terms_(self, terms: BatchTerms) -> None:
        """Accumulate one batch's sums (from :func:`batch_terms`)."""
        if terms.sq_norm.shape != self.sq_norm.shape:
            raise ValueError(f"expected rows of width {self.sq_norm.shape[0]}, got "
                             f"{tuple(terms.sq_norm.shape)}")
        self.sq_norm += terms.sq_norm
        if self.gram is not None:
            if terms.gram is None:
                raise ValueError("these statistics keep a Gram matrix; the batch has none")
            self.gram += terms.gram
        if self.col_sum is not None:
            if terms.col_sum is None:
                raise ValueError("these statistics keep column sums; the batch has none")
            self.col_sum += terms.col_sum
        self.rows += terms.rows

    def __add__(self, other: "LayerStats") -> "LayerStats":
        if self.sq_norm.shape != other.sq_norm.shape:
            raise ValueError(f"cannot add stats of widths {self.sq_norm.shape} and {other.sq_norm.shape}")
        if (self.gram is None) != (other.gram is None):
            raise ValueError("cannot add stats with and without a Gram matrix")
        if (self.col_sum is None) != (other.col_sum is None):
            raise ValueError("cannot add stats with and without column sums")
        gram = None if self.gram is None else self.gram + other.gram.to(self.gram.device)
        col_sum = (None if self.col_sum is None
                   else self.col_sum + other.col_sum.to(self.col_sum.device))
        return LayerStats(self.sq_norm + other.sq_norm.to(self.sq_norm.device), gram,
                          self.rows + other.rows, col_sum)

    def col_norms(self) -> torch.Tensor:
        """||X_j||_2 per input column, (in,) float64."""
        return self.sq_norm.sqrt()

    def col_mean_var(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per input column mean and population variance over the rows, (in,) float64 each."""
        if self.col_sum is None or self.rows == 0:
            raise ValueError("input means need statistics with column sums ('col_sum') over "
                             "at least one row")
        mean = self.col_sum / self.rows
        return mean, (self.sq_norm / self.rows - mean * mean).clamp_min(0.0)

    def to_numpy(self) -> dict[str, np.ndarray]:
        out = {"sq_norm": self.sq_norm.cpu().numpy(), "rows": np.array(self.rows, np.int64)}
        if self.gram is not None:
            out["gram"] = self.gram.cpu().numpy()
        if self.col_sum is not None:
            out["col_sum"] = self.col_sum.cpu().numpy()
        return out

    @classmethod
    def from_numpy(cls, d: dict[str, np.ndarray]) -> "LayerStats":
        def opt(key: str) -> torch.Tensor | None:
            return torch.from_numpy(np.asarray(d[key], np.float64)) if key in d else None

        return cls(torch.from_numpy(np.asarray(d["sq_norm"], np.float64)), opt("gram"),
                   int(d["rows"]), opt("col_sum"))


@dataclass(frozen=True)
class SparsityTarget:
    """What to prune in one layer.

    ``sparsity``: fraction of the layer's weights set to zero, in [0, 1).
    ``n``, ``m``: an N:M pattern when ``m > 0``: in every group of ``m`` consecutive
    input weights of a row, ``n`` are pruned (SparseGPT/Wanda reference convention
    ``prune_n:prune_m``; 2:4 and 4:8 are 50%). With a pattern, ``sparsity`` is n/m.
    ``scope``: comparison group for unstructured selection: "layer" (one threshold per
    layer), "row" (per output row, Wanda's choice), "global" (across layers).
    """

    sparsity: float
    n: int = 0
    m: int = 0
    scope: str = "layer"

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity={self.sparsity!r} must be in [0, 1)")
        if self.m:
            if not 0 < self.n < self.m:
                raise ValueError(f"N:M pattern {self.n}:{self.m} needs 0 < N < M")
            if abs(self.sparsity - self.n / self.m) > 1e-9:
                raise ValueError(f"pattern {self.n}:{self.m} implies sparsity {self.n / self.m}, "
                                 f"got {self.sparsity}")
        if self.scope not in ("layer", "row", "global"):
            raise ValueError(f"scope={self.scope!r}; choose one of ['layer', 'row', 'global']")

    @property
    def pattern(self) -> str:
        return f"{self.n}:{self.m}" if self.m else ""

    @classmethod
    def parse(cls, sparsity: float, pattern: str = "", scope: str = "layer") -> "SparsityTarget":
        """From CLI-style settings: ``pattern`` "" or "N:M" (then sparsity = N/M)."""
        if not pattern:
            return cls(float(sparsity), scope=scope)
        try:
            n, m = (int(v) for v in pattern.split(":"))
        except ValueError:
            raise ValueError(f"pattern={pattern!r} is not of the form N:M, e.g. 2:4") from None
        return cls(n / m, n, m, scope)


@dataclass
class PruneResult:
    """``mask`` (out, in) bool, True = kept; ``weight`` (out, in) new weights (zeros where
    pruned) or None when the method keeps the surviving weights unchanged."""

    mask: torch.Tensor
    weight: torch.Tensor | None = None


class Pruner(ABC):
    """One pruning method. Subclasses register with ``@register_pruner(name, ConfigClass)``.

    ``needs``: statistics the method reads: {} (magnitude), {"sq_norm"} (Wanda),
    {"sq_norm", "gram"} (SparseGPT, ADMM). The calibration engine collects only these.
    """

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    def require_gram(self, stats: LayerStats | None) -> LayerStats:
        """``stats`` with a Gram matrix, or a clear error naming the method."""
        if stats is None or stats.gram is None:
            raise ValueError(f"{self.name} needs calibration statistics with a Gram matrix")
        return stats

    def scores(self, weight: torch.Tensor, stats: LayerStats | None) -> torch.Tensor | None:
        """Importance per weight (out, in), larger = keep; None for methods that select
        inside their own algorithm (SparseGPT, ADMM)."""
        return None

    @abstractmethod
    def prune(self, weight: torch.Tensor, stats: LayerStats | None, target: SparsityTarget
              ) -> PruneResult:
        """Mask (and new weights) for one layer's ``weight`` (out, in) at ``target``."""


_PRUNERS: dict[str, tuple[type[Pruner], type]] = {}


def register_pruner(name: str, config_cls: type) -> Callable[[type[Pruner]], type[Pruner]]:
    """Register a pruner class and its typed config under ``name``; duplicates refused."""
    def deco(cls: type[Pruner]) -> type[Pruner]:
        if name in _PRUNERS:
            raise ValueError(f"pruning method {name!r} is already registered")
        cls.name = name
        _PRUNERS[name] = (cls, config_cls)
        return cls

    return deco


def pruner_names() -> list[str]:
    return sorted(_PRUNERS)


def get_pruner(name: str, cfg: Any = None, **overrides: Any) -> Pruner:
    """Instantiate method ``name`` with ``cfg`` (default: its config class's defaults)."""
    if name not in _PRUNERS:
        raise ValueError(f"method={name!r} is not registered; choose one of {pruner_names()}")
    cls, config_cls = _PRUNERS[name]
    if cfg is None:
        cfg = config_cls(**overrides)
    elif not isinstance(cfg, config_cls):
        raise TypeError(f"method {name!r} needs a {config_cls.__name__}, got {type(cfg).__name__}")
    return cls(cfg)


def config_class(name: str) -> type:
    if name not in _PRUNERS:
        raise ValueError(f"method={name!r} is not registered; choose one of {pruner_names()}")
    return _PRUNERS[name][1]
