"""Prune a model block by block: calibrate -> prune each layer -> apply -> propagate.

For each block (a decoder layer; a whole CNN is one block), in order:

1. **calibrate**: run the block on its captured inputs with the calibration engine's hooks,
   collecting only the statistics the method needs (``pruner.needs``; none for magnitude,
   which skips every forward pass and needs no calibration data);
2. **prune**: ``pruner.prune(W, stats, target)`` on each prunable layer's (out, in) matrix
   (a float32 copy on ``device``);
3. **apply**: write the method's new weights (or the old ones) through the adapter with
   pruned entries set exactly to 0;
4. **propagate**: with ``sequential=True`` (default), recompute the block's outputs WITH the
   pruned weights and feed them to the next block, as the SparseGPT (Frantar & Alistarh 2023)
   and Wanda (Sun et al. 2024) reference code do, so that later blocks are calibrated on what
   the pruned model actually computes. Within a block all layers are calibrated together on
   the block's (dense) weights, also as in the references. With ``sequential=False`` the
   next block gets the dense outputs of the calibration pass (one forward per block), i.e.
   every layer's statistics come from the dense model, exactly what ``collect_model_stats``
   computes.

``stats_override`` (a mapping or a callable ``name -> LayerStats``) replaces steps 1 and 4:
statistics come from elsewhere (e.g. federated clients' ``collect_model_stats`` summed on a
server) and no forward pass runs.

``target.scope == "global"`` (unstructured only): all layers' statistics are collected on the
dense model, every layer is scored by ``pruner.scores``, and ``fedprune.masks.select.select_global``
keeps exactly ``total - round(sparsity * total)`` weights over all layers together (each layer
keeps at least one); masks are then applied block by block.

Masks are returned in each module weight's own layout (``mask.shape == module.weight.shape``,
True = kept; GPT-2 ``Conv1D`` masks are (in, out) like its weight), keyed by qualified module
name, on the CPU: ``module.weight.data.mul_(mask)`` applies one; ``PruneReport.param_masks()``
keys them by parameter name for ``fedprune.masks.apply_masks_``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from ..masks.select import select_global
from .adapters import Adapter, Block, BlockInput, adapter_for
from .base import LayerStats, Pruner, PruneResult, SparsityTarget
from .calibrate import block_on, check_needs, collect_stats, propagate, stats_hooks

StatsSource = Union[Mapping[str, LayerStats], Callable[[str], LayerStats]]
# block -> {qualified name: (weight, mask)} saved by an earlier run, or None to prune it
ResumeSource = Callable[["Block"], Union[Mapping[str, tuple[torch.Tensor, torch.Tensor]], None]]
PHASES = ("capture", "calibrate", "prune", "select", "apply", "propagate")


@dataclass
class LayerInfo:
    """One pruned layer: its mask (module weight layout, CPU) and zero count."""

    name: str
    block: int
    mask: torch.Tensor
    zeros: int
    numel: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel


@dataclass
class PruneReport:
    """Masks, achieved sparsity per layer, and wall seconds per phase (plus "total")."""

    method: str
    target: SparsityTarget
    sequential: bool
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    sparsity: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def overall_sparsity(self) -> float:
        total = sum(m.numel() for m in self.masks.values())
        return 1.0 - sum(int(m.sum()) for m in self.masks.values()) / max(total, 1)

    def param_masks(self) -> dict[str, torch.Tensor]:
        """Masks keyed by parameter name (``<module>.weight``), for ``apply_masks_``."""
        return {f"{name}.weight": mask for name, mask in self.masks.items()}


class _Timer:
    """Accumulated wall seconds per phase; synchronizes CUDA so phases are not blurred."""

    def __init__(self, device: torch.device | str) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.cuda = torch.device(device).type == "cuda"

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds[phase] += time.perf_counter() - start


# ---- checks before anything is pruned -----------------------------------------------------

def _preflight(adapter: Adapter, layers: list[dict[str, nn.Module]], pruner: Pruner,
               target: SparsityTarget, needs_rows: bool) -> None:
    """Refuse a setting that would fail mid-way: N:M not dividing a layer, unusable layers."""
    check_needs(pruner.needs)
    if target.scope == "global" and target.m:
        raise ValueError(f"scope='global' is for unstructured sparsity; pattern {target.pattern} "
                         "is selected per group of M weights (use scope='layer')")
    for block_layers in layers:
        for name, module in block_layers.items():
            in_dim = adapter.get_matrix(module).shape[1]
            if target.m and in_dim % target.m:
                raise ValueError(f"layer {name!r}: N:M pattern {target.pattern} needs its input "
                                 f"dimension ({in_dim}) to be a multiple of {target.m}")
            adapter.check_layer(name, module, needs_rows)


def _stats_from(source: StatsSource, name: str, device: torch.device | str,
                needs: frozenset[str]) -> LayerStats:
    """Layer ``name``'s statistics from a mapping or callable, on ``device``."""
    stats = source(name) if callable(source) else source.get(name)
    if stats is None:
        raise ValueError(f"stats_override has no statistics for layer {name!r}")
    if "gram" in needs and stats.gram is None:
        raise ValueError(f"stats_override for layer {name!r} has no Gram matrix; the method "
                         "needs one (collect with needs={'sq_norm', 'gram'})")
    gram = None if stats.gram is None else stats.gram.to(device)
    return LayerStats(stats.sq_norm.to(device), gram, stats.rows)


