"""Mask-adjustment methods on the server: what each sends, checks and does per round.

One small class per method, registered by name. The strategy asks the method for this
round's plan (config entries for the clients, extra records to send), lets it decode
and check its part of each reply (a bad part rejects the reply with the reason logged),
and hands it the accepted replies to move the global mask. All arithmetic is in the
Flower-free core (``fedprune.fedtiny.progressive``, ``fedprune.fl.dynamic``,
``fedprune.fl.gates``, ``fedprune.fl.consensus``).

- ``fedtiny``: progressive pruning (Huang et al. 2023, Sec. IV-B): one layer or block per
  scheduled round, clients send sparse top-K gradients, the server prunes and grows.
- ``prunefl``: clients send dense squared gradients of every layer; the server re-selects.
- ``feddst``: clients prune and grow locally and send their own masks; the server votes.
- ``gates``: clients train polarization-regularized channel gates; the server averages them
  and, after ``gates.rounds``, fixes the structured mask they agree on.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict

from fedprune.config import ExperimentConfig
from fedprune.fedtiny.progressive import Schedule, adjustment_plan, tensor_blocks
from fedprune.fl.consensus import average_scores
from fedprune.fl.server_core import SparseServer
from fedprune.masks import wire

from .records import to_numpy, to_record

_ADJUSTERS: dict[str, Callable[..., "Adjuster"]] = {}


def register_adjuster(name: str):
    def deco(cls):
        if name in _ADJUSTERS:
            raise ValueError(f"adjuster {name!r} is already registered")
        cls.name = name
        _ADJUSTERS[name] = cls
        return cls

    return deco


def make_adjuster(cfg: ExperimentConfig, core: SparseServer) -> "Adjuster | None":
    """The configured method's server side, or None for a mask fixed after round 0."""
    if cfg.fedtiny.delta_r:
        name = "fedtiny"
    elif cfg.dst.method != "none":
        name = cfg.dst.method
    elif cfg.gates.rounds:
        name = "gates"
    else:
        return None
    return _ADJUSTERS[name](cfg, core)


def _schedule(cfg: ExperimentConfig, section) -> Schedule:
    return Schedule(cfg.fed.rounds, section.delta_r, section.r_end, section.alpha)


def _check_dense_arrays(arrays: dict, shapes: dict[str, tuple], what: str, client: str
                        ) -> dict[str, np.ndarray]:
    """Exactly the expected tensor names and shapes, finite float values."""
    missing, extra = sorted(set(shapes) - set(arrays)), sorted(set(arrays) - set(shapes))
    if missing or extra:
        raise ValueError(f"{client}: {what}: missing tensors {missing[:3]}, unexpected {extra[:3]}")
    out = {}
    for name, shape in shapes.items():
        arr = np.asarray(arrays[name])
        if arr.shape != tuple(shape) or not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"{client}: {what} tensor {name!r} has shape {arr.shape} "
                             f"dtype {arr.dtype}, expected {tuple(shape)} float")
        if not np.isfinite(arr).all():
            raise ValueError(f"{client}: {what} tensor {name!r} has non-finite values")
        out[name] = arr
    return out


