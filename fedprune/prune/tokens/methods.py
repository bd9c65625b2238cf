"""Token pruners: registered units that shrink a transformer's token sequence between
attention and MLP, in every block a schedule names (no weights change, no fine-tuning).

- ``zero-tprune`` (Wang, Dedhia and Jha, CVPR 2024): per pruning block, I' -> S -> I.
  I': one WPR step ranks the tokens; the less important half (group A) are candidates,
  the more important half (group B) the references ("Sequential-U" partition). S-stage:
  each A token's most similar B token by cosine similarity of the keys (averaged over
  heads); the ``s_share`` of the block's removals with the highest similarity are dropped
  (pruned, not merged). I-stage: WPR (iterations by depth) on the attention graph of the
  tokens left, rows renormalised, heads combined by VHF + EIR; the least important are
  dropped. The class token is never dropped and never ranked. Choices the paper's text
  (not available to us in full) may settle differently: the S/I split (``s_share``,
  default half), key pooling by the mean over heads, and WPR after the S-stage on the
  graph restricted to the remaining tokens. Public code differs from the paper in ways we
  do not follow: the first author's precursor (github Hongjiew/Transformer_pruning, a
  course project, no similarity stage) ranks on a temperature-sharpened softmax (tau 0.5;
  ``tau`` here, default 1: the paper's attention as is) with 5 iterations and prunes after
  blocks 3, 6 and 9 of DeiT's 12; the version we read (95a34e0) has that iteration
  commented out and ranks on ``torch.rand`` scores. Third-party code uses one column mean
  instead of the iteration and index order instead of importance order. (Schedules like
  the precursor's, tau, and the class-attention control, measured on our ViT:
  experiments/token_schedules.py.)
- ``tome`` (Bolya et al., ICLR 2023): bipartite soft matching on the keys averaged over
  heads; alternate tokens form sets A and B, each A token's best B match is an edge, the
  ``r`` best edges merge (size-weighted mean); the class token is never a source and stays
  first; proportional attention (log size added to attention logits) on by default.
- ``random``: drops the same number of tokens at random (the control).
- ``cls-attn``: keeps the tokens the class token attends to most (head mean; EViT's
  criterion without fusion), the one-step attention control for WPR.

Schedules: ``keep`` (fractions of the non-class tokens kept at each block, 1 = none
removed) for zero-tprune, cls-attn and random, ``r`` (tokens merged per block) for tome;
both give a count per block, so the methods compare at equal token counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F

from ..adapters import adapter_for
from .wpr import (combine_heads, default_cls_weight, iterations_for, restrict, sharpen,
                  weighted_pagerank)

_TOKEN_PRUNERS: dict[str, type["TokenPruner"]] = {}


def register_token_pruner(cls: type["TokenPruner"]) -> type["TokenPruner"]:
    if cls.name in _TOKEN_PRUNERS:
        raise ValueError(f"token pruner {cls.name!r} is already registered")
    _TOKEN_PRUNERS[cls.name] = cls
    return cls


def token_pruner(name: str, **options) -> "TokenPruner":
    if name not in _TOKEN_PRUNERS:
        raise ValueError(f"token pruning method {name!r} is not registered; choose one of "
                         f"{sorted(_TOKEN_PRUNERS)}")
    return _TOKEN_PRUNERS[name](**options)


def token_pruners() -> list[str]:
    return sorted(_TOKEN_PRUNERS)


def schedule_pruner(name: str, schedule, **options) -> "TokenPruner":
    """``name`` on one schedule: ToMe's r (tokens merged per block), the others' keep
    fractions per block."""
    if name == "tome":
        return token_pruner(name, r=schedule, **options)
    return token_pruner(name, keep=list(schedule), **options)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, N, C), index (B, K) -> (B, K, C)."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _top_tokens(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (B, k), in sequence order, of the ``k`` highest scores; the class token
    (0) always among them. Overwrites ``scores[:, 0]``."""
    scores[:, 0] = float("inf")
    return _keep_order(scores.topk(k, dim=1).indices)


def _keep_order(keep: torch.Tensor) -> torch.Tensor:
    return keep.sort(dim=1).values