# ---- one layer ----------------------------------------------------------------------------

def _matrix_copy(adapter: Adapter, module: nn.Module, device: torch.device | str) -> torch.Tensor:
    """A float32 copy of the layer's (out, in) matrix on ``device`` for the pruner."""
    return adapter.get_matrix(module).detach().to(device=device, dtype=torch.float32, copy=True)


def _check_result(name: str, result: PruneResult, shape: torch.Size) -> None:
    if result.mask.dtype != torch.bool or result.mask.shape != shape:
        raise ValueError(f"layer {name!r}: pruner returned a mask {result.mask.dtype} "
                         f"{tuple(result.mask.shape)}, expected torch.bool {tuple(shape)}")
    if result.weight is not None and result.weight.shape != shape:
        raise ValueError(f"layer {name!r}: pruner returned weights {tuple(result.weight.shape)}, "
                         f"expected {tuple(shape)}")


@torch.no_grad()
def _apply_layer_(adapter: Adapter, name: str, block: Block, module: nn.Module,
                  weight: torch.Tensor, mask: torch.Tensor) -> LayerInfo:
    """Write ``weight`` (out, in) with pruned entries exactly 0; return the layer's info."""
    mask = mask.to(weight.device)
    adapter.set_matrix_(module, weight.masked_fill(~mask, 0))
    native = adapter.to_native(module, mask).contiguous().cpu()  # module.weight layout
    zeros = int((~native).sum())
    return LayerInfo(name, block.index, native, zeros, native.numel())


def prune_block(adapter: Adapter, block: Block, pruner: Pruner, target: SparsityTarget,
                stats: Mapping[str, LayerStats], device: torch.device | str = "cpu"
                ) -> dict[str, LayerInfo]:
    """Prune every prunable layer of ``block`` in place from its statistics (the step
    centralized pruning takes per block; federated pooled pruning calls it with the sum of
    the clients' statistics, ``fedprune.prune.pooled``)."""
    return _prune_layers(adapter, pruner, target, block, adapter.prunable(block), dict(stats),
                         device, _Timer(device))


def _prune_layers(adapter: Adapter, pruner: Pruner, target: SparsityTarget, block: Block,
                  modules: dict[str, nn.Module], stats: dict[str, LayerStats],
                  device: torch.device | str, timer: _Timer) -> dict[str, LayerInfo]:
    info = {}
    for name, module in modules.items():
        with timer("prune"):
            weight = _matrix_copy(adapter, module, device)  # (out, in)
            result = pruner.prune(weight, stats.get(name), target)
            _check_result(name, result, weight.shape)
        with timer("apply"):
            new = result.weight if result.weight is not None else weight
            info[name] = _apply_layer_(adapter, name, block, module, new.to(weight), result.mask)
    return info


# ---- the model ----------------------------------------------------------------------------

@dataclass
class _Run:
    """What every step of one ``prune_model`` call shares."""

    model: nn.Module
    adapter: Adapter
    pruner: Pruner
    target: SparsityTarget
    device: torch.device | str
    report: PruneReport
    timer: _Timer
    on_block_done: Callable[[int, dict[str, LayerInfo]], None] | None
    progress: bool
    resume: ResumeSource | None = None
    only: set[int] | None = None

    def bar(self, blocks: list[Block]) -> Any:
        return tqdm(blocks, desc=f"prune[{self.pruner.name}]", unit="block",
                    disable=not self.progress)

    def record(self, block: Block, info: dict[str, LayerInfo]) -> None:
        for name, layer in info.items():
            self.report.masks[name] = layer.mask
            self.report.sparsity[name] = layer.sparsity
        if self.on_block_done is not None:
            self.on_block_done(block.index, info)


