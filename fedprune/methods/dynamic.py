"""``prunefl`` and ``feddst``: dynamic-sparse baselines on one schedule (every ``delta_r``
rounds before ``r_end``), starting from the ``init`` mask. The arithmetic, and where it
follows the papers rather than their code, is in ``fedprune.fl.dynamic``.

- ``prunefl`` (Jiang et al. 2022): on adjusting rounds clients accumulate the squared
  *dense* gradient of every masked tensor during local training and send it; the server
  averages it by examples and re-selects each layer's kept positions by it.
- ``feddst`` (Bibikar et al. 2022): on adjusting rounds each client, after local training,
  runs RigL on every layer (K = alpha_t x active) and sends its own mask and values; the
  server averages each position over the clients keeping it and takes the mask by
  example-weighted vote (ties by magnitude), per-layer counts exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import ConfigError, MethodConfig, check_value
from ..fedtiny.progressive import Schedule
from ..fl.replies import Tensor, tensors
from .base import ClientMethod, Method, Outcome, Plan, TrainingHooks, register_method
from .fedtiny import layers_and_ks, moves
from .fixed import check_init, start_masks


@dataclass
class _ScheduleConfig(MethodConfig):
    init: str = "erk"  # the starting mask
    delta_r: int = 1  # adjust every delta_r rounds ...
    r_end: int = 0  # ... before r_end (0 = three quarters of fed.rounds)

    def __post_init__(self) -> None:
        check_init("method.init", self.init)
        check_value("method.delta_r", self.delta_r >= 1, "must be >= 1", self.delta_r)
        check_value("method.r_end", self.r_end >= 0, "must be >= 0", self.r_end)

    def check(self, cfg) -> None:
        if self.r_end > cfg.fed.rounds:
            raise ConfigError(f"method.r_end={self.r_end} is beyond fed.rounds={cfg.fed.rounds}")


@dataclass
class PruneFLConfig(_ScheduleConfig):
    name: str = "prunefl"


@dataclass
class FedDSTConfig(_ScheduleConfig):
    name: str = "feddst"
    alpha: float = 0.3  # K = alpha_t * active per layer, cosine decay

    def __post_init__(self) -> None:
        super().__post_init__()
        check_value("method.alpha", 0 < self.alpha <= 1, "must be in (0, 1]", self.alpha)


class _Scheduled(Method):
    def __init__(self, cfg, core) -> None:
        super().__init__(cfg, core)
        o = self.options
        self.schedule = Schedule(cfg.fed.rounds, o.delta_r, o.r_end, getattr(o, "alpha", 0.3))

    @classmethod
    def initial_masks(cls, model, cfg):
        return start_masks(model, cfg, cfg.method.init)

    def _install(self, masks: dict, state: dict) -> Outcome:
        """Make ``masks`` (every layer re-selected) the global mask; count what moved."""
        moved = sum(int((np.asarray(masks[n]) & ~self.core.masks[n]).sum()) for n in masks)
        self.core.set_masks({n: torch.from_numpy(np.asarray(m)) for n, m in masks.items()},
                            state)
        return Outcome(self.core.state, "all", moved)


# ----------------------------------------------------------------------------- PruneFL


class _SquaredGradHooks(TrainingHooks):
    def __init__(self, model, masks) -> None:
        from ..fl.dynamic import GradSquareAccumulator

        self.acc = GradSquareAccumulator(model, list(masks))
        self.hook = self.acc.add_

    def finish(self, batches):
        return None, {"dst": {n: np.asarray(g, dtype=np.float32)
                              for n, g in self.acc.result().items()}}


class PruneFLClient(ClientMethod):
    def training(self, plan, extras, model, masks, device):
        return _SquaredGradHooks(model, masks)


@register_method
class PruneFL(_Scheduled):
    config_cls = PruneFLConfig
    client_cls = PruneFLClient

    def plan(self, server_round):
        if not self.schedule.adjusts(server_round):
            return None
        specs = {n: Tensor(m.shape, "float", low=0.0) for n, m in self.core.masks.items()}
        return Plan(replies={"dst": tensors(specs)})

    def combine(self, server_round, plan, replies, aggregated):
        from ..fl.dynamic import prunefl_reselect

        weights = [r.examples for r in replies]
        importance = {n: self.combine_scores([r.records["dst"][n] for r in replies], weights)
                      for n in self.core.masks}
        new_state, masks = prunefl_reselect(aggregated, self.core.masks, importance)
        return self._install(masks, new_state)


# ----------------------------------------------------------------------------- FedDST


class _RigLHooks(TrainingHooks):
    def __init__(self, plan, model, masks, device) -> None:
        self.ks = dict(layers_and_ks(plan, masks))
        self.model, self.masks, self.device = model, masks, device

    def finish(self, batches):
        from ..fl.dynamic import client_adjust

        batch = next(iter(batches))  # RigL's growth signal: one batch's dense gradient
        return client_adjust(self.model, self.masks, [batch], self.ks, self.device), {}


class FedDSTClient(ClientMethod):
    def training(self, plan, extras, model, masks, device):
        return _RigLHooks(plan, model, masks, device)


@register_method
class FedDST(_Scheduled):
    config_cls = FedDSTConfig
    client_cls = FedDSTClient

    def plan(self, server_round):
        if not self.schedule.adjusts(server_round):
            return None
        ks = moves(self.schedule, server_round, self.core.masks)
        if not ks:
            return None
        return Plan(config={"layers": list(ks), "ks": list(ks.values())},
                    own_masks=True)

    def combine(self, server_round, plan, replies, aggregated):
        from ..fl.dynamic import sparse_average, vote_masks

        weights = [r.examples for r in replies]
        states = [r.records["arrays"][0] for r in replies]
        own = [r.records["arrays"][1] for r in replies]
        averaged = sparse_average(states, own, weights)
        counts = {n: int(m.sum()) for n, m in self.core.masks.items()}
        masks = vote_masks(own, weights, counts, {n: averaged[n] for n in counts})
        return self._install(masks, averaged)
