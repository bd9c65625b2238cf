"""``gates``: polarization-regularized channel gates trained federatedly (Zhi et al. 2023,
"Learning a Consensus Sub-Network with Polarization Regularization and One Pass Training").

The run starts dense. For ``rounds`` rounds clients train the dense weights plus one binary
(straight-through) gate per output channel under the polarization regularizer; the server
averages the gates (example-weighted) into consensus gates and sends them down again. After
the last gate round it keeps the channels with the highest consensus gates up to
``mask.density`` (whole rows) and training goes on sparse in the same pass. Tensors in
``mask.exclude`` get no gate and stay dense. The arithmetic, and the choices made where the
paper was not available offline, are in ``fedprune.fl.gates``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import ConfigError, MethodConfig, check_value
from ..fl.replies import Tensor, tensors
from .base import ClientMethod, Method, Outcome, Plan, TrainingHooks, register_method


@dataclass
class GatesConfig(MethodConfig):
    name: str = "gates"
    rounds: int = 1  # gate-training rounds, then the mask is fixed
    lam: float = 1e-3  # weight of the polarization regularizer
    # Polarization strength (Zhuang et al. 2020): the regularizer alone opens a fraction
    # (2 - t) / 4 of the gates. 0 = auto: t = 2 - 4 * mask.density.
    t: float = 0.0
    lr: float = 0.05  # gate learning rate (SGD)

    def __post_init__(self) -> None:
        check_value("method.rounds", self.rounds >= 1, "must be >= 1", self.rounds)
        check_value("method.lam", self.lam >= 0, "must be >= 0", self.lam)
        check_value("method.t", -2 < self.t < 2, "must be in (-2, 2) (0 = auto)", self.t)
        check_value("method.lr", self.lr > 0, "must be > 0", self.lr)

    def check(self, cfg) -> None:
        if self.rounds >= cfg.fed.rounds:
            raise ConfigError(f"method.rounds={self.rounds} must be < fed.rounds="
                              f"{cfg.fed.rounds} (gates are trained, then the mask is fixed)")
        if cfg.mask.density >= 1.0:
            raise ConfigError("method gates prunes to mask.density, which is 1.0: set "
                              "mask.density < 1")


class _GateHooks(TrainingHooks):
    def __init__(self, cfg, extras, model, device) -> None:
        from ..fl.gates import attach_gates, polarization_t

        if "gates" not in extras:
            raise ValueError("a gate-training round needs the server's 'gates' record")
        self.gates = attach_gates(model, cfg.mask.exclude)
        self.gates.load_(extras["gates"])
        self.gates.to(device)
        o = cfg.method
        t = o.t or polarization_t(cfg.mask.density)  # 0 = auto (see GatesConfig)
        self.regularizer = lambda: self.gates.regularizer(o.lam, t)
        self.extra_params = [{"params": list(self.gates.parameters()), "lr": o.lr,
                              "momentum": 0.0, "weight_decay": 0.0}]

    def finish(self, batches):
        values = self.gates.values()
        self.gates.remove()
        return None, {"gates": values}


class GatesClient(ClientMethod):
    def training(self, plan, extras, model, masks, device):
        return _GateHooks(self.cfg, extras, model, device)


@register_method
class Gates(Method):
    config_cls = GatesConfig
    client_cls = GatesClient

    def __init__(self, cfg, core) -> None:
        super().__init__(cfg, core)
        from ..fl.gates import attach_gates, gate_masks

        gates = attach_gates(core.model, cfg.mask.exclude)
        self.gates = gates.values()  # the consensus gates, sent down every gate round
        gates.remove()
        # fail before any round when mask.density cannot keep one channel per gated layer
        gate_masks(core.model, self.gates, cfg.mask.density, cfg.mask.exclude)

    def plan(self, server_round):
        if server_round > self.options.rounds:
            return None
        specs = {n: Tensor(g.shape, "float", low=0.0, high=1.0) for n, g in self.gates.items()}
        return Plan(records={"gates": dict(self.gates)}, replies={"gates": tensors(specs)})

    def combine(self, server_round, plan, replies, aggregated):
        weights = [r.examples for r in replies]
        self.gates = {n: self.combine_scores([r.records["gates"][n] for r in replies], weights)
                      .astype(np.float32) for n in self.gates}
        if server_round < self.options.rounds:
            return Outcome(aggregated)
        from ..fl.gates import gate_masks
        from ..fl.server_core import load_state_

        load_state_(self.core.model, aggregated)
        masks = gate_masks(self.core.model, self.gates, self.cfg.mask.density,
                           self.cfg.mask.exclude)
        self.core.set_masks(masks, aggregated)
        return Outcome(self.core.state, "gates", sum(int(m.sum()) for m in masks.values()))

    def state_dict(self):
        return {f"gates/{n}": g for n, g in self.gates.items()}

    def load_state_dict(self, state):
        from ..fl.gates import check_gate_values

        shapes = {n: g.shape for n, g in self.gates.items()}
        self.gates = check_gate_values(shapes, {k.split("/", 1)[1]: v for k, v in state.items()})
