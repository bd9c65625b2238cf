"""Measured client cost of one local training step: peak memory and FLOPs, per method.

FedTiny (Huang et al. 2023) claims its clients prune with little memory: during local
training they keep only the top-K pruned-position gradients of one scheduled layer
(``fedtiny.progressive.TopKBuffer``). The dense-gradient approach (FedTiny's public code,
and PruneFL with squared gradients) keeps a dense accumulator of every masked tensor's
gradient instead (``DenseGradAccumulator``). Three methods are compared:

    dense       no mask
    fedtiny     ERK mask + TopKBuffer on the largest masked tensor, K = 0.3 * its active
                count (the worst-case scheduled layer: round 0 of the cosine schedule)
    dense_grad  ERK mask + DenseGradAccumulator over every masked tensor

Memory is measured, not estimated (``measure_peak``):
  CPU   tensor storage allocated through c10's CPU allocator, from the allocation events
        of ``torch.profiler`` (``profile_memory=True``): peak of the running sum of the
        allocations and frees made while ``fn`` runs, frees matched to allocations by
        address. Not counted: memory taken outside the tensor allocator (e.g. the
        ``std::vector`` of 16 bytes per element that CPU ``torch.topk`` sorts in, oneDNN
        scratch), allocator caching, Python objects, and tensors that existed before
        ``fn`` (their frees are ignored: the curve never drops below its start).
  CUDA  ``torch.cuda.max_memory_allocated`` above the bytes allocated before ``fn``
        (live blocks of the caching allocator, not reserved memory; frees of older
        tensors do lower the curve here).
``measure_rss_peak`` is a whole-process cross-check on Linux (peak resident set above the
start): it sees native scratch too, but only pages newly touched (memory glibc reuses from
its free lists does not show), and the kernel's per-CPU RSS counters make it coarse
(hundreds of KB): read it for MB-sized effects only.

FLOPs per example follow ``masks.flops`` (RigL's accounting): forward + backward w.r.t.
activations at the mask's density, plus backward w.r.t. weights, which is dense for the
tensors whose dense gradient the method reads (all masked tensors for dense_grad, the
scheduled layer for fedtiny) and sparse elsewhere:

    train = 2 * sum_l f_l * d_l + sum_l f_l * (1 if l needs its dense gradient else d_l)
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from ..config import ModelConfig, TrainConfig
from ..fedtiny.progressive import Schedule, TopKBuffer
from ..masks import count_flops, init_masks
from ..models import build_model, input_shape
from ..train import train_local

METHODS = ("dense", "fedtiny", "dense_grad")


# ----------------------------------------------------------------------------- meters


def measure_peak(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak bytes of tensor storage allocated while ``fn()`` runs, above the start."""
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_peak(fn, device)
    if device.type != "cpu":
        raise ValueError(f"measure_peak supports cpu and cuda, not {device.type!r}")
    return _cpu_peak(fn)


