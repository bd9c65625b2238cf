"""``fedtiny``: adaptive BN selection and progressive pruning (FedTiny, Huang et al. 2023).

Adaptive BN selection (Sec. IV-A; ``candidates`` > 0), two query rounds before training.
The server builds ``candidates`` masks at the target density from the initial model
(``fedprune.fedtiny.candidates``). Round A (``bn_stats``): each client runs every candidate
in train mode on its own data and returns, per BN layer, the exact per-channel input mean
and variance with their count; the server pools them exactly into each candidate's BN
buffers. Round B (``candidate_loss``): each client evaluates every candidate with the
pooled BN and returns its losses, error rates and example count; the lowest
example-weighted loss wins (``select_on: error``: the lowest error).
With ``candidates`` = 0 the run starts from the ``init`` mask instead ("progonly").

Progressive pruning (Sec. IV-B; ``delta_r`` > 0): every ``delta_r`` rounds before ``r_end``
one layer, or every masked tensor of one block (``granularity``), in ``order``, moves
K = alpha_t x its active weights: clients keep only the top-K pruned-position gradients in
a bounded buffer during local training and send them sparse; the server sums them weighted
by examples, grows the K largest and prunes the K smallest-|w| (``masks.regrow``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..config import ConfigError, MethodConfig, check_choice, check_value
from ..fedtiny.progressive import Schedule, TopKBuffer, adjustment_plan, tensor_blocks
from ..fl.replies import Metric, ReplyError, ReplySpec, Tensor, tensors
from ..masks import wire
from ..masks.regrow import prune_and_grow, sparse_scores
from .base import ClientMethod, Method, Outcome, Plan, Query, TrainingHooks, register_method
from .fixed import check_init, start_masks

STAT_FIELDS = ("mean", "var", "count")


@dataclass
class FedTinyConfig(MethodConfig):
    name: str = "fedtiny"
    # Adaptive BN selection among this many candidate masks before training (0 = off:
    # the run starts from the ``init`` mask).
    candidates: int = 0
    # Rounds of federated training before the selection, so that it judges a model that
    # has learned something: under a dense mask ("dense") or the ``init`` mask ("init").
    # They count in fed.rounds; progressive pruning starts after them.
    warmup_rounds: int = 0
    warmup_mask: str = "dense"
    spread: float = 2.0  # perturbed candidates scale ERK layer densities within [1/s, s]
    # When the winner's margin over the runner-up is not established across clients (its
    # 95% interval over clients contains zero): "pick" it anyway, or fall back to the
    # ``init`` allocation ("init") when that is among the candidates
    unsure: str = "pick"
    # What the candidates are judged on: the paper's "loss", or "error" (1 - accuracy).
    # The loss can prefer a candidate that predicts nothing: when no candidate beats
    # chance, near-uniform outputs score about ln(classes), less than confident wrong
    # ones (at 1% density and alpha 0.1 every warm-up selection chose "uniform" so).
    select_on: str = "loss"
    init: str = "erk"  # the starting mask when candidates = 0
    # Progressive pruning: every delta_r rounds before r_end, K = alpha_t * active moves.
    delta_r: int = 0  # 0 = off
    r_end: int = 0  # 0 = three quarters of fed.rounds
    alpha: float = 0.3
    # What one adjustment moves: one masked tensor ("layer") or every masked tensor of one
    # block ("block"), visited in ``order``: "forward", "reverse", or comma-separated
    # tensor names / block prefixes.
    granularity: str = "layer"
    order: str = "forward"

    def __post_init__(self) -> None:
        check_value("method.candidates", self.candidates >= 0, "must be >= 0", self.candidates)
        check_value("method.spread", self.spread >= 1.0, "must be >= 1", self.spread)
        check_choice("method.unsure", self.unsure, ("pick", "init"))
        check_choice("method.select_on", self.select_on, ("loss", "error"))
        check_value("method.warmup_rounds", self.warmup_rounds >= 0, "must be >= 0",
                    self.warmup_rounds)
        check_choice("method.warmup_mask", self.warmup_mask, ("dense", "init"))
        check_init("method.init", self.init)
        check_value("method.delta_r", self.delta_r >= 0, "must be >= 0 (0 = off)", self.delta_r)
        check_value("method.r_end", self.r_end >= 0, "must be >= 0", self.r_end)
        check_value("method.alpha", 0 < self.alpha <= 1, "must be in (0, 1]", self.alpha)
        check_choice("method.granularity", self.granularity, ("layer", "block"))
        check_value("method.order", bool(self.order.strip()),
                    "must be forward, reverse or names", self.order)

    def check(self, cfg) -> None:
        if self.r_end > cfg.fed.rounds:
            raise ConfigError(f"method.r_end={self.r_end} is beyond fed.rounds={cfg.fed.rounds}")
        if self.warmup_rounds and not self.candidates:
            raise ConfigError(f"method.warmup_rounds={self.warmup_rounds} warms the model up "
                              "for adaptive BN selection, which is off (method.candidates=0)")
        if self.warmup_rounds >= cfg.fed.rounds:
            raise ConfigError(f"method.warmup_rounds={self.warmup_rounds} leaves no round "
                              f"after the selection (fed.rounds={cfg.fed.rounds})")


# ----------------------------------------------------------------------------- client


class FedTinyClient(ClientMethod):
    def training(self, plan, extras, model, masks, device):
        return _TopKHooks(layers_and_ks(plan, masks), model, masks, device)

    def answer(self, kind, partition_id, payload, config=None):
        from ..fedtiny.bn_selection import client_bn_stats, client_candidate_losses

        if kind == "bn_stats":
            arrays, n = client_bn_stats(self.cfg, partition_id, payload)
            return arrays, {"num-examples": n}
        if kind == "candidate_loss":
            losses, errors, n = client_candidate_losses(self.cfg, partition_id, payload)
            return {}, {"losses": losses, "errors": errors, "num-examples": n}
        return super().answer(kind, partition_id, payload, config)


def moves(schedule: Schedule, server_round: int, masks: dict) -> dict[str, int]:
    """Layer -> K for this round's plan (alpha_t x active, bounded), layers with K > 0."""
    from ..fl.dynamic import layer_moves

    return {n: k for n, k in layer_moves(schedule, server_round, masks).items() if k > 0}


