"""Recovery after pruning: LoRA fine-tuning with ``peft``, merged into the model at the end.

LLM-Pruner's recovery (``post_training.py``): LoRA of rank 8, alpha 16, dropout 0.05 on
every projection of the decoder (``q, k, v, o, gate, up, down``), AdamW, then the adapters are
merged so the recovered model has the pruned model's shapes and no extra layers. Defaults
here are theirs except the budget (they train 2 epochs on Alpaca at lr 1e-4 on a GPU; a CPU
run here is ``steps`` steps of ``batch_size`` windows), stated in every report.

For an *unstructured*-sparse model a plain merge would fill the pruned positions
(``W + B A`` is dense). ``keep_masks=True`` records each adapted layer's zero pattern before
training and merges through it (``W + (B A) * mask``): a masked merge, so the sparsity
the pruner produced survives recovery exactly.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...config import ConfigError
from .evidence import causal_lm_loss


@dataclass
class LoraRecoveryConfig:
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    lr: float = 1e-4
    steps: int = 50
    batch_size: int = 4
    keep_masks: bool = False  # masked merge: zeros of the pruned weights stay zero

    def __post_init__(self) -> None:
        for key in ("rank", "alpha", "steps", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"recovery.{key}={getattr(self, key)} must be >= 1")
        if not 0.0 <= self.dropout < 1.0 or self.lr <= 0:
            raise ConfigError("recovery.dropout must be in [0, 1) and recovery.lr > 0")


def _targets(model: nn.Module) -> list[str]:
    """Every linear layer inside the model's blocks (the adapter knows where they are)."""
    from ..adapters import adapter_for

    adapter = adapter_for(model)
    names = [name for block in adapter.blocks(model) for name in adapter.prunable(block)]
    if not names:
        raise ValueError(f"{type(model).__name__}: no layers to adapt")
    return names


def _mean_loss(model: nn.Module, windows: torch.Tensor, batch_size: int) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            loss, n = causal_lm_loss(model, windows[i:i + batch_size])
            total, count = total + float(loss) * n, count + n
    return total / count


def wrap_lora(model: nn.Module, cfg: LoraRecoveryConfig, seed: int = 0) -> nn.Module:
    """``model`` with LoRA adapters on every block projection (peft; seeded A, zero B)."""
    from peft import LoraConfig, get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha,
                                                lora_dropout=cfg.dropout,
                                                target_modules=_targets(model), bias="none"))


def train_lora_(peft_model: nn.Module, windows: torch.Tensor, cfg: LoraRecoveryConfig,
                steps: int | None = None) -> float:
    """``steps`` (default ``cfg.steps``) AdamW steps on batches of ``windows``, cycling;
    returns the seconds spent. Only the adapters train."""
    device = next(peft_model.parameters()).device
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=cfg.lr)
    batches = itertools.cycle(windows.to(device).split(cfg.batch_size))
    t0 = time.perf_counter()
    peft_model.train()
    for _ in range(cfg.steps if steps is None else steps):
        opt.zero_grad(set_to_none=True)
        loss, _ = causal_lm_loss(peft_model, next(batches))
        loss.backward()
        opt.step()
    peft_model.eval()
    return time.perf_counter() - t0


def adapter_state(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights (LoRA A and B of every adapted layer), on the CPU."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu() for k, v in get_peft_model_state_dict(peft_model).items()}


def load_adapter_state_(peft_model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load adapter weights saved by :func:`adapter_state` (every key, same shapes)."""
    from peft import set_peft_model_state_dict

    own = adapter_state(peft_model)
    if set(own) != set(state) or any(own[k].shape != state[k].shape for k in own):
        raise ValueError("adapter weights do not match this model's adapters")
    set_peft_model_state_dict(peft_model, state)


def lora_recover(model: nn.Module, train: torch.Tensor, cfg: LoraRecoveryConfig,
                 heldout: torch.Tensor | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tune LoRA adapters on ``train`` windows (N, L), merge them; returns the merged
    model (same class and shapes as ``model``) and a report (losses before/after)."""
    targets = _targets(model)
    modules = dict(model.named_modules())
    masks = ({n: modules[n].weight.detach() != 0 for n in targets} if cfg.keep_masks else {})
    device = next(model.parameters()).device
    train = train.to(device)
    report: dict[str, Any] = {"config": vars(cfg).copy(), "windows": int(train.shape[0]),
                              "tokens_per_window": int(train.shape[1])}
    model.eval()
    report["train_loss_before"] = _mean_loss(model, train, cfg.batch_size)
    if heldout is not None:
        report["heldout_loss_before"] = _mean_loss(model, heldout.to(device), cfg.batch_size)
    peft_model = wrap_lora(model, cfg)
    report["train_seconds"] = train_lora_(peft_model, train, cfg)
    merged = merge_lora(peft_model, masks)
    merged.eval()
    report["train_loss_after"] = _mean_loss(merged, train, cfg.batch_size)
    if heldout is not None:
        report["heldout_loss_after"] = _mean_loss(merged, heldout.to(device), cfg.batch_size)
    return merged, report


@torch.no_grad()
def merge_lora(peft_model: nn.Module, masks: dict[str, torch.Tensor] | None = None
               ) -> nn.Module:
    """``merge_and_unload``; with masks, each merged weight is multiplied by its mask (the
    LoRA update lands only where the pruned weight was kept)."""
    merged = peft_model.merge_and_unload()
    modules = dict(merged.named_modules())
    for name, mask in (masks or {}).items():
        modules[name].weight.mul_(mask.to(modules[name].weight.dtype))
    return merged


__all__ = ["LoraRecoveryConfig", "adapter_state", "load_adapter_state_", "lora_recover",
           "merge_lora", "train_lora_", "wrap_lora"]