def _cpu_peak(fn: Callable[[], object]) -> int:
    """Max over time of the bytes of storages allocated (and not yet freed) during ``fn``.

    Frees are matched to this session's allocations by address: the CPU reporter may also
    report frees of older blocks (it keeps sizes of blocks freed while it was off), which
    must not lower the curve."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(_allocation_events(prof.profiler.kineto_results.experimental_event_tree()))
    live_blocks: dict[int, int] = {}
    live = peak = 0
    for _, ptr, nbytes in events:
        if nbytes > 0:
            live_blocks[ptr] = nbytes
            live += nbytes
            peak = max(peak, live)
        else:
            live -= live_blocks.pop(ptr, 0)
    return peak


def _allocation_events(roots: list) -> list[tuple[int, int, int]]:
    """(time_ns, address, signed bytes) of every CPU allocation/free in the event tree."""
    from torch._C._profiler import _EventType

    out, stack = [], list(roots)
    while stack:
        node = stack.pop()
        fields = node.extra_fields
        if node.tag == _EventType.Allocation and fields.device.type == "cpu":
            out.append((node.start_time_ns, fields.ptr, fields.alloc_size))
        stack.extend(node.children)
    return out


def _cuda_peak(fn: Callable[[], object], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def measure_rss_peak(fn: Callable[[], object]) -> int:
    """Peak resident set size of this process while ``fn()`` runs, above the start (Linux).

    Resets the kernel's high-water mark (``/proc/self/clear_refs``), runs ``fn`` and reads
    ``VmHWM``. Counts native allocations the profiler cannot see, but only pages newly
    touched: freed heap memory that glibc hands out again does not raise it (fix glibc's
    mmap threshold, ``mallopt(M_MMAP_THRESHOLD, ...)``, to make large blocks show)."""
    before = _proc_status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    fn()
    return max(0, _proc_status_kb("VmHWM") - before) * 1024


def _proc_status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {key}")


# ------------------------------------------------------------------ dense-gradient baseline


class DenseGradAccumulator:
    """Dense running sum of the named tensors' gradients (``squared``: of grad**2, PruneFL).

    The dense-gradient approach's client state: one dense tensor per name, the size of the
    weight, allocated here on the parameters' device (build it after moving the model).
    ``add_`` is an ``on_backward`` hook for ``train_local``: it reads the gradients before
    they are masked, so pruned positions are included."""

    def __init__(self, model: nn.Module, names: list[str], squared: bool = False) -> None:
        params = dict(model.named_parameters())
        unknown = sorted(set(names) - set(params))
        if unknown:
            raise KeyError(f"DenseGradAccumulator: the model has no parameters {unknown[:5]}")
        self.squared, self.steps = squared, 0
        self._params = {n: params[n] for n in names}
        self._acc = {n: torch.zeros_like(p, memory_format=torch.contiguous_format)
                     for n, p in self._params.items()}

    @torch.no_grad()
    def add_(self) -> None:
        """Add this step's gradients (or squared gradients) to the accumulators."""
        for name, param in self._params.items():
            if param.grad is None:
                continue
            if self.squared:
                self._acc[name].addcmul_(param.grad, param.grad)
            else:
                self._acc[name].add_(param.grad)
        self.steps += 1

    @property
    def grads(self) -> dict[str, torch.Tensor]:
        """The dense accumulated gradients, name -> tensor of the weight's shape."""
        return self._acc

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._acc.values())


# ----------------------------------------------------------------------------- one method