@dataclass
class TokenPruner:
    """A schedule of removals per block; ``attach`` installs the reducers on a model's
    token blocks (through its adapter), ``detach`` removes them."""

    name: ClassVar[str] = ""
    keep: Sequence[float] = ()  # per block: fraction of non-class tokens kept (1 = none)
    r: Sequence[int] | int = ()  # per block (or every block): tokens removed

    def __post_init__(self) -> None:
        for i, k in enumerate(self.keep):
            if not 0 < k <= 1:
                raise ValueError(f"{self.name}: keep[{i}]={k} is outside (0, 1]")
        rs = [self.r] if isinstance(self.r, int) else list(self.r)
        if any(v < 0 for v in rs):
            raise ValueError(f"{self.name}: r={self.r} must be >= 0")

    def removals(self, layer: int, n: int) -> int:
        """Tokens to remove at ``layer`` from ``n`` (class token included, never removed)."""
        m = n - 1
        if self.keep:
            k = self.keep[layer] if layer < len(self.keep) else 1.0
            return m - max(1, round(m * k))
        r = self.r if isinstance(self.r, int) else (self.r[layer] if layer < len(self.r)
                                                      else 0)
        return min(r, m - 1)

    def attach(self, model) -> list:
        blocks = adapter_for(model).token_blocks(model)
        if self.keep and len(self.keep) > len(blocks):
            raise ValueError(f"{self.name}: keep names {len(self.keep)} blocks, the model "
                             f"has {len(blocks)}")
        for i, block in enumerate(blocks):
            block.reducer = self._reducer(i, len(blocks))
        return blocks

    @staticmethod
    def detach(model) -> None:
        for block in adapter_for(model).token_blocks(model):
            block.reducer, block.proportional = None, False

    def _reducer(self, layer: int, depth: int):
        def reduce(block, x, sizes):
            remove = self.removals(layer, x.shape[1])
            if remove <= 0:
                return x, sizes
            return self.reduce(layer, depth, block, x, sizes, remove)
        return reduce

    def reduce(self, layer, depth, block, x, sizes, remove):
        raise NotImplementedError


@register_token_pruner
@dataclass
class RandomDrop(TokenPruner):
    name: ClassVar[str] = "random"
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._gen = torch.Generator().manual_seed(self.seed)

    def reduce(self, layer, depth, block, x, sizes, remove):
        b, n, _ = x.shape
        order = torch.stack([torch.randperm(n - 1, generator=self._gen) + 1 for _ in range(b)])
        keep = torch.cat([torch.zeros(b, 1, dtype=torch.long), order[:, :n - 1 - remove]], 1)
        keep = _keep_order(keep.to(x.device))
        return gather_tokens(x, keep), gather_tokens(sizes, keep)


def _key_metric(keys: torch.Tensor) -> torch.Tensor:
    """(B, H, N, d) keys -> (B, N, d) head-averaged, unit length."""
    return F.normalize(keys.mean(1).float(), dim=-1)


