"""What structured criteria read beyond the weights: gradients on calibration text.

Activation statistics (input norms, means, variances of the output projections) come from
the one calibration engine (``collect_model_stats`` with needs ``sq_norm``/``col_sum``).
Gradients come from here, as LLM-Pruner computes them (``hf_prune.py``):

- first order: the gradient of the token-mean loss over all calibration tokens. Each sample
  ``j`` (one sequence) contributes ``n_j * g_j`` (``g_j`` the gradient of its own mean loss,
  ``n_j`` its predicted tokens), so ``grad_sum / tokens`` is the gradient of the pooled mean;
- second order (``param_second``/``param_mix``): ``acc_grad = (1/N) sum_j g_j^2`` over the N
  samples, a diagonal empirical Fisher estimate of the Hessian (LLM-Pruner's per-sample loop).

Both are plain sums, so clients' evidence adds up to the evidence of their union
(``GradEvidence.__add__``), the basis of federated Taylor importance.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, int]]


def causal_lm_loss(model: nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
    """Mean next-token loss of one batch (input_ids tensor or kwargs) and its token count."""
    kwargs = dict(batch) if isinstance(batch, dict) else {"input_ids": batch}
    ids = kwargs["input_ids"]
    out = model(**kwargs, labels=ids, use_cache=False)
    return out.loss, int(ids.shape[0] * (ids.shape[1] - 1))


@dataclass
class GradEvidence:
    """Sums of per-sample gradients for the weights of named layers (module weight layout)."""

    grad_sum: dict[str, torch.Tensor] = field(default_factory=dict)  # sum_j n_j g_j
    sq_sum: dict[str, torch.Tensor] = field(default_factory=dict)  # sum_j g_j^2 (may be empty)
    tokens: int = 0
    samples: int = 0

    def grad(self, name: str) -> torch.Tensor:
        """First-order gradient of the token-mean loss for layer ``name``'s weight."""
        return self.grad_sum[name] / max(self.tokens, 1)

    def fisher(self, name: str) -> torch.Tensor:
        """LLM-Pruner's ``acc_grad``: (1/N) sum_j g_j^2."""
        if name not in self.sq_sum:
            raise ValueError(f"second-order Taylor needs squared per-sample gradients of "
                             f"{name!r}; collect with second_order=True")
        return self.sq_sum[name] / max(self.samples, 1)

    def __add__(self, other: GradEvidence) -> GradEvidence:
        if set(self.grad_sum) != set(other.grad_sum) or set(self.sq_sum) != set(other.sq_sum):
            raise ValueError("cannot add gradient evidence over different layers")
        return GradEvidence({k: v + other.grad_sum[k] for k, v in self.grad_sum.items()},
                            {k: v + other.sq_sum[k] for k, v in self.sq_sum.items()},
                            self.tokens + other.tokens, self.samples + other.samples)


def _samples(batches: Iterable[Any], split: bool) -> Iterable[Any]:
    """The batches, or with ``split`` every example on its own (same container type)."""
    for batch in batches:
        if not split:
            yield batch
        elif isinstance(batch, torch.Tensor):
            yield from (batch[i:i + 1] for i in range(batch.shape[0]))
        elif isinstance(batch, (tuple, list)):
            yield from (tuple(t[i:i + 1] for t in batch) for i in range(batch[0].shape[0]))
        else:
            n = batch["input_ids"].shape[0]
            yield from ({k: v[i:i + 1] for k, v in batch.items()} for i in range(n))


