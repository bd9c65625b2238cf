"""``token-select``: the clients choose, on their own data, which token-pruning
configuration the trained ViT ships with (fedprune.prune.tokens: zero-tprune, tome,
random), under a FLOPs budget.

Token-pruning configurations cost nothing to switch (no weight changes), so the server
offers several (``schedules``: keep fractions per block, or ToMe's r), keeps those whose
FLOPs (counted from the token counts) are within ``flops_budget`` of the dense model's,
and in round ``select_round`` (0: the last) every client evaluates each of them on the
global model it received, before its local training: summed loss, correct predictions
and examples over its first ``eval_batches`` training batches (the same batches for
every schedule: a paired comparison). The server sums the clients' counts and keeps the
schedule with the lowest example-weighted loss (ties: fewer FLOPs), as adaptive BN
selection does with its candidates. Training is sparse FedAvg under a fixed mask (the
``fixed`` method's options); the choice is in the run's summary (``method_report``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..config import ConfigError
from ..fl.replies import ReplyError, Tensor, tensors
from .base import ClientMethod, Outcome, Plan, TrainingHooks, register_method
from .fixed import Fixed, FixedConfig

PRUNERS = ("zero-tprune", "tome", "random")


def parse_schedules(text: str, pruner: str) -> list[list[float]] | list[int]:
    """'1,0.7,1;1,0.5,1' -> keep lists (zero-tprune, random); '4;8' -> r values (tome)."""
    items = [s.strip() for s in text.split(";") if s.strip()]
    if not items:
        raise ConfigError(f"method.schedules={text!r} names no schedule")
    try:
        if pruner == "tome":
            return [int(s) for s in items]
        return [[float(k) for k in s.split(",")] for s in items]
    except ValueError as err:
        raise ConfigError(f"method.schedules={text!r}: {err} (tome: 'r;r;...', others: "
                          "'k,k,...;k,k,...' keep fractions per block)") from None


def make_pruner(pruner: str, schedule):
    from ..prune.tokens import schedule_pruner

    return schedule_pruner(pruner, schedule)


@torch.no_grad()
def flops_ratio(model: torch.nn.Module, pruner) -> float:
    """Pruned / dense FLOPs of one image, from the token counts a forward pass sees."""
    was = model.training
    model.eval()
    pruner.attach(model)
    try:
        model(torch.zeros(1, model.patch_embed.in_channels, 32, 32))
        tokens = list(model.last_tokens)
    finally:
        pruner.detach(model)
        model.train(was)
    return model.flops(tokens) / model.flops()


@dataclass
class TokenSelectConfig(FixedConfig):
    name: str = "token-select"
    pruner: str = "zero-tprune"  # zero-tprune | tome | random
    schedules: str = "1,0.7,1,0.7,1,0.7;1,1,0.5,1,0.5,1;1,0.5,1,0.5,1,0.5"
    flops_budget: float = 0.7  # a schedule's FLOPs / the dense model's, at most
    select_round: int = 0  # the round whose clients evaluate the schedules; 0 = the last
    eval_batches: int = 4  # training batches each client evaluates every schedule on

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pruner not in PRUNERS:
            raise ConfigError(f"method.pruner={self.pruner!r} is not a token pruner; choose "
                              f"one of {list(PRUNERS)}")
        for i, schedule in enumerate(parse_schedules(self.schedules, self.pruner)):
            try:
                make_pruner(self.pruner, schedule)
            except ValueError as err:
                raise ConfigError(f"method.schedules, schedule {i}: {err}") from None
        if not 0 < self.flops_budget <= 1:
            raise ConfigError(f"method.flops_budget={self.flops_budget} is outside (0, 1]")
        if self.eval_batches < 1 or self.select_round < 0:
            raise ConfigError("method.eval_batches must be >= 1 and method.select_round >= 0")

    def check(self, cfg) -> None:
        if cfg.model.name != "vit":
            raise ConfigError(f"method.name=token-select prunes tokens of a transformer; "
                              f"model.name={cfg.model.name!r} has none (use model.name=vit)")
        if self.select_round > cfg.fed.rounds:
            raise ConfigError(f"method.select_round={self.select_round} is after the last "
                              f"round (fed.rounds={cfg.fed.rounds})")


class _Evaluate(TrainingHooks):
    """Scores every schedule on the global model (a copy taken before local training)."""

    def __init__(self, cfg, model: torch.nn.Module, device: torch.device) -> None:
        self.cfg, self.model, self.device = cfg, copy.deepcopy(model).eval(), device

    @torch.no_grad()
    def finish(self, batches):
        o = self.cfg.method
        pruners = [make_pruner(o.pruner, s) for s in parse_schedules(o.schedules, o.pruner)]
        loss = np.zeros(len(pruners))
        correct = np.zeros(len(pruners))
        count = 0
        for i, (x, y) in enumerate(batches):
            if i >= o.eval_batches:
                break
            x, y = x.to(self.device), y.to(self.device)
            count += len(y)
            for k, pruner in enumerate(pruners):
                pruner.attach(self.model)
                try:
                    logits = self.model(x)
                finally:
                    pruner.detach(self.model)
                loss[k] += F.cross_entropy(logits, y, reduction="sum").item()
                correct[k] += (logits.argmax(1) == y).sum().item()
        return None, {"tokens": {"loss_sum": loss, "correct": correct,
                                 "count": np.array([count], dtype=np.int64)}}


class TokenSelectClient(ClientMethod):
    def training(self, plan, extras, model, masks, device):
        return _Evaluate(self.cfg, model, device)


@register_method
class TokenSelect(Fixed):
    config_cls = TokenSelectConfig
    client_cls = TokenSelectClient

    def __init__(self, cfg, core) -> None:
        super().__init__(cfg, core)
        o = self.options
        self.schedules = parse_schedules(o.schedules, o.pruner)
        self.flops = [flops_ratio(core.model, make_pruner(o.pruner, s)) for s in self.schedules]
        self.allowed = [k for k, f in enumerate(self.flops) if f <= o.flops_budget]
        if not self.allowed:
            raise ConfigError(f"method.flops_budget={o.flops_budget}: no schedule fits; their "
                              f"FLOPs ratios are {[round(f, 3) for f in self.flops]}")
        self.round = o.select_round or cfg.fed.rounds
        self.choice: dict | None = None

    def plan(self, server_round):
        if server_round != self.round:
            return None
        k = len(self.schedules)
        spec = tensors({"loss_sum": Tensor((k,), low=0.0), "correct": Tensor((k,), low=0.0),
                        "count": Tensor((1,), dtype="int", low=1)})
        return Plan(config={"token-select": 1}, replies={"tokens": spec},
                    checks=[self._consistent])

    @staticmethod
    def _consistent(reply) -> None:
        t = reply.records["tokens"]
        n = int(t["count"][0])
        if n > reply.examples or (t["correct"] > n).any():
            raise ReplyError(reply.client, "tokens", f"counts {n} examples and up to "
                             f"{int(t['correct'].max())} correct, of {reply.examples}")

    def combine(self, server_round, plan, replies, aggregated):
        loss = sum(r.records["tokens"]["loss_sum"] for r in replies)
        correct = sum(r.records["tokens"]["correct"] for r in replies)
        count = float(sum(int(r.records["tokens"]["count"][0]) for r in replies))
        mean = loss / count
        best = min(self.allowed, key=lambda k: (mean[k], self.flops[k]))
        self.choice = {"round": server_round, "pruner": self.options.pruner,
                       "schedules": self.schedules, "flops_ratio": self.flops,
                       "allowed": self.allowed, "loss": mean.tolist(),
                       "accuracy": (correct / count).tolist(), "examples": int(count),
                       "clients": len(replies), "chosen": best,
                       "chosen_schedule": self.schedules[best]}
        return Outcome(aggregated)

    def report(self) -> dict:
        return {"token_selection": self.choice} if self.choice else {}

    def state_dict(self):
        if not self.choice:
            return {}
        return {"token_loss": np.array(self.choice["loss"]),
                "token_accuracy": np.array(self.choice["accuracy"]),
                "token_chosen": np.array([self.choice["chosen"], self.choice["round"],
                                          self.choice["examples"], self.choice["clients"]])}

    def load_state_dict(self, state):
        if not state:
            return
        chosen, rnd, examples, clients = (int(v) for v in state["token_chosen"])
        self.choice = {"round": rnd, "pruner": self.options.pruner,
                       "schedules": self.schedules, "flops_ratio": self.flops,
                       "allowed": self.allowed, "loss": state["token_loss"].tolist(),
                       "accuracy": state["token_accuracy"].tolist(), "examples": examples,
                       "clients": clients, "chosen": chosen,
                       "chosen_schedule": self.schedules[chosen]}
