"""Progressive pruning (FedTiny, Huang et al. 2023, Sec. IV-B), Flower-free pieces.

Every ``delta_r`` rounds until ``r_end`` one layer is adjusted. Clients keep, during local
training, only the top-K gradients (by magnitude) at that layer's *pruned* positions in a
bounded buffer: never a dense per-layer gradient beyond the one backpropagation itself
produces. The server sums the clients' sparse top-K (weighted by examples), grows the K
positions with the largest aggregated gradient and prunes the K smallest-magnitude active
weights of that layer, so the density is unchanged (``fedprune.masks.regrow``, the one
prune-and-grow every method uses). Grown weights start at zero (RigL).

``K = alpha_t * active``, ``alpha_t = alpha / 2 * (1 + cos(pi * t / r_end))`` (the cosine
decay of RigL, Evci et al. 2020, which FedTiny adopts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Schedule:
    """When and how much to adjust: every ``delta_r`` rounds up to ``r_end``."""

    rounds: int
    delta_r: int = 5
    r_end: int = 0  # 0 = three quarters of the rounds
    alpha: float = 0.3

    def __post_init__(self) -> None:
        if self.delta_r <= 0:
            raise ValueError(f"method.delta_r={self.delta_r} must be > 0")
        if self.r_end == 0:
            self.r_end = max(1, (3 * self.rounds) // 4)
        if not 0 < self.r_end <= self.rounds:
            raise ValueError(f"method.r_end={self.r_end} must be in [1, fed.rounds={self.rounds}]")
        if not 0 < self.alpha <= 1:
            raise ValueError(f"method.alpha={self.alpha} must be in (0, 1]")

    def adjusts(self, server_round: int) -> bool:
        return server_round < self.r_end and server_round % self.delta_r == 0

    def fraction(self, server_round: int) -> float:
        return self.alpha / 2 * (1 + math.cos(math.pi * server_round / self.r_end))

    def k(self, server_round: int, active: int, pruned: int) -> int:
        """How many weights move in this round's adjustment (bounded by what can move)."""
        k = int(self.fraction(server_round) * active)
        return max(0, min(k, active, pruned))


CHUNK = 1 << 16  # elements per top-k pass on CPU


def topk_indices(flat: torch.Tensor, k: int, largest: bool = True) -> torch.Tensor:
    """Indices of the ``k`` largest (or smallest) entries of a 1-D tensor.

    On CPU, ``torch.topk`` sorts in a native scratch buffer of about 16 bytes per *input*
    element (invisible to the profiler, measured by RSS: 38 MB for one ResNet-18 layer),
    so the layer is ranked in chunks of ``CHUNK`` elements with a running top-k: scratch
    is bounded by the chunk plus 2k. On CUDA one call is cheap and exact, so no chunks."""
    n = flat.numel()
    if flat.device.type != "cpu" or n <= CHUNK:
        return torch.topk(flat, k, largest=largest).indices
    best_val, best_idx = flat[:0], torch.empty(0, dtype=torch.long)
    for start in range(0, n, CHUNK):
        part = flat[start:start + CHUNK]  # a view
        top = torch.topk(part, min(k, part.numel()), largest=largest)
        vals = torch.cat([best_val, top.values])  # (<= 2k,)
        idx = torch.cat([best_idx, top.indices + start])
        keep = torch.topk(vals, min(k, vals.numel()), largest=largest).indices
        best_val, best_idx = vals[keep], idx[keep]
    return best_idx