def collect_gradients(model: nn.Module, batches: Sequence[Any], names: Sequence[str],
                      second_order: bool, loss_fn: LossFn = causal_lm_loss,
                      device: torch.device | str = "cpu") -> GradEvidence:
    """Per-sample gradient sums of ``names``' weights over ``batches`` (see module docstring).

    With ``second_order`` every sequence runs its own backward pass (squared gradients need
    them one by one); otherwise each batch runs one (its gradient is already the token sum).
    Other parameters are frozen meanwhile (no gradient memory) and restored afterwards.
    """
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"no layers named {missing[:3]} in {type(model).__name__}")
    params = {n: modules[n].weight for n in names}
    flags = {id(p): p.requires_grad for p in model.parameters()}
    was_training = model.training
    ev = GradEvidence({n: torch.zeros_like(p, dtype=torch.float64, device="cpu")
                       for n, p in params.items()},
                      {n: torch.zeros_like(p, dtype=torch.float64, device="cpu")
                       for n, p in params.items()} if second_order else {})
    try:
        model.eval()  # no dropout: the gradient of the model that is being pruned
        wanted = {id(q) for q in params.values()}
        for p in model.parameters():
            p.requires_grad_(id(p) in wanted)
        for sample in _samples(batches, second_order):
            model.zero_grad(set_to_none=True)
            loss, n = loss_fn(model, _to(sample, device))
            loss.backward()
            for name, p in params.items():
                g = p.grad.detach().to("cpu", torch.float64)
                ev.grad_sum[name] += n * g
                if second_order:
                    ev.sq_sum[name] += g * g
            ev.tokens += n
            ev.samples += 1 if second_order else _rows(sample)
    finally:
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
        model.train(was_training)
    return ev


def _rows(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, (tuple, list)):
        return int(batch[0].shape[0])
    return int(batch["input_ids"].shape[0])


def _to(batch: Any, device: torch.device | str) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return tuple(t.to(device) for t in batch)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def classification_loss(model: nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy of one ``(images, labels)`` batch and its example count."""
    x, y = batch
    return nn.functional.cross_entropy(model(x), y), int(y.shape[0])


def loss_for(batch: Any) -> LossFn:
    """Classification loss for ``(inputs, labels)`` batches, else the causal LM loss."""
    return classification_loss if isinstance(batch, (tuple, list)) else causal_lm_loss


@dataclass
class BetaStats:
    """Sums for Beta-Rank's input and output spreads of one conv (or linear) layer.

    Per output position ``p``: the input patch the filters read (``unfold``: every input
    channel and kernel tap, zero padding included) over all samples, and each filter's
    output over all samples. Plain sums, so clients' statistics add up.
    """

    in_sum: torch.Tensor  # (L,) float64
    in_sq: torch.Tensor  # (L,)
    in_count: int  # samples * patch size
    out_sum: torch.Tensor  # (K, L)
    out_sq: torch.Tensor  # (K, L)
    samples: int

    def sigma_in(self) -> torch.Tensor:
        mean = self.in_sum / self.in_count
        return (self.in_sq / self.in_count - mean * mean).clamp_min(0).sqrt()

    def sigma_out(self) -> torch.Tensor:
        mean = self.out_sum / self.samples
        return (self.out_sq / self.samples - mean * mean).clamp_min(0).sqrt()

    def __add__(self, other: BetaStats) -> BetaStats:
        return BetaStats(self.in_sum + other.in_sum, self.in_sq + other.in_sq,
                         self.in_count + other.in_count, self.out_sum + other.out_sum,
                         self.out_sq + other.out_sq, self.samples + other.samples)


def _patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, D, L) input patches of a conv (D = in * taps) or (N, in, 1) for a linear layer."""
    if isinstance(module, nn.Linear):
        return x.reshape(x.shape[0], -1, 1)
    if not isinstance(module, nn.Conv2d) or isinstance(module.padding, str):
        raise ValueError(f"beta-rank: {type(module).__name__} with padding "
                         f"{getattr(module, 'padding', None)!r} is not supported")
    return nn.functional.unfold(x, module.kernel_size, module.dilation, module.padding,
                                module.stride)


@torch.no_grad()
def collect_beta_stats(model: nn.Module, batches: Sequence[Any], names: Sequence[str],
                       device: torch.device | str = "cpu") -> dict[str, BetaStats]:
    """Beta-Rank sums of layers ``names`` over the inputs of ``batches``."""
    modules = dict(model.named_modules())
    stats: dict[str, BetaStats] = {}

    def hook(name: str):
        def fn(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            p = _patches(module, args[0].detach()).double().cpu()  # (N, D, L)
            y = out.detach().double().cpu().reshape(out.shape[0], out.shape[1], -1)  # (N, K, L)
            s = BetaStats(p.sum((0, 1)), (p * p).sum((0, 1)), p.shape[0] * p.shape[1],
                          y.sum(0), (y * y).sum(0), y.shape[0])
            stats[name] = stats[name] + s if name in stats else s
        return fn

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    was = model.training
    model.eval()
    try:
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x.to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return stats