def step_memory(model_cfg: ModelConfig, dataset: str, density: float, method: str,
                batch_size: int = 32, device: torch.device | str = "cpu") -> dict:
    """Peak memory of one local training step, the pruning memory and the FLOPs of ``method``.

    ``step_peak_bytes``: forward, backward, optimizer step (momentum created by
    ``train_local``'s fresh optimizer), the bool masks ``train_local`` builds, and the
    method's bookkeeping (built inside the step); not the parameters, the bool masks or the
    batch (live before). The second step is measured, after a warm-up step.
    ``pruning_peak_bytes``: the bookkeeping alone (its state plus the temporaries of two
    ``add_`` calls on a real gradient); ``pruning_state_bytes``: what it holds afterwards.
    ``*_rss_bytes``: the same runs seen by ``measure_rss_peak`` (CPU only, else None)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} must be one of {METHODS}")
    device = torch.device(device)
    model = build_model(model_cfg, dataset).to(device)
    masks = None if method == "dense" else init_masks(model, density, "erk", seed=0)
    batch = _random_batch(dataset, batch_size, model_cfg.num_classes, device)
    adjust = _scheduled_layer(masks) if method == "fedtiny" else None
    step = _step_fn(model, batch, masks, method, adjust, device)
    step()  # warm-up: first-call allocations
    model.zero_grad(set_to_none=True)
    step_peak = measure_peak(step, device)
    model.zero_grad(set_to_none=True)
    step_rss = measure_rss_peak(step) if device.type == "cpu" else None
    return {
        "model": model_cfg.name, "width": model_cfg.width, "dataset": dataset,
        "density": 1.0 if method == "dense" else density, "method": method,
        "batch_size": batch_size, "device": str(device),
        "params_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "step_peak_bytes": step_peak, "step_rss_bytes": step_rss,
        **_pruning_memory(model, batch, masks, method, adjust, device),
        **_flops(model, dataset, masks, method, adjust),
        "scheduled_layer": adjust[0] if adjust else None, "k": adjust[1] if adjust else None,
    }


def _random_batch(dataset: str, batch_size: int, num_classes: int, device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((batch_size, *input_shape(dataset)), generator=gen)  # (B, C, H, W)
    y = torch.randint(0, num_classes, (batch_size,), generator=gen)  # (B,)
    return x.to(device), y.to(device)


def _scheduled_layer(masks: dict[str, torch.Tensor]) -> tuple[str, int]:
    """(largest masked tensor, K at round 0 of FedTiny's schedule with alpha = 0.3)."""
    layer = max(masks, key=lambda n: masks[n].numel())
    active = int(masks[layer].sum())
    return layer, Schedule(rounds=4, alpha=0.3).k(0, active, masks[layer].numel() - active)


def _bookkeeping(model: nn.Module, masks, method: str, adjust, device: torch.device):
    """(state, on_backward hook) of ``method``'s pruning bookkeeping; (None, None) if none."""
    if method == "fedtiny":  # as the FedTiny client's hook: TopKBuffer.add_ on the grad
        layer, k = adjust
        param = dict(model.named_parameters())[layer]
        buffer = TopKBuffer(k, masks[layer].to(device))

        def hook() -> None:
            if param.grad is not None:
                buffer.add_(param.grad)

        return buffer, hook
    if method == "dense_grad":
        acc = DenseGradAccumulator(model, list(masks))
        return acc, acc.add_
    return None, None


def _step_fn(model: nn.Module, batch, masks, method: str, adjust, device: torch.device
             ) -> Callable[[], None]:
    """One local step with the bookkeeping built inside it (so its memory is counted)."""
    cfg = TrainConfig(max_steps=1, batch_size=len(batch[1]))

    def step() -> None:
        _, hook = _bookkeeping(model, masks, method, adjust, device)
        train_local(model, [batch], cfg, masks, device, on_backward=hook)

    return step


def _pruning_memory(model: nn.Module, batch, masks, method: str, adjust,
                    device: torch.device) -> dict:
    """Peak and held bytes of the bookkeeping alone, fed twice with a real gradient."""
    if method == "dense":
        return {"pruning_peak_bytes": 0, "pruning_state_bytes": 0, "pruning_rss_bytes": 0}
    _real_gradients_(model, batch, masks)

    def run() -> object:
        state, hook = _bookkeeping(model, masks, method, adjust, device)
        hook()
        hook()
        return state

    held = _state_bytes(run())  # also the warm-up
    peak = measure_peak(run, device)
    rss = measure_rss_peak(run) if device.type == "cpu" else None
    return {"pruning_peak_bytes": peak, "pruning_state_bytes": held, "pruning_rss_bytes": rss}


def _real_gradients_(model: nn.Module, batch, masks) -> None:
    """Leave one backward pass's gradients in ``.grad`` (masked weights, dense gradients)."""
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, mask in masks.items():
            params[name].mul_(mask.to(params[name]))
    model.zero_grad(set_to_none=True)
    x, y = batch
    nn.functional.cross_entropy(model.train()(x), y).backward()


def _state_bytes(state) -> int:
    """Bytes a TopKBuffer or DenseGradAccumulator holds between steps."""
    if isinstance(state, DenseGradAccumulator):
        return state.nbytes()
    return sum(t.numel() * t.element_size() for t in (state.kept, state.index, state.value))


def _flops(model: nn.Module, dataset: str, masks, method: str, adjust) -> dict:
    """Per-example inference and training FLOPs (the module docstring's equation)."""
    counts = count_flops(model, (1, *input_shape(dataset)), masks)
    needs_dense = set(masks) if method == "dense_grad" else {adjust[0]} if adjust else set()
    weight_grad = sum(v["dense"] if n in needs_dense else v["sparse"]
                      for n, v in counts["layers"].items())
    return {"inference_flops": counts["inference"],
            "training_flops": 2 * counts["inference"] + weight_grad}
