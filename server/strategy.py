"""SparseFedAvg: FedAvg whose messages carry only what the mask keeps, for every method.

Down: packed mask bits + kept values (+ dense BN/bias tensors), plus what the method's plan
for the round adds. Up: kept values only (or, when the plan says so, the client's own mask
and values), plus the method's records. Every reply is checked against its spec by the one
validation layer (``fedprune.fl.replies``) before anything is aggregated; a rejected reply
is logged with client, field and reason and counted, and the round goes on. A round needs
``fed.quorum`` of its sampled clients to reply acceptably; below that it is sampled and sent
again up to ``fed.retries`` times, then the run stops with :class:`QuorumError`. The method
(``fedprune.methods``) decides everything method-specific; this module names no method.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from fedprune.fl.replies import Checked, Metric, ReplyError, ReplySpec
from fedprune.fl.server_core import SparseServer
from fedprune.masks import wire
from fedprune.methods import Method, Plan

from .query import QuorumError, available_nodes, base_spec, check_reply, quorum, reply_bytes
from .records import record_bytes, to_numpy, to_record

__all__ = ["SparseFedAvg", "QuorumError", "record_bytes", "to_numpy", "to_record"]


class SparseFedAvg(FedAvg):
    """Sparse FedAvg over the global mask; ``method`` plans rounds and combines replies."""

    def __init__(self, core: SparseServer, method: Method,
                 partition_sizes: list[int] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.core, self.method, self.cfg = core, method, core.cfg
        self.sizes = partition_sizes
        self.rng = random.Random(self.cfg.run.seed)  # node sampling; checkpointed
        self.plans: dict[int, Plan | None] = {}
        self.stats: dict[int, dict] = {}  # per round: bytes, clients, failures, seconds

    # ------------------------------------------------------------------ the rounds
    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3,
              timeout: float = 3600, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
              first_round: int = 1) -> Result:
        """Flower's round loop, plus retries below quorum and a first round other than 1
        (a resumed run; the round-0 evaluation then is already recorded)."""
        train_config = train_config or ConfigRecord()
        evaluate_config = evaluate_config or ConfigRecord()
        result, arrays = Result(), initial_arrays
        if evaluate_fn and first_round == 1:
            evaluate_fn(0, arrays)
        for rnd in range(first_round, num_rounds + 1):
            log(INFO, "[ROUND %s/%s]", rnd, num_rounds)
            arrays = self._train_round(grid, rnd, arrays, train_config, timeout)
            result.arrays = arrays
            replies = grid.send_and_receive(
                self.configure_evaluate(rnd, arrays, evaluate_config, grid), timeout=timeout)
            self.aggregate_evaluate(rnd, replies)
            if evaluate_fn:
                evaluate_fn(rnd, arrays)
        return result

    def _train_round(self, grid: Grid, rnd: int, arrays: ArrayRecord, config: ConfigRecord,
                     timeout: float) -> ArrayRecord:
        for attempt in range(self.cfg.fed.retries + 1):
            replies = grid.send_and_receive(self.configure_train(rnd, arrays, config, grid),
                                            timeout=timeout)
            new, _ = self.aggregate_train(rnd, replies)
            self.stats[rnd]["retries"] = attempt
            if new is not None:
                return new
            log(WARNING, "round %d: %d of %d sampled clients accepted, below the quorum of "
                "%d (attempt %d of %d)", rnd, self.stats[rnd]["accepted"],
                self.stats[rnd]["clients"], self.stats[rnd]["quorum"], attempt + 1,
                self.cfg.fed.retries + 1)
        raise QuorumError(f"round {rnd}: fewer accepted replies than fed.quorum="
                          f"{self.cfg.fed.quorum} needs ({self.stats[rnd]['accepted']} of "
                          f"{self.stats[rnd]['clients']}) in {self.cfg.fed.retries + 1} "
                          "attempts; the run stops here (resume it with --resume)")

    def _sample(self, grid: Grid, fraction: float, minimum: int) -> list[int]:
        nodes = available_nodes(grid, self.cfg)
        size = min(max(int(len(nodes) * fraction), minimum), len(nodes))
        return self.rng.sample(sorted(nodes), size)

    # ------------------------------------------------------------------ train
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        plan = self.method.plan(server_round)
        self.plans[server_round] = plan
        payload = to_record(self.core.encode_down(to_numpy(arrays)))
        # a copy: the caller reuses one ConfigRecord for every round, and a plan's keys
        # must not leak into the next round's messages
        content = {"arrays": payload, "config": ConfigRecord({
            **dict(config), "server-round": server_round, "fedprune-plan": plan is not None,
            **{f"plan.{k}": v for k, v in (plan.config if plan else {}).items()}})}
        for key, arrays_down in (plan.records if plan else {}).items():
            content[key] = to_record(arrays_down)
        nodes = self._sample(grid, self.fraction_train, self.min_train_nodes)
        log(INFO, "configure_train: sampled %d nodes", len(nodes))
        stats = self.stats.setdefault(server_round, {"bytes_up": 0, "client_seconds": 0.0,
                                                     "bytes_down": 0})
        per_client = sum(record_bytes(r) for r in content.values() if isinstance(r, ArrayRecord))
        stats.update(bytes_down_per_client=per_client, clients=len(nodes))
        stats["bytes_down"] += per_client * len(nodes)
        return [Message(RecordDict(content), message_type=MessageType.TRAIN, dst_node_id=n)
                for n in nodes]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        plan = self.plans.get(server_round)
        replies = list(replies)
        stats = self.stats.setdefault(server_round, {"bytes_up": 0, "client_seconds": 0.0,
                                                     "bytes_down": 0, "clients": len(replies)})
        accepted = self._check_all(replies, self.train_spec(plan), stats)
        if len(accepted) < stats["quorum"]:
            return None, None
        # Replies arrive in whatever order the clients finish; combining in partition
        # order keeps the aggregate independent of arrival order.
        accepted.sort(key=lambda r: (r.partition, r.node))
        weights = [r.examples for r in accepted]
        aggregated = None
        if not (plan and plan.own_masks):
            aggregated = self.core.aggregate([r.records["arrays"] for r in accepted], weights)
        stats.update(adjusted_layer="", adjusted_k=0)
        if plan is not None:
            outcome = self.method.combine(server_round, plan, accepted, aggregated)
            aggregated = outcome.state
            stats.update(adjusted_layer=outcome.moved, adjusted_k=outcome.k)
        stats["client_seconds"] += sum(float(r.metrics.get("compute_seconds", 0.0))
                                       for r in accepted)
        total = float(sum(weights))
        train_loss = sum(r.examples * r.metrics["train_loss"] for r in accepted) / total
        return to_record(aggregated), MetricRecord({"train_loss": train_loss,
                                                    "num-examples": int(total)})

    def train_spec(self, plan: Plan | None) -> ReplySpec:
        """A training reply: the model (kept values under the global mask, or the client's
        own mask and values when the plan says so), the method's records, and metrics."""
        decode = self._own_mask if plan and plan.own_masks else \
            (lambda arrays, client, record: self.core.decode_reply(arrays, client))
        spec = self.base_spec().merged(ReplySpec(
            metrics={"train_loss": Metric("float", low=0.0),
                     "compute_seconds": Metric("float", low=0.0, required=False)},
            records={"arrays": decode}))
        return spec.merged(ReplySpec(records=dict(plan.replies),
                                     checks=list(plan.checks))) if plan else spec

    def base_spec(self) -> ReplySpec:
        """What every reply carries (``query.base_spec``)."""
        return base_spec(self.cfg, self.sizes)

    def _own_mask(self, arrays, client: str, record: str) -> tuple[dict, dict]:
        """A client's own mask + values; each layer must keep as many weights as now."""
        state, masks = wire.decode_down(arrays, self.core.template, client)
        if set(masks) != set(self.core.masks):
            raise ReplyError(client, record, f"masks for {sorted(masks)[:3]}..., expected "
                                             "the global masked tensors")
        for name, mask in masks.items():
            if int(mask.sum()) != int(self.core.masks[name].sum()):
                raise ReplyError(client, f"{record}/{name}", f"keeps {int(mask.sum())} "
                                 f"weights, the global mask {int(self.core.masks[name].sum())}")
        return state, masks

    def _check_all(self, replies: Iterable[Message], spec: ReplySpec, stats: dict
                   ) -> list[Checked]:
        """The replies that pass ``spec``; rejections logged and counted in ``stats``."""
        replies = list(replies)
        accepted = [r for r in (self._check(m, spec, stats) for m in replies) if r is not None]
        stats["accepted"] = len(accepted)
        stats["timed_out"] = stats["clients"] - len(replies)
        stats["rejected"] = len(replies) - len(accepted)
        stats["failures"] = stats["clients"] - len(accepted)
        stats["quorum"] = quorum(self.cfg, stats["clients"])
        if stats["timed_out"]:
            log(WARNING, "%d of %d sampled clients did not answer within the time-out",
                stats["timed_out"], stats["clients"])
        log(INFO, "round: %d accepted, %d rejected, %d timed out", len(accepted),
            stats["rejected"], stats["timed_out"])
        return accepted

    def _check(self, msg: Message, spec: ReplySpec, stats: dict) -> Checked | None:
        stats["bytes_up"] = stats.get("bytes_up", 0) + reply_bytes(msg)
        try:
            return check_reply(msg, spec)
        except ReplyError as err:
            log(WARNING, "rejected reply from %s: field %s: %s", err.client, err.field,
                err.reason)
            return None

    # ------------------------------------------------------------------ evaluate
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord,
                           config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if self.fraction_evaluate == 0.0:
            return []
        payload = to_record(self.core.encode_down(to_numpy(arrays)))
        conf = ConfigRecord({**dict(config), "server-round": server_round})
        nodes = self._sample(grid, self.fraction_evaluate, self.min_evaluate_nodes)
        self.stats.setdefault(server_round, {})["eval_clients"] = len(nodes)
        return [Message(RecordDict({"arrays": payload, "config": conf}),
                        message_type=MessageType.EVALUATE, dst_node_id=n) for n in nodes]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        """Example-weighted mean of the checked clients' loss and accuracy."""
        spec = self.base_spec().merged(ReplySpec(metrics={
            "loss": Metric("float", low=0.0), "accuracy": Metric("float", low=0.0, high=1.0)}))
        stats = self.stats.setdefault(server_round, {})
        scratch = {"clients": stats.get("eval_clients", 0)}
        accepted = [r for r in (self._check(m, spec, scratch) for m in replies) if r]
        if not accepted:
            return None
        total = float(sum(r.examples for r in accepted))
        metrics = {k: sum(r.examples * r.metrics[k] for r in accepted) / total
                   for k in ("loss", "accuracy")}
        stats.update(fed_accuracy=metrics["accuracy"], fed_loss=metrics["loss"])
        return MetricRecord(metrics)

