"""Local training's optimizer and learning-rate schedule options (used by the ViT)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedprune.config import TrainConfig
from fedprune.train import make_optimizer, make_schedule, train_local


def _lrs(cfg: TrainConfig, steps: int) -> list[float]:
    opt = make_optimizer([{"params": [nn.Parameter(torch.zeros(1))]}], cfg)
    sched = make_schedule(opt, cfg, steps)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_then_cosine_by_hand():
    # warm-up 2 steps: 1/2, 2/2; then cosine over the 4 remaining steps: 1, cos(pi/4)...
    cfg = TrainConfig(lr=0.8, optimizer="adamw", lr_schedule="cosine", warmup_steps=2)
    expect = [0.4, 0.8] + [0.8 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert _lrs(cfg, 6) == pytest.approx(expect)


def test_constant_schedule_has_no_scheduler_and_warmup_alone_ramps():
    opt = make_optimizer([{"params": [nn.Parameter(torch.zeros(1))]}], TrainConfig())
    assert make_schedule(opt, TrainConfig(), 10) is None
    assert isinstance(opt, torch.optim.SGD)
    assert _lrs(TrainConfig(lr=1.0, warmup_steps=4), 6) == pytest.approx(
        [0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_adamw_is_adamw_with_the_configured_decay():
    opt = make_optimizer([{"params": [nn.Parameter(torch.zeros(1))]}],
                         TrainConfig(optimizer="adamw", lr=1e-3, weight_decay=0.05))
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["weight_decay"] == 0.05


def test_cosine_needs_a_step_count_and_bad_names_are_refused():
    with pytest.raises(ValueError, match="train.optimizer"):
        TrainConfig(optimizer="adam")
    with pytest.raises(ValueError, match="train.lr_schedule"):
        TrainConfig(lr_schedule="linear")
    model = nn.Linear(2, 2)
    batches = iter([(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]))])  # no len()
    with pytest.raises(ValueError, match="known number of steps"):
        train_local(model, batches, TrainConfig(lr_schedule="cosine"))


def test_cosine_ends_near_zero_inside_train_local():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    batches = [(torch.randn(8, 3), torch.randint(0, 2, (8,))) for _ in range(5)]
    seen = []
    cfg = TrainConfig(local_epochs=2, lr=0.1, lr_schedule="cosine", optimizer="adamw",
                      weight_decay=0.0)
    train_local(model, batches, cfg, on_backward=lambda: seen.append(1))
    assert len(seen) == 10  # the schedule spans both epochs (its length came from len())
    opt = make_optimizer([{"params": list(model.parameters())}], cfg)
    sched = make_schedule(opt, cfg, 10)
    for _ in range(9):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 9 / 10)))
