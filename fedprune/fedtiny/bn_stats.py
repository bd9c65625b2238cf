"""BatchNorm statistics for adaptive BN selection (FedTiny, Huang et al. 2023, Sec. IV-A).

Clients run forward passes in train mode over their local data and return, per BN layer,
exact per-channel statistics of the BN *inputs* with their sample count (not PyTorch's
momentum-averaged running buffers). The server pools them exactly:

    N = sum_i n_i,   mean = sum_i n_i m_i / N,
    var = sum_i n_i (v_i + (m_i - mean)^2) / N         (within- plus between-client part)

with ``v_i`` the biased per-client variance, so the pooled statistics equal those of the
concatenated data. That is exact for every layer whose input does not depend on how the
data was batched: the first BN layer in train mode, every layer with ``train_mode=False``
(earlier BN layers then normalize with their running buffers). In train mode (FedTiny's
protocol) deeper layers see inputs normalized with each client's own batch statistics.
(The public FedTiny code sends BN scale/shift instead; the paper pools running
statistics, which is what this does.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class BNStats:
    """Per-channel statistics of one BN layer's input: count, mean, biased variance."""

    count: int
    mean: np.ndarray  # (C,) float64
    var: np.ndarray  # (C,) float64


def _bn_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)}


@torch.no_grad()
def collect_bn_stats(model: nn.Module, batches, device: torch.device | str = "cpu",
                     train_mode: bool = True) -> dict[str, BNStats]:
    """Exact statistics of every BN layer's input over ``batches``.

    ``train_mode``: run the model in train mode (BN normalizes with batch statistics; the
    running buffers are left as they were) or in eval mode."""
    sums: dict[str, list] = {}

    def hook(name):
        def fn(module, args):
            x = args[0].detach().to(torch.float64)  # (B, C, ...)
            x = x.transpose(0, 1).reshape(x.shape[1], -1)  # (C, B*...)
            acc = sums.setdefault(name, [0, 0.0, 0.0])
            acc[0] += x.shape[1]
            acc[1] = acc[1] + x.sum(1)
            acc[2] = acc[2] + (x * x).sum(1)
        return fn

    layers = _bn_layers(model)
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    was_training = model.training
    buffers = {n: (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
               for n, m in layers.items() if m.track_running_stats}
    model.to(device).train(train_mode)
    try:
        for x, _ in batches:
            model(x.to(device))
    finally:
        for h in handles:
            h.remove()
        for n, (mean, var, count) in buffers.items():  # a statistics pass changes nothing
            layers[n].running_mean.copy_(mean)
            layers[n].running_var.copy_(var)
            layers[n].num_batches_tracked.copy_(count)
        model.train(was_training)
    out = {}
    for name, (n, s, ss) in sums.items():
        mean = (s / n).cpu().numpy()
        out[name] = BNStats(n, mean, np.maximum((ss / n).cpu().numpy() - mean**2, 0.0))
    return out


def pool_bn_stats(per_client: list[dict[str, BNStats]]) -> dict[str, BNStats]:
    """Exact pooled statistics (count-weighted mean, within + between variance)."""
    if not per_client:
        raise ValueError("pool_bn_stats needs at least one client's statistics")
    names = list(per_client[0])
    out = {}
    for name in names:
        parts = [c[name] for c in per_client]
        shapes = {p.mean.shape for p in parts}
        if len(shapes) != 1:
            raise ValueError(f"BN layer {name!r}: clients sent statistics of shapes {shapes}")
        total = sum(p.count for p in parts)
        mean = sum(p.count * p.mean for p in parts) / total
        var = sum(p.count * (p.var + (p.mean - mean) ** 2) for p in parts) / total
        out[name] = BNStats(total, mean, var)
    return out


@torch.no_grad()
def apply_bn_stats_(model: nn.Module, stats: dict[str, BNStats]) -> None:
    """Write pooled statistics into the BN running buffers (unbiased variance, as PyTorch
    keeps it: running_var = var * N / (N - 1))."""
    layers = _bn_layers(model)
    for name, s in stats.items():
        if name not in layers:
            raise KeyError(f"BN layer {name!r} is not in the model")
        bn = layers[name]
        if bn.running_mean.shape != s.mean.shape:
            raise ValueError(f"BN layer {name!r}: statistics of shape {s.mean.shape}, "
                             f"running_mean is {tuple(bn.running_mean.shape)}")
        unbiased = s.var * s.count / max(s.count - 1, 1)
        bn.running_mean.copy_(torch.from_numpy(s.mean).to(bn.running_mean))
        bn.running_var.copy_(torch.from_numpy(unbiased).to(bn.running_var))
