"""Pooled federated pruning, block by block (Flower-free): exact pooled statistics.

Clients hold private calibration windows and a copy of the dense model; the server holds
the model it prunes. For block b:

1. each client brings its windows to block b's input through the server's pruned blocks:
   it writes the previous block's update (the pruned weights the server sent) into its
   copy and propagates its cached block inputs through it (block 0: it captures them),
2. it collects the statistics the method needs for block b's layers on its own windows
   (``calibrate.collect_stats``: Wanda's squared input-column norms, SparseGPT's and ADMM's
   Gram matrices ``X^T X``, row counts), plain sums, and sends only those,
3. the server adds the clients' sums and prunes block b with the same pruner code and
   the same per-block step as centralized ``prune_model`` (``pipeline.prune_block``), then
   sends the block's update down.

Because the statistics are sums, the pooled ones are those of the union of the clients'
windows (up to float64 summation order), so the result equals centralized sequential
pruning (``prune_model(..., sequential=True)``) on that union: identical masks for
magnitude and Wanda, weights equal within float tolerance for SparseGPT and ADMM. Each
client runs two block passes per block (propagate, then collect), the sequential floor.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .adapters import Adapter, Block, BlockInput, adapter_for
from .base import LayerStats, Pruner, SparsityTarget
from .calibrate import block_on, collect_stats, propagate
from .pipeline import prune_block

Update = dict[str, torch.Tensor]  # qualified layer name -> its pruned weight (module layout)


@torch.no_grad()
def client_step(adapter: Adapter, model: nn.Module, calib_inputs: Any,
                inputs: list[BlockInput] | None, index: int, update: Update | None,
                needs: set[str], device: torch.device | str = "cpu"
                ) -> tuple[list[BlockInput], dict[str, LayerStats]]:
    """One client's work for block ``index``: its inputs to the block, and the block's
    statistics on them. Block 0 captures the inputs from ``calib_inputs``; later blocks
    propagate ``inputs`` (those of block ``index - 1``) through a scratch copy of block
    ``index - 1`` holding the server's ``update``. ``model`` stays dense: a process can
    share one copy among its clients."""
    blocks = adapter.blocks(model)
    if index == 0:
        inputs = adapter.capture_inputs(model, calib_inputs, device)
    else:
        if inputs is None:
            raise ValueError(f"block {index}: no inputs of block {index - 1} to propagate")
        inputs = _through(adapter, blocks[index - 1], update, inputs, device)
    block = blocks[index]
    with block_on(block, device):
        stats = collect_stats(adapter, block, inputs, list(adapter.prunable(block)), needs,
                              device)
    return inputs, stats


def _through(adapter: Adapter, block: Block, update: Update | None,
             inputs: list[BlockInput], device: torch.device | str) -> list[BlockInput]:
    """``inputs`` propagated through a scratch copy of ``block`` holding ``update``."""
    scratch = Block(block.index, block.name, copy.deepcopy(block.module))
    apply_update_(adapter, scratch, update)
    with block_on(scratch, device):
        return propagate(adapter, scratch, inputs)


@torch.no_grad()
def replay_inputs(adapter: Adapter, model: nn.Module, calib_inputs: Any,
                  updates: Sequence[Update], device: torch.device | str = "cpu"
                  ) -> list[BlockInput]:
    """The inputs of block ``len(updates)`` for a client that lost its cache (a resumed
    run): captured, then propagated through blocks 0.. each holding the server's update."""
    inputs = adapter.capture_inputs(model, calib_inputs, device)
    for block, update in zip(adapter.blocks(model), updates):
        inputs = _through(adapter, block, update, inputs, device)
    return inputs


class PooledClient:
    """One client's side kept in memory: its windows and its inputs to the next block."""

    def __init__(self, model: nn.Module, calib_inputs: Any, needs: frozenset[str],
                 device: torch.device | str = "cpu") -> None:
        self.model, self.adapter = model.eval(), adapter_for(model)
        self.calib, self.needs, self.device = calib_inputs, set(needs), device
        self.inputs: list[BlockInput] | None = None
        self.next_block = 0

    def block_stats(self, index: int, update: Update | None) -> dict[str, LayerStats]:
        """Statistics of block ``index``'s layers on this client's windows; ``update``: the
        server's pruned weights of block ``index - 1`` (None for block 0)."""
        if index != self.next_block:
            raise ValueError(f"asked for block {index}, but this client is at block "
                             f"{self.next_block}")
        self.inputs, stats = client_step(self.adapter, self.model, self.calib, self.inputs,
                                         index, update, self.needs, self.device)
        self.next_block = index + 1
        return stats


class PooledServer:
    """The server's side: sums the clients' statistics and prunes block by block."""

    def __init__(self, model: nn.Module, pruner: Pruner, target: SparsityTarget,
                 device: torch.device | str = "cpu") -> None:
        self.model, self.adapter = model.eval(), adapter_for(model)
        self.blocks = self.adapter.blocks(model)
        self.pruner, self.target, self.device = pruner, target, device
        self.masks: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def prune_block(self, index: int, client_stats: Sequence[dict[str, LayerStats]]
                    ) -> Update:
        """Prune block ``index`` on the sum of ``client_stats``; return its update."""
        if not client_stats and self.pruner.needs:
            raise ValueError(f"block {index}: no client statistics to prune with")
        block = self.blocks[index]
        names = list(self.adapter.prunable(block))
        pooled = {n: sum_stats([s[n] for s in client_stats]) for n in names} \
            if self.pruner.needs else {}
        with block_on(block, self.device):
            info = prune_block(self.adapter, block, self.pruner, self.target, pooled,
                               self.device)
        self.masks.update({n: layer.mask for n, layer in info.items()})
        modules = self.adapter.prunable(block)
        return {n: modules[n].weight.detach().cpu().clone() for n in names}


def sum_stats(parts: Sequence[LayerStats]) -> LayerStats:
    """The sum of several clients' statistics of one layer."""
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


@torch.no_grad()
def apply_update_(adapter: Adapter, block, update: Update | None) -> None:
    """Write the server's pruned weights of ``block`` into this copy of the model."""
    modules = adapter.prunable(block)
    if update is None or set(update) != set(modules):
        raise ValueError(f"block {block.index}: the update must hold exactly the block's "
                         f"layers {sorted(modules)[:3]}..., got {sorted(update or {})[:3]}")
    for name, weight in update.items():
        target = modules[name].weight
        if weight.shape != target.shape:
            raise ValueError(f"block {block.index}: update for {name!r} has shape "
                             f"{tuple(weight.shape)}, the layer {tuple(target.shape)}")
        target.copy_(weight.to(target))
