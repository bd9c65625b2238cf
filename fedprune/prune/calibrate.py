"""The one calibration engine: per-layer input statistics, collected block by block.

For one block at a time, a forward hook on each prunable layer hands the layer's input to a
collector's ``add_batch(inp, out)``, which turns it into rows ``X`` (rows, in) through the
model-family adapter and adds ``sum_n X[n, j]^2`` (Wanda's ``||X_j||_2^2``) and, when a
method needs it, ``X^T X`` (SparseGPT's and ADMM's Hessian ``H = 2 X^T X`` up to scale) into
a float64 ``LayerStats`` (the pattern of Wanda's ``WrappedGPT.add_batch``; one batch's Gram
is multiplied in float32, see ``batch_terms``). Layers that read the same tensor (q/k/v,
gate/up) share one batch's sums (``SharedInputs``). Collectors keep
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
from .base import BatchTerms, LayerStats, batch_terms

KNOWN_NEEDS = frozenset({"sq_norm", "gram", "col_sum"})


def check_needs(needs: set[str] | frozenset[str]) -> None:
    """Raise ValueError on a statistic the engine does not collect."""
    unknown = set(needs) - KNOWN_NEEDS
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}; the calibration engine "
                         f"collects {sorted(KNOWN_NEEDS)}")


class SharedInputs:
    """One batch's sums computed once for every linear layer that reads the same tensor.

    The query, key and value projections of an attention block read one normalized hidden
    state, and so do a gated MLP's gate and up projections: their Grams are the same
    matrix, the engine's largest cost. The last input seen is kept (so its identity cannot
    be reused by a new tensor) with its version counter (an in-place change invalidates
    it). Only ``nn.Linear`` layers share: their rows are the input reshaped to ``in``.
    """

    def __init__(self) -> None:
        self._last: tuple[torch.Tensor, int, int, bool, bool, BatchTerms] | None = None

    def terms(self, adapter: Adapter, module: nn.Module, inp: torch.Tensor, width: int,
              with_gram: bool, device: torch.device | str, with_sum: bool = False
              ) -> BatchTerms:
        last = self._last
        if (isinstance(module, nn.Linear) and last is not None and last[0] is inp
                and last[1:5] == (inp._version, width, with_gram, with_sum)):
            return last[5]
        rows = adapter.layer_rows(module, inp.detach())  # (rows, in)
        terms = batch_terms(rows, width, with_gram, device, with_sum)
        if isinstance(module, nn.Linear):
            self._last = (inp, inp._version, width, with_gram, with_sum, terms)
        return terms


class StatsCollector:
    """Accumulates one layer's input rows into its ``LayerStats``; holds nothing else."""

    def __init__(self, adapter: Adapter, module: nn.Module, stats: LayerStats,
                 shared: SharedInputs | None = None) -> None:
        self.adapter, self.module, self.stats = adapter, module, stats
        self.shared = shared or SharedInputs()

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        """Add the layer's input of one forward call (``out`` unused: input statistics)."""
        stats = self.stats
        stats.add_terms_(self.shared.terms(self.adapter, self.module, inp,
                                           stats.sq_norm.shape[0], stats.gram is not None,
                                           stats.sq_norm.device, stats.col_sum is not None))

    def hook(self, _module: nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        inp = args[0] if args else next(iter(kwargs.values()))
        self.add_batch(inp, out)  # not detached here: identity is what layers share


@contextmanager
def stats_hooks(adapter: Adapter, block: Block, names: Sequence[str], needs: set[str],
                device: torch.device | str) -> Iterator[dict[str, LayerStats]]:
    """Hook ``names`` (qualified) of ``block`` while the body runs the block; yields the
    stats being filled (``gram`` / ``col_sum`` only when named in ``needs``)."""
    check_needs(needs)
    modules = adapter.prunable(block)
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"block {block.name!r} has no prunable layers {missing}")
    stats, handles, shared = {}, [], SharedInputs()
    for name in names:
        module = modules[name]
        in_features = adapter.get_matrix(module).shape[1]
        stats[name] = LayerStats.empty(in_features, "gram" in needs, device,
                                       "col_sum" in needs)
        collector = StatsCollector(adapter, module, stats[name], shared)
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