class Adjuster:
    """Base: a method that adjusts nothing on any round."""

    name = ""
    reply_format = "up"  # "up": kept values under the global mask; "down": own mask + values

    def __init__(self, cfg: ExperimentConfig, core: SparseServer) -> None:
        self.cfg, self.core = cfg, core
        self.plans: dict[int, dict[str, Any]] = {}

    def plan(self, server_round: int) -> dict[str, Any] | None:
        """Config entries for this round's train messages (``adjust-*``), or None."""
        return None

    def records(self, server_round: int) -> dict[str, ArrayRecord]:
        """Extra records sent down with this round's train messages."""
        return {}

    def parse(self, content: RecordDict, client: str, server_round: int) -> Any:
        """This method's part of one reply, checked; raises ValueError to reject it."""
        return None

    def aggregate(self, server_round: int, accepted: list, state: dict, stats: dict) -> dict:
        """Move the global mask using the accepted replies; returns the new global state."""
        return state

    def _planned(self, server_round: int, plan: dict[str, Any]) -> dict[str, Any]:
        self.plans[server_round] = plan
        return plan

    def _install(self, masks: dict, state: dict, stats: dict) -> dict:
        """Make ``masks`` (every layer re-selected) the global mask; record how many moved."""
        moved = sum(int((np.asarray(masks[n]) & ~self.core.masks[n]).sum()) for n in masks)
        self.core.set_masks({n: torch.from_numpy(np.asarray(m)) for n, m in masks.items()},
                            state)
        stats.update(adjusted_layer="all", adjusted_k=moved)
        return self.core.state

    def _moves(self, server_round: int, layers: list[str]) -> dict[str, Any] | None:
        """A plan moving K = alpha_t * active weights in each of ``layers`` (K > 0 only)."""
        from fedprune.fl.dynamic import layer_moves

        ks = layer_moves(self.schedule, server_round, {n: self.core.masks[n] for n in layers})
        ks = {n: k for n, k in ks.items() if k > 0}
        if not ks:
            return None
        return self._planned(server_round, {"adjust-method": self.name,
                                            "adjust-layers": list(ks),
                                            "adjust-ks": list(ks.values())})