def layers_and_ks(plan: dict[str, Any], masks: dict[str, torch.Tensor]) -> list[tuple[str, int]]:
    """(layer, K) pairs of a plan; a layer that is not masked or a K beyond the layer's
    pruned (growable) positions is an error naming the layer."""
    layers, ks = list(plan.get("layers", [])), [int(k) for k in plan.get("ks", [])]
    if len(layers) != len(ks):
        raise ValueError(f"plan layers has {len(layers)} entries, ks {len(ks)}")
    for layer, k in zip(layers, ks):
        if layer not in masks:
            raise ValueError(f"adjust layer {layer!r} is not a masked tensor of the model")
        pruned = int((~masks[layer]).sum())
        if not 0 <= k <= pruned:
            raise ValueError(f"adjust layer {layer!r}: K={k} but only {pruned} pruned "
                             "positions can grow")
    return list(zip(layers, ks))


class _TopKHooks(TrainingHooks):
    """Bounded top-K buffers of the scheduled layers' pruned-position gradients."""

    def __init__(self, layers_ks, model, masks, device) -> None:
        params = dict(model.named_parameters())
        self.buffers = [(params[layer], layer, TopKBuffer(k, masks[layer].to(device)))
                        for layer, k in layers_ks]

        def hook() -> None:
            for param, _, buffer in self.buffers:
                if param.grad is not None:
                    buffer.add_(param.grad)

        self.hook = hook

    def finish(self, batches):
        entries = {layer: (b.index.numpy(), b.value.numpy().astype(np.float32))
                   for _, layer, b in self.buffers}
        return None, {"fedtiny": wire.encode_sparse(entries)}


# ----------------------------------------------------------------------------- server