def _calibrate_block(run: _Run, block: Block, inputs: list[BlockInput], names: list[str],
                     dense_next: bool) -> tuple[dict[str, LayerStats], list[BlockInput] | None]:
    """The block's layer stats; with ``dense_next`` also the next block's (dense) inputs."""
    needs = set(run.pruner.needs)
    with run.timer("calibrate"):
        if not dense_next:
            return collect_stats(run.adapter, block, inputs, names, needs, run.device), None
        with stats_hooks(run.adapter, block, names, needs, run.device) as stats:
            nxt = propagate(run.adapter, block, inputs)
        return stats, nxt


def _prune_blockwise(run: _Run, calib_inputs: Any, sequential: bool,
                     stats_override: StatsSource | None) -> None:
    needs = bool(run.pruner.needs)
    forward = needs and stats_override is None  # magnitude / override: no forward pass
    blocks = run.adapter.blocks(run.model)
    inputs = None
    if forward:
        with run.timer("capture"):
            inputs = run.adapter.capture_inputs(run.model, calib_inputs, run.device)
    for block in run.bar(blocks):
        modules = run.adapter.prunable(block)
        last = block.index == len(blocks) - 1
        if run.only is not None and block.index not in run.only:  # left dense
            if forward and not last:
                with block_on(block, run.device), run.timer("propagate"):
                    inputs = propagate(run.adapter, block, inputs)
            continue
        saved = run.resume(block) if run.resume is not None else None
        if saved is not None:  # finished by an earlier run: restore, only propagate
            with block_on(block, run.device):
                inputs = _resume_block(run, block, modules, saved, inputs,
                                       propagate_inputs=forward and not last,
                                       sequential=sequential)
            continue
        with block_on(block, run.device):
            stats, dense_next = {}, None
            if forward:
                stats, dense_next = _calibrate_block(run, block, inputs, list(modules),
                                                     dense_next=not (sequential or last))
            elif needs:
                stats = {n: _stats_from(stats_override, n, run.device, run.pruner.needs)
                         for n in modules}
            info = _prune_layers(run.adapter, run.pruner, run.target, block, modules, stats,
                                 run.device, run.timer)
            del stats
            if forward and not last and sequential:
                with run.timer("propagate"):
                    inputs = propagate(run.adapter, block, inputs)  # with pruned weights
            elif forward and not last:
                inputs = dense_next
        run.record(block, info)


@torch.no_grad()
def _resume_block(run: _Run, block: Block, modules: dict[str, nn.Module],
                  saved: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                  inputs: list[BlockInput] | None, propagate_inputs: bool, sequential: bool
                  ) -> list[BlockInput] | None:
    """Write a finished block's saved weights back; hand the next block the inputs it had.

    ``saved[name] = (weight, mask)`` in the module weight's layout. Non-sequential runs
    calibrate every block on dense outputs, so those are computed before the restore.
    """
    missing = sorted(set(modules) - set(saved))
    if missing:
        raise ValueError(f"resume: block {block.index} has no saved weights for {missing[:3]}")
    if propagate_inputs and not sequential:
        inputs = propagate(run.adapter, block, inputs)  # dense outputs
    info = {}
    for name, module in modules.items():
        weight, mask = saved[name]
        if weight.shape != module.weight.shape or mask.shape != module.weight.shape:
            raise ValueError(f"resume: saved {name!r} is {tuple(weight.shape)}, the model's "
                             f"weight is {tuple(module.weight.shape)}")
        module.weight.copy_(weight.to(module.weight))
        mask = mask.bool().cpu()
        info[name] = LayerInfo(name, block.index, mask, int((~mask).sum()), mask.numel())
    if propagate_inputs and sequential:
        inputs = propagate(run.adapter, block, inputs)  # with the restored pruned weights
    run.record(block, info)
    return inputs


def _global_scores(run: _Run, blocks: list[Block], stats: StatsSource | None
                   ) -> dict[str, torch.Tensor]:
    """Every layer's scores (out, in) on the CPU."""
    scores = {}
    for block in blocks:
        for name, module in run.adapter.prunable(block).items():
            layer_stats = (None if stats is None
                           else _stats_from(stats, name, run.device, run.pruner.needs))
            score = run.pruner.scores(_matrix_copy(run.adapter, module, run.device), layer_stats)
            if score is None:
                raise ValueError(f"method {run.pruner.name!r} does not score weights; "
                                 "scope='global' needs a scoring method")
            scores[name] = score.detach().float().cpu()  # (out, in)
    return scores


