"""Mask-adjustment methods on the client, one small registered class each (Flower-free).

The server's plan for a round (``adjust-method`` plus its entries, see ``server/adjust.py``)
selects a class here. It hooks into local training (``hook`` after each backward,
``regularizer`` added to the loss, ``extra_params`` trained alongside) and, after
training, returns what the method sends up: extra arrays under a record name, and for
FedDST the client's own new mask.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..config import ExperimentConfig
from ..masks import wire

_CLIENT_ADJUST: dict[str, type["ClientAdjust"]] = {}


def register_client_adjust(name: str):
    def deco(cls):
        if name in _CLIENT_ADJUST:
            raise ValueError(f"client adjustment {name!r} is already registered")
        _CLIENT_ADJUST[name] = cls
        return cls

    return deco


def make_client_adjust(plan: dict[str, Any] | None, cfg: ExperimentConfig, model: nn.Module,
                       masks: dict[str, torch.Tensor], extras: dict[str, dict],
                       device: torch.device) -> "ClientAdjust | None":
    """The class for ``plan['adjust-method']`` set up on this model, or None (no plan)."""
    if not plan:
        return None
    method = str(plan.get("adjust-method", ""))
    if method not in _CLIENT_ADJUST:
        raise ValueError(f"adjust-method={method!r} is unknown; valid: {sorted(_CLIENT_ADJUST)}")
    return _CLIENT_ADJUST[method](plan, cfg, model, masks, extras, device)


def _layers_and_ks(plan: dict[str, Any], masks: dict[str, torch.Tensor]
                   ) -> list[tuple[str, int]]:
    """(layer, K) pairs of the plan; a layer that is not masked or a K that exceeds the
    layer's pruned (growable) positions is an error naming the layer."""
    layers, ks = list(plan.get("adjust-layers", [])), [int(k) for k in plan.get("adjust-ks", [])]
    if len(layers) != len(ks):
        raise ValueError(f"adjust-layers has {len(layers)} entries, adjust-ks {len(ks)}")
    for layer, k in zip(layers, ks):
        if layer not in masks:
            raise ValueError(f"adjust layer {layer!r} is not a masked tensor of the model")
        pruned = int((~masks[layer]).sum())
        if not 0 <= k <= pruned:
            raise ValueError(f"adjust layer {layer!r}: K={k} but only {pruned} pruned "
                             "positions can grow")
    return list(zip(layers, ks))


class ClientAdjust:
    """Base: what a method adds to local training and to the reply."""

    hook: Callable[[], None] | None = None
    regularizer: Callable[[], torch.Tensor] | None = None
    extra_params: list[dict] | None = None

    def __init__(self, plan, cfg, model, masks, extras, device) -> None:
        self.plan, self.cfg, self.model, self.masks, self.device = plan, cfg, model, masks, device

    def finish(self, batches) -> tuple[dict[str, torch.Tensor] | None, dict[str, dict]]:
        """After training: (the client's own new masks or None, extra records to send)."""
        return None, {}


@register_client_adjust("fedtiny")
class FedTinyClient(ClientAdjust):
    """Bounded top-K buffers of the scheduled layers' pruned-position gradients."""

    def __init__(self, plan, cfg, model, masks, extras, device) -> None:
        super().__init__(plan, cfg, model, masks, extras, device)
        from ..fedtiny.progressive import TopKBuffer

        params = dict(model.named_parameters())
        self.buffers = [(params[layer], layer, TopKBuffer(k, masks[layer].to(device)))
                        for layer, k in _layers_and_ks(plan, masks)]

        def hook() -> None:
            for param, _, buffer in self.buffers:
                if param.grad is not None:
                    buffer.add_(param.grad)

        self.hook = hook

    def finish(self, batches):
        entries = {layer: (b.index.numpy(), b.value.numpy().astype(np.float32))
                   for _, layer, b in self.buffers}
        return None, {"fedtiny": wire.encode_sparse(entries)}


@register_client_adjust("prunefl")
class PruneFLClient(ClientAdjust):
    """Dense squared gradients of every masked tensor, accumulated over local training."""

    def __init__(self, plan, cfg, model, masks, extras, device) -> None:
        super().__init__(plan, cfg, model, masks, extras, device)
        from .dynamic import GradSquareAccumulator

        self.acc = GradSquareAccumulator(model, list(masks))
        self.hook = self.acc.add_

    def finish(self, batches):
        return None, {"dst": {n: np.asarray(g, dtype=np.float32)
                              for n, g in self.acc.result().items()}}


@register_client_adjust("feddst")
class FedDSTClient(ClientAdjust):
    """After local training: RigL prune-and-grow per layer on one local batch."""

    def finish(self, batches):
        from .dynamic import client_adjust

        ks = dict(_layers_and_ks(self.plan, self.masks))
        batch = next(iter(batches))  # RigL's growth signal: one batch's dense gradient
        masks = client_adjust(self.model, self.masks, [batch], ks, self.device)
        return masks, {}


@register_client_adjust("gates")
class GatesClient(ClientAdjust):
    """Channel gates with the polarization regularizer, trained with the weights."""

    def __init__(self, plan, cfg, model, masks, extras, device) -> None:
        super().__init__(plan, cfg, model, masks, extras, device)
        from .gates import attach_gates

        if "gates" not in extras:
            raise ValueError("a gate-training round needs the server's 'gates' record")
        self.gates = attach_gates(model)
        self.gates.load_(extras["gates"])
        self.gates.to(device)
        from .gates import polarization_t

        g = cfg.gates
        t = g.t or polarization_t(cfg.mask.density)  # 0 = auto (see GatesConfig)
        self.regularizer = lambda: self.gates.regularizer(g.lam, t)
        self.extra_params = [{"params": list(self.gates.parameters()), "lr": g.lr,
                              "momentum": 0.0, "weight_decay": 0.0}]

    def finish(self, batches):
        values = self.gates.values()
        self.gates.remove()
        return None, {"gates": values}
