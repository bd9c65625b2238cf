"""The one calibration engine: per-layer input statistics, collected block by block.

For one block at a time, a forward hook on each prunable layer hands the layer's input to a
collector's ``add_batch(inp, out)``, which turns it into rows ``X`` (rows, in) through the
model-family adapter and adds ``sum_n X[n, j]^2`` (Wanda's ``||X_j||_2^2``) and, when a
method needs it, ``X^T X`` (SparseGPT's and ADMM's Hessian ``H = 2 X^T X`` up to scale) into
a float64 ``LayerStats`` (the pattern of Wanda's ``WrappedGPT.add_batch``). Collectors keep
only these sums: the block's activations are dropped as soon as the forward call returns, so
what is alive at any time is the current block's inputs, its outputs (when they are being
propagated) and the statistics of its layers. Because the statistics are plain sums, those
computed on separate data (halves of a batch, clients) add up exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .adapters.base import Adapter, Block, BlockInput
from .base import LayerStats

KNOWN_NEEDS = frozenset({"sq_norm", "gram"})


def check_needs(needs: set[str] | frozenset[str]) -> None:
    """Raise ValueError on a statistic the engine does not collect."""
    unknown = set(needs) - KNOWN_NEEDS
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}; the calibration engine "
                         f"collects {sorted(KNOWN_NEEDS)}")


class StatsCollector:
    """Accumulates one layer's input rows into its ``LayerStats``; holds nothing else."""

    def __init__(self, adapter: Adapter, module: nn.Module, stats: LayerStats) -> None:
        self.adapter, self.module, self.stats = adapter, module, stats

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        """Add the layer's input of one forward call (``out`` unused: input statistics)."""
        self.stats.add_batch_(self.adapter.layer_rows(self.module, inp))  # (rows, in)

    def hook(self, _module: nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        inp = args[0] if args else next(iter(kwargs.values()))
        self.add_batch(inp.detach(), out)


@contextmanager
def stats_hooks(adapter: Adapter, block: Block, names: Sequence[str], needs: set[str],
                device: torch.device | str) -> Iterator[dict[str, LayerStats]]:
    """Hook ``names`` (qualified) of ``block`` while the body runs the block; yields the
    stats being filled (``gram`` only when ``"gram" in needs``)."""
    check_needs(needs)
    modules = adapter.prunable(block)
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"block {block.name!r} has no prunable layers {missing}")
    stats, handles = {}, []
    for name in names:
        module = modules[name]
        in_features = adapter.get_matrix(module).shape[1]
        stats[name] = LayerStats.empty(in_features, "gram" in needs, device)
        collector = StatsCollector(adapter, module, stats[name])
        handles.append(module.register_forward_hook(collector.hook, with_kwargs=True))
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def collect_stats(adapter: Adapter, block: Block, block_inputs: Sequence[BlockInput],
                  names: Sequence[str], needs: set[str], device: torch.device | str
                  ) -> dict[str, LayerStats]:
    """Statistics of layers ``names`` of ``block`` over all captured calls; outputs dropped."""
    with stats_hooks(adapter, block, names, needs, device) as stats:
        for inp in block_inputs:
            adapter.run_block(block, inp)  # output discarded at once
    return stats


@torch.no_grad()
def run_block(adapter: Adapter, block: Block, block_inputs: Sequence[BlockInput]
              ) -> list[torch.Tensor]:
    """The block's output hidden state for each captured call."""
    return [adapter.run_block(block, inp) for inp in block_inputs]


@torch.no_grad()
def propagate(adapter: Adapter, block: Block, block_inputs: Sequence[BlockInput]
              ) -> list[BlockInput]:
    """The next block's calls: this block's outputs with the same extra args/kwargs."""
    return [adapter.next_input(inp, adapter.run_block(block, inp)) for inp in block_inputs]


def _single_device(module: nn.Module) -> torch.device | None:
    devices = {p.device for p in module.parameters()} | {b.device for b in module.buffers()}
    return devices.pop() if len(devices) == 1 else None


@contextmanager
def block_on(block: Block, device: torch.device | str) -> Iterator[None]:
    """Run the body with ``block`` moved to ``device`` (then moved back), so a model kept on
    the CPU is processed one block at a time on an accelerator. Blocks spread over several
    devices (``device_map``) are left where they are."""
    home = _single_device(block.module)
    target = torch.device(device)
    move = home is not None and home != target
    if move:
        block.module.to(target)
    try:
        yield
    finally:
        if move:
            block.module.to(home)