def _prune_global(run: _Run, calib_inputs: Any, stats_override: StatsSource | None) -> None:
    needs = set(run.pruner.needs)
    blocks = run.adapter.blocks(run.model)
    stats = stats_override if needs else None
    if needs and stats is None:
        with run.timer("calibrate"):
            stats = collect_model_stats(run.model, run.adapter, calib_inputs, needs, run.device)
    with run.timer("prune"):
        scores = _global_scores(run, blocks, stats)
    with run.timer("select"):
        total = sum(s.numel() for s in scores.values())
        masks = select_global(scores, total - round(run.target.sparsity * total))
    del scores
    for block in run.bar(blocks):
        with run.timer("apply"):
            info = {}
            for name, module in run.adapter.prunable(block).items():
                weight = run.adapter.get_matrix(module).detach()  # (out, in)
                info[name] = _apply_layer_(run.adapter, name, block, module, weight,
                                           masks.pop(name))
        run.record(block, info)


def prune_model(model: nn.Module, pruner: Pruner, target: SparsityTarget,
                calib_inputs: Any = None, device: torch.device | str = "cpu",
                sequential: bool = True,
                on_block_done: Callable[[int, dict[str, LayerInfo]], None] | None = None,
                progress: bool = True, stats_override: StatsSource | None = None,
                resume: ResumeSource | None = None, only: set[int] | None = None
                ) -> PruneReport:
    """Prune ``model`` in place with ``pruner`` at ``target``; see the module docstring.

    ``calib_inputs``: a batch or a sequence of batches (CNN: input tensors; HF: ``input_ids``
    tensors or mappings of model kwargs), needed unless the method needs no statistics or
    ``stats_override`` gives them. ``on_block_done(block_index, {name: LayerInfo})`` is
    called as each block is finished. ``resume(block)`` may return the weights and masks an
    earlier, interrupted run saved for that block: it is restored instead of pruned (and
    ``on_block_done`` is called for it again). ``only``: prune just these block indices;
    the others stay dense and only pass the calibration inputs on (FedSpaLLM's layer
    sampling). The model is in eval mode while pruning.
    """
    adapter = adapter_for(model)
    layers = [adapter.prunable(b) for b in adapter.blocks(model)]
    needs_rows = bool(pruner.needs) and stats_override is None
    _preflight(adapter, layers, pruner, target, needs_rows)
    if needs_rows and calib_inputs is None:
        raise ValueError(f"method {pruner.name!r} needs {sorted(pruner.needs)} statistics: "
                         "pass calib_inputs or stats_override")
    report = PruneReport(pruner.name, target, sequential)
    if only is not None and target.scope == "global":
        raise ValueError("only: scope 'global' selects over all layers at once; sample "
                         "blocks with a per-layer or per-row scope")
    if resume is not None and target.scope == "global":
        raise ValueError("resume works block by block; scope 'global' selects over all "
                         "layers at once and cannot be resumed")
    run = _Run(model, adapter, pruner, target, device, report, _Timer(device), on_block_done,
               progress, resume, only)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        with torch.no_grad():
            if target.scope == "global":
                _prune_global(run, calib_inputs, stats_override)
            else:
                _prune_blockwise(run, calib_inputs, sequential, stats_override)
    finally:
        model.train(was_training)
    report.timings = {**run.timer.seconds, "total": time.perf_counter() - start}
    return report


@torch.no_grad()
def collect_model_stats(model: nn.Module, adapter: Adapter | None, calib_inputs: Any,
                        needs: set[str] | frozenset[str], device: torch.device | str = "cpu",
                        progress: bool = False) -> dict[str, LayerStats]:
    """Statistics of every prunable layer on the DENSE model, block by block (each block fed
    the previous block's dense outputs). Plain sums: stats of two halves of the data add up
    to the stats of all of it, so clients' results can be summed into ``stats_override``."""
    adapter = adapter or adapter_for(model)
    blocks = adapter.blocks(model)
    for block in blocks:
        for name, module in adapter.prunable(block).items():
            adapter.check_layer(name, module, needs_rows=True)
    was_training = model.training
    model.eval()
    out: dict[str, LayerStats] = {}
    try:
        inputs = adapter.capture_inputs(model, calib_inputs, device)
        for block in tqdm(blocks, desc="calibrate", unit="block", disable=not progress):
            names = list(adapter.prunable(block))
            with block_on(block, device):
                if block.index == len(blocks) - 1:
                    out.update(collect_stats(adapter, block, inputs, names, set(needs), device))
                    continue
                with stats_hooks(adapter, block, names, set(needs), device) as stats:
                    inputs = propagate(adapter, block, inputs)
                out.update(stats)
    finally:
        model.train(was_training)
    return out
