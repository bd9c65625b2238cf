"""SparseFedAvg: FedAvg whose messages carry only what the mask keeps.

Down: packed mask bits + kept values (+ dense BN/bias tensors). Up: kept values only.
Each reply is decoded strictly by the Flower-free core; a malformed reply is rejected
with its reason logged and the round continues with the other clients.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedprune.fl.server_core import SparseServer
from fedprune.masks import wire

from .adjust import Adjuster
from .records import record_bytes, to_numpy, to_record

__all__ = ["SparseFedAvg", "record_bytes", "to_numpy", "to_record"]


@dataclass
class _Reply:
    state: dict
    examples: int
    metrics: dict
    nbytes: int
    node: int
    masks: dict | None = None  # the client's own mask (methods that adjust it locally)
    extra: object = None  # the adjustment method's part of the reply, checked


class SparseFedAvg(FedAvg):
    """FedAvg over the kept positions of the global mask; an ``adjuster`` (FedTiny,
    PruneFL, FedDST, gates: ``server/adjust.py``) moves the mask on the rounds it plans."""

    def __init__(self, core: SparseServer, adjuster: Adjuster | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.core = core
        self.adjuster = adjuster
        self.stats: dict[int, dict] = {}  # per round: bytes, clients, failures, seconds

    def _encode(self, arrays: ArrayRecord) -> ArrayRecord:
        return to_record(self.core.encode_down(to_numpy(arrays)))

    def _plan(self, server_round: int) -> dict | None:
        return self.adjuster.plan(server_round) if self.adjuster else None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        payload = self._encode(arrays)
        plan = self._plan(server_round) or {}
        # a copy: the caller reuses one ConfigRecord for every round, and a plan's keys
        # must not leak into the next round's messages
        config = ConfigRecord({**dict(config), **plan})
        messages = list(super().configure_train(server_round, payload, config, grid))
        extra = self.adjuster.records(server_round) if plan else {}
        for msg in messages:
            for key, record in extra.items():
                msg.content[key] = record
        per_client = record_bytes(payload) + sum(record_bytes(r) for r in extra.values())
        self.stats[server_round] = {"bytes_down_per_client": per_client,
                                    "clients": len(messages), "failures": 0,
                                    "bytes_up": 0, "client_seconds": 0.0}
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord,
                           config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return super().configure_evaluate(server_round, self._encode(arrays), config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        """FedAvg's weighted metric average; kept for the round's row in the run records."""
        metrics = super().aggregate_evaluate(server_round, replies)
        if metrics is not None:
            stats = self.stats.setdefault(server_round, {})
            stats["fed_accuracy"] = float(metrics.get("accuracy", float("nan")))
            stats["fed_loss"] = float(metrics.get("loss", float("nan")))
        return metrics

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = self.stats.setdefault(server_round, {"failures": 0, "bytes_up": 0,
                                                     "client_seconds": 0.0})
        adjusting = self.adjuster is not None and server_round in self.adjuster.plans
        accepted = []
        for msg in replies:
            reply = self._accept(msg, server_round if adjusting else None)
            if reply is None:
                stats["failures"] += 1
                continue
            accepted.append(reply)
            stats["bytes_up"] += reply.nbytes
            stats["client_seconds"] += float(reply.metrics.get("compute_seconds", 0.0))
        # Replies arrive in whatever order the clients finish; summing in partition order
        # keeps the aggregate independent of arrival order.
        accepted.sort(key=lambda r: (r.metrics.get("partition-id", -1), r.node))
        log(INFO, "aggregate_train: %d accepted, %d rejected", len(accepted), stats["failures"])
        if not accepted:
            return None, None
        weights = [r.examples for r in accepted]
        aggregated = None
        if not (adjusting and self.adjuster.reply_format == "down"):  # else: own masks
            aggregated = self.core.aggregate([r.state for r in accepted], weights)
        if adjusting:
            aggregated = self.adjuster.aggregate(server_round, accepted, aggregated, stats)
        total = float(sum(weights))
        train_loss = sum(r.examples * float(r.metrics.get("train_loss", 0.0))
                         for r in accepted) / total
        return to_record(aggregated), MetricRecord({"train_loss": train_loss,
                                                    "num-examples": int(total)})

    def _accept(self, msg: Message, adjusting: int | None) -> _Reply | None:
        """Decode one reply, or log why it is rejected and return None.

        ``adjusting``: the round number when the adjustment method planned this round
        (its part of the reply is checked too), else None."""
        node = msg.metadata.src_node_id
        if msg.has_error():
            log(WARNING, "node %s: reply carries an error: %s", node, msg.error.reason)
            return None
        try:
            metrics = msg.content["metrics"]
            client = f"node {node} (partition {int(metrics.get('partition-id', -1))})"
            n = int(metrics["num-examples"])
            if n <= 0:
                raise ValueError(f"num-examples={n} must be > 0")
            record = msg.content["arrays"]
            reply = _Reply({}, n, dict(metrics), record_bytes(record), node)
            if adjusting is not None and self.adjuster.reply_format == "down":
                reply.state, reply.masks = self._decode_own_mask(to_numpy(record), client)
            else:
                reply.state = self.core.decode_reply(to_numpy(record), client)
            if adjusting is not None:
                reply.extra = self.adjuster.parse(msg.content, client, adjusting)
                reply.nbytes += sum(record_bytes(r) for k, r in msg.content.array_records.items()
                                    if k != "arrays")
        except (KeyError, ValueError, TypeError) as err:  # WireError is a ValueError
            log(WARNING, "rejected reply from node %s: %s", node, err)
            return None
        return reply

    def _decode_own_mask(self, payload: dict, client: str) -> tuple[dict, dict]:
        """A client's own mask + values; each layer must keep as many weights as now."""
        state, masks = wire.decode_down(payload, self.core.template, client)
        if set(masks) != set(self.core.masks):
            raise ValueError(f"{client}: masks for {sorted(masks)[:3]}..., expected the "
                             f"global masked tensors")
        for name, mask in masks.items():
            if int(mask.sum()) != int(self.core.masks[name].sum()):
                raise ValueError(f"{client}: tensor {name!r} keeps {int(mask.sum())} weights, "
                                 f"the global mask {int(self.core.masks[name].sum())}")
        return state, masks
