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
    for batch in batches:
        if not split:
            yield batch
            continue
        ids = batch if isinstance(batch, torch.Tensor) else batch["input_ids"]
        for i in range(ids.shape[0]):
            yield ids[i:i + 1] if isinstance(batch, torch.Tensor) else \
                {k: v[i:i + 1] for k, v in batch.items()}


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
    ids = batch if isinstance(batch, torch.Tensor) else batch["input_ids"]
    return int(ids.shape[0])


def _to(batch: Any, device: torch.device | str) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
