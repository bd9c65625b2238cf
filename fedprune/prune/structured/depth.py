"""Depth pruning: score whole blocks, remove the least important ones.

Criteria (larger = more important = kept):

- ``ppl`` (Shortened LLaMA, Kim et al. 2024): the calibration perplexity of the model with
  that one block removed (a block whose removal hurts most matters most);
- ``taylor`` (Shortened LLaMA's Taylor): ``sum |W * dL/dW|`` over every weight in the block
  (norm weights included, as in their ``anal_block_sensitivity_taylor.py``), with the
  gradient of the token-mean loss;
- ``block-influence`` (ShortGPT, Men et al. 2024, Eq. 1): ``BI_i = 1 - E_t[cos(x_i,t, x_i+1,t)]``
  over calibration tokens, from block ``i``'s input and output hidden states. Their code
  sums over tokens (same ranking) and, for the last block, reads the output after the final
  norm; ours uses the raw block output throughout.

``protect_first`` / ``protect_last`` exclude blocks from removal: Shortened LLaMA's "+"
heuristic keeps the first 4 and last 2 blocks (``taylor+``/``ppl+`` in their paper; in their
code it applies unless ``--no_plus_heuristic``). ``DEPTH_PRESETS`` names those variants.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...config import ConfigError
from ..adapters import adapter_for
from ..calibrate import block_on
from .evidence import causal_lm_loss, collect_gradients

DEPTH_CRITERIA = ("ppl", "taylor", "block-influence")
# name -> (criterion, protect_first, protect_last)
DEPTH_PRESETS = {"ppl": ("ppl", 0, 0), "ppl+": ("ppl", 4, 2), "taylor": ("taylor", 0, 0),
                 "taylor+": ("taylor", 4, 2), "block-influence": ("block-influence", 0, 0)}


@dataclass
class DepthConfig:
    criterion: str = "taylor+"  # one of DEPTH_PRESETS
    remove: int = 1  # number of blocks to remove

    def __post_init__(self) -> None:
        if self.criterion not in DEPTH_PRESETS:
            raise ConfigError(f"depth.criterion={self.criterion!r}; choose one of "
                              f"{sorted(DEPTH_PRESETS)}")
        if self.remove < 1:
            raise ConfigError(f"depth.remove={self.remove} must be >= 1")


class _Skip(nn.Module):
    """Stands in for a removed block: returns the hidden state it was given."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return args[0] if args else kwargs["hidden_states"]


@torch.no_grad()
def mean_loss(model: nn.Module, batches: Sequence[Any]) -> float:
    """Token-mean next-token loss over ``batches`` (moved to the model's device)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in batches:
        loss, n = causal_lm_loss(model, batch.to(device) if isinstance(batch, torch.Tensor)
                                 else {k: v.to(device) for k, v in batch.items()})
        total += float(loss) * n
        count += n
    return total / max(count, 1)


def ppl_scores(model: nn.Module, batches: Sequence[Any]) -> torch.Tensor:
    """Perplexity with each block removed in turn, (blocks,)."""
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    path = blocks[0].name.rsplit(".", 1)[0]
    stack = model.get_submodule(path)
    out = []
    was = model.training
    model.eval()
    try:
        for i in range(len(blocks)):
            original = stack[i]
            stack[i] = _Skip()
            try:
                out.append(math.exp(mean_loss(model, batches)))
            finally:
                stack[i] = original
    finally:
        model.train(was)
    return torch.tensor(out, dtype=torch.float64)


def taylor_scores(model: nn.Module, batches: Sequence[Any],
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """``sum |W * g|`` over each block's weights (every parameter named ``*weight``)."""
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    owners = {}
    for b in blocks:
        for name, module in b.module.named_modules():
            if isinstance(getattr(module, "weight", None), nn.Parameter):
                owners[b.qualify(name)] = b.index
    ev = collect_gradients(model, batches, list(owners), second_order=False, device=device)
    scores = torch.zeros(len(blocks), dtype=torch.float64)
    modules = dict(model.named_modules())
    for name, idx in owners.items():
        w = modules[name].weight.detach().to("cpu", torch.float64)
        scores[idx] += (w * ev.grad(name)).abs().sum()
    return scores


@torch.no_grad()
def block_influence(model: nn.Module, batches: Sequence[Any],
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """ShortGPT's ``1 - mean cos(x_in, x_out)`` per block over all calibration tokens."""
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    was = model.training
    model.eval()
    try:
        inputs = adapter.capture_inputs(model, list(batches), device)
        out = torch.zeros(len(blocks), dtype=torch.float64)
        tokens = sum(inp.hidden.shape[:-1].numel() for inp in inputs)
        for block in blocks:
            nxt = []
            with block_on(block, device):
                for inp in inputs:
                    y = adapter.run_block(block, inp)
                    cos = nn.functional.cosine_similarity(inp.hidden.double(), y.double(), dim=-1)
                    out[block.index] += (1.0 - cos).sum()
                    nxt.append(adapter.next_input(inp, y))
            inputs = nxt
    finally:
        model.train(was)
    return out / tokens


def block_scores(model: nn.Module, criterion: str, batches: Sequence[Any],
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Importance of every block by a base criterion (``DEPTH_CRITERIA``)."""
    if criterion == "ppl":
        return ppl_scores(model, batches)
    if criterion == "taylor":
        return taylor_scores(model, batches, device)
    if criterion == "block-influence":
        return block_influence(model, batches, device)
    raise ValueError(f"depth criterion {criterion!r}; choose one of {DEPTH_CRITERIA}")


def blocks_to_remove(scores: torch.Tensor, remove: int, protect_first: int = 0,
                     protect_last: int = 0) -> list[int]:
    """The ``remove`` least important blocks (ties to the later block), never a protected one."""
    n = scores.numel()
    allowed = [i for i in range(protect_first, n - protect_last)]
    if remove > len(allowed) or remove >= n:
        raise ConfigError(f"depth.remove={remove}: only {len(allowed)} of {n} blocks may be "
                          f"removed (first {protect_first} and last {protect_last} protected, "
                          "and one block must stay)")
    order = sorted(allowed, key=lambda i: (float(scores[i]), -i))
    return sorted(order[:remove])


def prune_depth(model: nn.Module, cfg: DepthConfig, batches: Sequence[Any],
                device: torch.device | str = "cpu") -> dict[str, Any]:
    """Score blocks, remove the ``cfg.remove`` least important; returns what was done."""
    base, first, last = DEPTH_PRESETS[cfg.criterion]
    scores = block_scores(model, base, batches, device)
    gone = blocks_to_remove(scores, cfg.remove, first, last)
    adapter = adapter_for(model)
    n = len(adapter.blocks(model))
    adapter.drop_blocks_(model, [i for i in range(n) if i not in gone])
    return {"criterion": cfg.criterion, "scores": [float(s) for s in scores], "removed": gone}