@register_token_pruner
@dataclass
class ZeroTPrune(TokenPruner):
    name: ClassVar[str] = "zero-tprune"
    s_share: float = 0.5  # share of a block's removals made by the similarity stage
    iterations: tuple[int, int, int] = (30, 5, 1)  # early / middle / last-three layers
    v_min: float | None = 0.01
    v_max: float | None = 0.7
    cls_weight: str = "sqrt"  # "sqrt" (sqrt(N) x the others) or "uniform"
    tau: float = 1.0  # softmax temperature of the graph WPR ranks on (1: the attention itself)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.s_share <= 1:
            raise ValueError(f"zero-tprune: s_share={self.s_share} is outside [0, 1]")
        if self.tau <= 0:
            raise ValueError(f"zero-tprune: tau={self.tau} must be > 0")

    def importance(self, attention: torch.Tensor, iterations: int,
                   present: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N) importance; ``present`` (B, N, the same count in every row): the tokens
        of a ``restrict``-ed graph, which alone count for N."""
        n = attention.shape[-1] if present is None else int(present[0].sum())
        w = default_cls_weight(n) if self.cls_weight == "sqrt" else None
        graph = sharpen(attention, self.tau)  # commutes with restrict: both renormalise rows
        return combine_heads(weighted_pagerank(graph, iterations, w, present), self.v_min,
                             self.v_max, present)

    def s_stage(self, importance: torch.Tensor, keys: torch.Tensor, r: int) -> torch.Tensor:
        """Indices (B, N - r) of the tokens kept after dropping the ``r`` group-A tokens
        most similar to a group-B token; group A = the less important half of the
        non-class tokens."""
        b, n = importance.shape
        keep = self._s_stage_mask(importance, keys, r)
        return keep.nonzero()[:, 1].view(b, int(keep[0].sum()))

    def _s_stage_mask(self, importance: torch.Tensor, keys: torch.Tensor, r: int
                      ) -> torch.Tensor:
        b, n = importance.shape
        order = importance[:, 1:].argsort(dim=1) + 1  # ascending importance, class token out
        half = (n - 1) // 2
        a_idx, b_idx = order[:, :half], order[:, half:]
        metric = _key_metric(keys)
        sim = gather_tokens(metric, a_idx) @ gather_tokens(metric, b_idx).transpose(1, 2)
        best = sim.max(dim=-1).values  # (B, |A|)
        r = min(r, half)
        drop = a_idx.gather(1, best.argsort(dim=1, descending=True)[:, :r])
        keep = torch.ones(b, n, dtype=torch.bool, device=importance.device)
        keep.scatter_(1, drop, False)
        return keep

    def reduce(self, layer, depth, block, x, sizes, remove):
        attention, keys = block.last_attention, block.last_keys
        if attention is None or keys is None:
            raise ValueError("zero-tprune: the block kept no attention probabilities / keys")
        b, n = x.shape[:2]
        r_s = round(self.s_share * remove)
        present = None
        if r_s:
            ranking = self.importance(attention, 1)  # I': one vote, for the partition only
            present = self._s_stage_mask(ranking, keys, r_s)
        left = n if present is None else int(present[0].sum())
        r_i = remove - (n - left)
        if r_i > 0:
            # the graph among the tokens the S-stage left, kept full-size (no gathers)
            graph = attention if present is None else restrict(attention, present)
            early, middle, late = self.iterations
            scores = self.importance(graph, iterations_for(layer, depth, early, middle, late),
                                     present)
            if present is not None:
                scores = scores.masked_fill(~present, -float("inf"))
            kept = _top_tokens(scores, left - r_i)
        else:
            kept = present.nonzero()[:, 1].view(b, left)
        return gather_tokens(x, kept), gather_tokens(sizes, kept)


@register_token_pruner
@dataclass
class ClassAttention(TokenPruner):
    """The class token's attention as the importance (mean over heads): the criterion of
    EViT (Liang et al., ICLR 2022) without its fusion of the dropped tokens. A control for
    Zero-TPrune: does one-step attention from the class token rank better than WPR?"""

    name: ClassVar[str] = "cls-attn"

    def reduce(self, layer, depth, block, x, sizes, remove):
        if block.last_attention is None:
            raise ValueError("cls-attn: the block kept no attention probabilities")
        scores = block.last_attention[:, :, 0, :].float().mean(1)  # (B, N)
        kept = _top_tokens(scores, x.shape[1] - remove)
        return gather_tokens(x, kept), gather_tokens(sizes, kept)


@register_token_pruner
@dataclass
class ToMe(TokenPruner):
    name: ClassVar[str] = "tome"
    proportional: bool = True

    def attach(self, model) -> list:
        blocks = super().attach(model)
        for block in blocks:
            block.proportional = self.proportional
        return blocks

    def removals(self, layer: int, n: int) -> int:
        return min(super().removals(layer, n), (n - 1) // 2)

    def reduce(self, layer, depth, block, x, sizes, remove):
        return bipartite_merge(x, sizes, _key_metric(block.last_keys), remove)


def bipartite_merge(x: torch.Tensor, sizes: torch.Tensor, metric: torch.Tensor, r: int):
    """ToMe's bipartite soft matching: tokens 0, 2, 4, ... form set A, 1, 3, ... set B;
    the ``r`` A tokens with the most similar B token merge into it (size-weighted mean
    of the tokens, sizes added); A's class token (token 0) never merges and stays first."""
    a, b_ = metric[:, ::2], metric[:, 1::2]
    scores = a @ b_.transpose(1, 2)
    scores[:, 0, :] = -float("inf")
    r = min(r, a.shape[1] - 1)
    node_max, node_idx = scores.max(dim=-1)
    edges = node_max.argsort(dim=-1, descending=True)
    src, unm = edges[:, :r], edges[:, r:].sort(dim=1).values
    dst = node_idx.gather(1, src)

    def merge(t: torch.Tensor) -> torch.Tensor:
        ta, tb = t[:, ::2], t[:, 1::2]
        moved = gather_tokens(ta, src)
        tb = tb.scatter_reduce(1, dst.unsqueeze(-1).expand(-1, -1, t.shape[-1]), moved,
                               reduce="sum")
        return torch.cat([gather_tokens(ta, unm), tb], dim=1)

    weighted = merge(x * sizes)
    sizes = merge(sizes)
    return weighted / sizes, sizes
