"""SparseFedAvg: FedAvg whose messages carry only what the mask keeps.

Down: packed mask bits + kept values (+ dense BN/bias tensors). Up: kept values only.
Each reply is decoded strictly by the Flower-free core; a malformed reply is rejected
with its reason logged and the round continues with the other clients.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedprune.fedtiny.progressive import Schedule
from fedprune.fl.server_core import SparseServer
from fedprune.masks import wire


def record_bytes(record: ArrayRecord) -> int:
    """Serialized size of an ArrayRecord's arrays (what the transport carries)."""
    return sum(len(arr.data) for arr in record.values())


def to_record(arrays: dict) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def to_numpy(record: ArrayRecord) -> dict:
    return {k: v.numpy() for k, v in record.items()}


@dataclass
class _Reply:
    state: dict
    examples: int
    metrics: dict
    nbytes: int
    node: int
    topk: tuple | None = None  # FedTiny: (indices, values) of the scheduled layer


class SparseFedAvg(FedAvg):
    """FedAvg over the kept positions of the global mask; with a FedTiny ``schedule``,
    one layer's mask moves every delta_r rounds (progressive pruning)."""

    def __init__(self, core: SparseServer, schedule: Schedule | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.core = core
        self.schedule = schedule
        self.adjust: dict[int, tuple[str, int]] = {}  # round -> (layer, K)
        self.stats: dict[int, dict] = {}  # per round: bytes, clients, failures, seconds

    def _encode(self, arrays: ArrayRecord) -> ArrayRecord:
        return to_record(self.core.encode_down(to_numpy(arrays)))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        payload = self._encode(arrays)
        config["fedtiny-layer"], config["fedtiny-k"] = self._schedule(server_round)
        messages = list(super().configure_train(server_round, payload, config, grid))
        self.stats[server_round] = {"bytes_down_per_client": record_bytes(payload),
                                    "clients": len(messages), "failures": 0,
                                    "bytes_up": 0, "client_seconds": 0.0}
        return messages

    def _schedule(self, server_round: int) -> tuple[str, int]:
        """The layer (in model order, cycling) and K this round adjusts, or ("", 0)."""
        if self.schedule is None or not self.schedule.adjusts(server_round):
            return "", 0
        names = list(self.core.masks)
        layer = names[(server_round // self.schedule.delta_r - 1) % len(names)]
        mask = self.core.masks[layer]
        k = self.schedule.k(server_round, int(mask.sum()), int(mask.size - mask.sum()))
        if k == 0:
            return "", 0
        self.adjust[server_round] = (layer, k)
        return layer, k

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
        adjust = self.adjust.get(server_round)
        accepted = []
        for msg in replies:
            reply = self._accept(msg, adjust)
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
        aggregated = self.core.aggregate([r.state for r in accepted], weights)
        if adjust is not None:
            aggregated = self._prune_and_grow(adjust, accepted, aggregated, stats)
        total = float(sum(weights))
        train_loss = sum(r.examples * float(r.metrics.get("train_loss", 0.0))
                         for r in accepted) / total
        return to_record(aggregated), MetricRecord({"train_loss": train_loss,
                                                    "num-examples": int(total)})

    def _prune_and_grow(self, adjust: tuple[str, int], accepted: list[_Reply],
                        state: dict, stats: dict) -> dict:
        """FedTiny's server step on the scheduled layer (see SparseServer.prune_and_grow)."""
        sparse = [(r.topk[0], r.topk[1], r.examples) for r in accepted if r.topk is not None]
        if not sparse:
            return state
        stats.update(adjusted_layer=adjust[0], adjusted_k=adjust[1])
        return self.core.prune_and_grow(adjust[0], adjust[1], sparse, state)

    def _accept(self, msg: Message, adjust: tuple[str, int] | None) -> _Reply | None:
        """Decode one reply, or log why it is rejected and return None."""
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
            state = self.core.decode_reply(to_numpy(record), client)
            reply = _Reply(state, n, dict(metrics), record_bytes(record), node)
            if adjust is not None and "fedtiny" in msg.content.array_records:
                reply.topk = self._decode_topk(msg.content["fedtiny"], adjust, client)
                reply.nbytes += record_bytes(msg.content["fedtiny"])
        except (KeyError, ValueError, TypeError) as err:  # WireError is a ValueError
            log(WARNING, "rejected reply from node %s: %s", node, err)
            return None
        return reply

    def _decode_topk(self, record: ArrayRecord, adjust: tuple[str, int], client: str):
        layer, k = adjust
        shape = self.core.masks[layer].shape
        decoded = wire.decode_sparse(to_numpy(record), {layer: (shape, np.float32)}, client)
        index, value = decoded[layer]
        if len(index) > k:
            raise ValueError(f"{client}: tensor {layer!r}: {len(index)} top-K entries, K={k}")
        return index, value