@register_adjuster("fedtiny")
class FedTinyAdjust(Adjuster):
    """Scheduled layer/block, sparse top-K gradients up, server prune-and-grow."""

    def __init__(self, cfg: ExperimentConfig, core: SparseServer,
                 schedule: Schedule | None = None) -> None:
        super().__init__(cfg, core)
        self.schedule = schedule or _schedule(cfg, cfg.fedtiny)
        names = list(core.masks)
        self.groups = adjustment_plan(names, cfg.fedtiny.granularity, cfg.fedtiny.order,
                                      tensor_blocks(core.model, names))

    def plan(self, server_round: int) -> dict[str, Any] | None:
        if not self.schedule.adjusts(server_round):
            return None
        group = self.groups[(server_round // self.schedule.delta_r - 1) % len(self.groups)]
        return self._moves(server_round, group)

    def parse(self, content: RecordDict, client: str, server_round: int) -> Any:
        plan = self.plans[server_round]
        if "fedtiny" not in content.array_records:
            raise ValueError(f"{client}: no 'fedtiny' top-K record in an adjustment round")
        shapes = {n: (self.core.masks[n].shape, np.float32) for n in plan["adjust-layers"]}
        decoded = wire.decode_sparse(to_numpy(content["fedtiny"]), shapes, client)
        for layer, k in zip(plan["adjust-layers"], plan["adjust-ks"]):
            if len(decoded[layer][0]) > k:
                raise ValueError(f"{client}: tensor {layer!r}: {len(decoded[layer][0])} "
                                 f"top-K entries, K={k}")
        return decoded

    def aggregate(self, server_round: int, accepted: list, state: dict, stats: dict) -> dict:
        plan = self.plans[server_round]
        for layer, k in zip(plan["adjust-layers"], plan["adjust-ks"]):
            sparse = [(*r.extra[layer], r.examples) for r in accepted]
            state = self.core.prune_and_grow(layer, k, sparse, state)
        stats.update(adjusted_layer=",".join(plan["adjust-layers"]),
                     adjusted_k=int(sum(plan["adjust-ks"])))
        return state


class _DstAdjust(Adjuster):
    """A baseline on the ``dst`` schedule: every delta_r rounds before r_end."""

    def __init__(self, cfg: ExperimentConfig, core: SparseServer) -> None:
        super().__init__(cfg, core)
        self.schedule = _schedule(cfg, cfg.dst)

    def plan(self, server_round: int) -> dict[str, Any] | None:
        if not self.schedule.adjusts(server_round):
            return None
        return self._plan_round(server_round)

    def _plan_round(self, server_round: int) -> dict[str, Any] | None:
        return self._planned(server_round, {"adjust-method": self.name})


@register_adjuster("prunefl")
class PruneFLAdjust(_DstAdjust):
    """Dense squared gradients of every masked tensor up; per-layer re-selection."""

    def parse(self, content: RecordDict, client: str, server_round: int) -> Any:
        if "dst" not in content.array_records:
            raise ValueError(f"{client}: no 'dst' gradient record in an adjustment round")
        shapes = {n: m.shape for n, m in self.core.masks.items()}
        grads = _check_dense_arrays(to_numpy(content["dst"]), shapes, "squared gradient", client)
        if any((g < 0).any() for g in grads.values()):
            raise ValueError(f"{client}: squared gradients must be >= 0")
        return grads

    def aggregate(self, server_round: int, accepted: list, state: dict, stats: dict) -> dict:
        from fedprune.fl.dynamic import prunefl_reselect

        weights = [r.examples for r in accepted]
        importance = {n: average_scores([r.extra[n] for r in accepted], weights)
                      for n in self.core.masks}
        new_state, masks = prunefl_reselect(state, self.core.masks, importance)
        return self._install(masks, new_state, stats)


@register_adjuster("feddst")
class FedDSTAdjust(_DstAdjust):
    """Clients prune-and-grow locally and send their own mask; server votes."""

    reply_format = "down"

    def _plan_round(self, server_round: int) -> dict[str, Any] | None:
        return self._moves(server_round, list(self.core.masks))

    def aggregate(self, server_round: int, accepted: list, state: dict, stats: dict) -> dict:
        from fedprune.fl.dynamic import sparse_average, vote_masks

        weights = [r.examples for r in accepted]
        averaged = sparse_average([r.state for r in accepted], [r.masks for r in accepted],
                                  weights)
        counts = {n: int(m.sum()) for n, m in self.core.masks.items()}
        masks = vote_masks([r.masks for r in accepted], weights, counts,
                           {n: averaged[n] for n in counts})
        return self._install(masks, averaged, stats)


@register_adjuster("gates")
class GatesAdjust(Adjuster):
    """Channel gates trained by the clients, averaged here; mask fixed after gates.rounds."""

    def __init__(self, cfg: ExperimentConfig, core: SparseServer) -> None:
        super().__init__(cfg, core)
        from fedprune.fl.gates import attach_gates, gate_masks

        gates = attach_gates(core.model)
        self.gates = gates.values()  # the consensus gates, sent down every gate round
        gates.remove()
        # fail before any round when mask.density cannot keep one channel per gated layer
        gate_masks(core.model, self.gates, cfg.mask.density)

    def plan(self, server_round: int) -> dict[str, Any] | None:
        if server_round > self.cfg.gates.rounds:
            return None
        return self._planned(server_round, {"adjust-method": self.name})

    def records(self, server_round: int) -> dict[str, ArrayRecord]:
        return {"gates": to_record(self.gates)} if server_round in self.plans else {}

    def parse(self, content: RecordDict, client: str, server_round: int) -> Any:
        if "gates" not in content.array_records:
            raise ValueError(f"{client}: no 'gates' record in a gate-training round")
        shapes = {n: g.shape for n, g in self.gates.items()}
        return _check_dense_arrays(to_numpy(content["gates"]), shapes, "gate", client)

    def aggregate(self, server_round: int, accepted: list, state: dict, stats: dict) -> dict:
        weights = [r.examples for r in accepted]
        self.gates = {n: average_scores([r.extra[n] for r in accepted], weights)
                      .astype(np.float32) for n in self.gates}
        if server_round < self.cfg.gates.rounds:
            return state
        from fedprune.fl.gates import gate_masks
        from fedprune.fl.server_core import load_state_

        load_state_(self.core.model, state)
        masks = gate_masks(self.core.model, self.gates, self.cfg.mask.density)
        self.core.set_masks(masks, state)
        stats.update(adjusted_layer="gates", adjusted_k=sum(int(m.sum()) for m in masks.values()))
        return self.core.state