@register_method
class FedTiny(Method):
    config_cls = FedTinyConfig
    client_cls = FedTinyClient

    def __init__(self, cfg, core) -> None:
        super().__init__(cfg, core)
        o = self.options
        self.schedule = (Schedule(cfg.fed.rounds, o.delta_r, o.r_end, o.alpha)
                         if o.delta_r else None)
        names = list(core.masks)
        self.groups = adjustment_plan(names, o.granularity, o.order,
                                      tensor_blocks(core.model, names))

    @classmethod
    def initial_masks(cls, model, cfg):
        o = cfg.method
        if o.warmup_rounds and o.warmup_mask == "dense":
            return super().initial_masks(model, cfg)  # dense: the base method's mask
        return start_masks(model, cfg, o.init)

    def warmup_rounds(self) -> int:
        return self.options.warmup_rounds

    # ------------------------------------------------------------------ BN selection
    def queries(self):
        if not self.options.candidates:
            return None
        from ..fedtiny.bn_selection import pack_candidates, with_pooled_bn
        from ..fedtiny.candidates import (build_candidates, select_candidate, selection_margin,
                                          weighted_losses)
        from ..fl.server_core import load_state_
        from ..models import build_model

        cfg, core = self.cfg, self.core
        dense = build_model(cfg.model, cfg.data.dataset)
        # after a warm-up the candidates come from the trained global model
        source = core.state if self.options.warmup_rounds else core.initial_state
        load_state_(dense, source)
        candidates = build_candidates(dense, cfg.mask.density, self.options.candidates,
                                      cfg.mask.seed, self.options.spread, cfg.mask.exclude)
        masks = [{n: m.numpy() for n, m in c.items()} for _, c in candidates]
        states = [{n: (v * m[n] if n in m else v) for n, v in source.items()} for m in masks]
        count = len(candidates)
        replies = yield Query("bn_stats", pack_candidates(states, masks),
                              _bn_spec(_bn_layers(dense, cfg), count))
        per_candidate = [[r.records["arrays"][k] for r in replies] for k in range(count)]
        pooled = [with_pooled_bn(cfg, s, p) for s, p in zip(states, per_candidate)]
        replies = yield Query("candidate_loss", pack_candidates(pooled, masks), ReplySpec(
            metrics={"losses": Metric("floats", low=0.0, length=count),
                     "errors": Metric("floats", low=0.0, high=1.0, length=count)}))
        losses = [r.metrics["losses"] for r in replies]
        errors = [r.metrics["errors"] for r in replies]
        counts = [r.examples for r in replies]
        # both signals are lower-is-better, so one selection and one margin serve either;
        # equal error rates (likely near chance, where many candidates predict one class)
        # are told apart by loss, not by candidate order
        on_error = self.options.select_on == "error"
        by_loss, by_error = weighted_losses(losses, counts), weighted_losses(errors, counts)
        scores, weighted = (errors, by_error) if on_error else (losses, by_loss)
        best = select_candidate(scores, counts, by_loss if on_error else None)
        record = {"candidates": [name for name, _ in candidates],
                  "select_on": self.options.select_on,
                  "weighted_losses": by_loss, "weighted_errors": by_error,
                  "clients_stats": len(per_candidate[0]), "clients_losses": len(losses),
                  # kept so a study can re-judge the choice later (e.g. another margin)
                  "client_losses": [list(map(float, row)) for row in losses],
                  "client_errors": [list(map(float, row)) for row in errors],
                  "client_examples": [int(c) for c in counts]}
        if count > 1:  # the runner-up, by the same weighted signal
            rival = min((k for k in range(count) if k != best), key=lambda k: weighted[k])
            record["margin"] = selection_margin(scores, best, rival, counts)
            if self.options.unsure == "init" and not record["margin"]["confident"]:
                # a choice the clients cannot tell from the runner-up is noise: keep the
                # allocation rule the run would start from without selection
                fallback = [name for name, _ in candidates].index(self.options.init) \
                    if self.options.init in record["candidates"] else best
                record["fallback"] = f"unsure: {candidates[best][0]} -> " \
                                     f"{candidates[fallback][0]}"
                best = fallback
        core.set_masks(candidates[best][1], pooled[best])
        record["chosen"] = candidates[best][0]
        return record

    # ------------------------------------------------------------------ progressive pruning
    def plan(self, server_round):
        if self.schedule is None or not self.schedule.adjusts(server_round) or \
                server_round <= self.options.warmup_rounds:
            return None
        group = self.groups[(server_round // self.schedule.delta_r - 1) % len(self.groups)]
        ks = moves(self.schedule, server_round, {n: self.core.masks[n] for n in group})
        if not ks:
            return None
        return Plan(config={"layers": list(ks), "ks": list(ks.values())},
                    replies={"fedtiny": self._topk_decoder(ks)})

    def _topk_decoder(self, ks: dict[str, int]):
        shapes = {n: (self.core.masks[n].shape, np.float32) for n in ks}

        def decode(arrays, client, record):
            decoded = wire.decode_sparse(arrays, shapes, client)
            for layer, (index, _) in decoded.items():
                if len(index) > ks[layer]:
                    raise ValueError(f"tensor {layer!r}: {len(index)} top-K entries, "
                                     f"K={ks[layer]}")
            return decoded
        return decode

    def combine(self, server_round, plan, replies, aggregated):
        layers, ks = plan.config["layers"], plan.config["ks"]
        total = float(sum(r.examples for r in replies))
        state, masks = dict(aggregated), dict(self.core.masks_t)
        for layer, k in zip(layers, ks):
            numel = state[layer].size
            grad = torch.zeros(numel, dtype=torch.float64)
            seen = torch.zeros(numel, dtype=torch.bool)
            for r in replies:  # example-weighted sum of the clients' sparse top-K
                index, value = r.records["fedtiny"][layer]
                index = torch.from_numpy(index)
                grad.index_add_(0, index, torch.from_numpy(value).double() * (r.examples / total))
                seen[index] = True
            score = sparse_scores(numel, seen.nonzero().squeeze(1), grad[seen])
            weight, mask = prune_and_grow(torch.from_numpy(state[layer]), masks[layer],
                                          score, k)
            state[layer], masks[layer] = weight.numpy(), mask
        self.core.set_masks(masks, state)
        return Outcome(self.core.state, ",".join(layers), int(sum(ks)))


# ----------------------------------------------------------------------------- BN checks


def _bn_layers(model: torch.nn.Module, cfg) -> dict[str, tuple[int, int]]:
    """BN layer -> (channels, positions per example its statistics count: 1 for
    BatchNorm1d, H x W for BatchNorm2d), from one forward pass of one dummy example."""
    from ..models import input_shape

    layers, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            def hook(mod, args, name=name):
                layers[name] = (mod.num_features, args[0].numel() // args[0].shape[1])
            handles.append(module.register_forward_pre_hook(hook))
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, *input_shape(cfg.data.dataset)))
    for h in handles:
        h.remove()
    return layers


def _bn_spec(layers: dict[str, tuple[int, int]], count: int) -> ReplySpec:
    """Round A: per candidate and BN layer, finite means, finite non-negative variances and
    a count equal to the client's examples x the layer's positions per example."""
    from ..fedtiny.bn_stats import BNStats

    check = tensors({f"{k}/{name}/{field}": spec
                     for k in range(count) for name, (c, _) in layers.items()
                     for field, spec in (("mean", Tensor((c,), "float")),
                                         ("var", Tensor((c,), "float", low=0.0)),
                                         ("count", Tensor((), "int", low=1)))})

    def decode(arrays, client, record):
        checked = check(arrays, client, record)
        return [{name: BNStats(int(checked[f"{k}/{name}/count"]),
                               checked[f"{k}/{name}/mean"].astype(np.float64),
                               checked[f"{k}/{name}/var"].astype(np.float64))
                 for name in layers} for k in range(count)]

    def counts_match(reply) -> None:
        for k, stats in enumerate(reply.records["arrays"]):
            for name, s in stats.items():
                if s.count != reply.examples * layers[name][1]:
                    raise ReplyError(reply.client, f"arrays/{k}/{name}/count",
                                     f"{s.count} != num-examples {reply.examples} x "
                                     f"{layers[name][1]} positions")
    return ReplySpec(records={"arrays": decode}, checks=[counts_match])