class TopKBuffer:
    """The K pruned positions with the largest accumulated gradient, and nothing more.

    ``add_`` takes one step's gradient of the layer (the tensor backpropagation made). It
    ranks the pruned positions in place and puts the kept positions' values back, so the
    optimizer step that follows sees the gradient unchanged. Memory: the K (index, value)
    pairs plus the kept positions' indices (the client holds those weights anyway); no
    dense accumulator and no dense copy of the gradient.
    """

    def __init__(self, k: int, mask: torch.Tensor) -> None:
        if not 0 <= k <= mask.numel():
            raise ValueError(f"K={k} must be in [0, {mask.numel()}] (the layer's size)")
        self.k, self.numel = k, mask.numel()
        # int64 on purpose: indexing with int32 makes an int64 copy of the index every step
        self.kept = mask.reshape(-1).nonzero().squeeze(1)  # (active,)
        self.index = torch.empty(0, dtype=torch.long)
        self.value = torch.empty(0)

    @torch.no_grad()
    def add_(self, grad: torch.Tensor) -> None:
        """Merge this step's top-K pruned-position gradients into the buffer."""
        if self.k == 0:
            return
        flat = grad.view(-1)  # (numel,) a view: no copy
        saved = flat[self.kept]  # (active,)
        flat[self.kept] = 0  # only pruned positions compete
        top = topk_indices(flat, self.k, largest=True)  # largest positive (k,)
        bottom = topk_indices(flat, self.k, largest=False)  # most negative (k,)
        idx = torch.cat([self.index.to(flat.device), top, bottom])
        val = torch.cat([self.value.to(flat), flat[top], flat[bottom]])
        flat[self.kept] = saved  # the optimizer step needs the kept positions' gradient
        self._keep_top_(idx.cpu(), val.float().cpu())

    def _keep_top_(self, idx: torch.Tensor, val: torch.Tensor) -> None:
        uniq, inverse = torch.unique(idx, return_inverse=True)  # (u,), at most 3K
        summed = torch.zeros(len(uniq), dtype=val.dtype).index_add_(0, inverse, val)
        order = torch.topk(summed.abs(), min(self.k, len(uniq))).indices
        keep = order[summed[order] != 0]
        self.index, self.value = uniq[keep], summed[keep]

    def __len__(self) -> int:
        return len(self.index)


def tensor_blocks(model: torch.nn.Module, names: list[str]) -> dict[str, str]:
    """Masked tensor name -> the block it belongs to: its nearest ancestor module that is
    neither the model itself nor a plain container (``nn.Sequential``/``ModuleList``/
    ``ModuleDict``). A residual block's convs and its shortcut conv (inside a Sequential)
    share the block; a stem conv, a classifier, or VGG's flat ``features`` layers, whose
    only ancestor is the model, are blocks of their own."""
    containers = (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict)
    modules = dict(model.named_modules())
    out = {}
    for name in names:
        parts = name.split(".")[:-2]  # drop the layer's own name and "weight"
        block = name.rsplit(".", 1)[0]
        while parts:
            path = ".".join(parts)
            if not isinstance(modules[path], containers):
                block = path
                break
            parts.pop()
        out[name] = block
    return out


def adjustment_plan(names: list[str], granularity: str = "layer", order: str = "forward",
                    blocks: dict[str, str] | None = None) -> list[list[str]]:
    """The groups of masked tensors adjusted together, in visiting order.

    ``granularity``: "layer" (one tensor per adjustment) or "block" (every tensor of one
    block; ``blocks`` maps tensor -> block, see :func:`tensor_blocks`). ``order``:
    "forward" (model order), "reverse", or comma-separated tensor or block names, each
    naming a group exactly."""
    if granularity not in ("layer", "block"):
        raise ValueError(f"method.granularity={granularity!r}; choose 'layer' or 'block'")
    if granularity == "block" and blocks is None:
        raise ValueError("granularity='block' needs the tensor -> block map")
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(name if granularity == "layer" else blocks[name], []).append(name)
    if order == "forward":
        return list(groups.values())
    if order == "reverse":
        return list(groups.values())[::-1]
    wanted = [w.strip() for w in order.split(",") if w.strip()]
    unknown = [w for w in wanted if w not in groups]
    if unknown or not wanted:
        raise ValueError(f"method.order names {unknown or order!r}, which are not "
                         f"{granularity}s of the model; valid: {list(groups)}")
    return [groups[w] for w in wanted]
