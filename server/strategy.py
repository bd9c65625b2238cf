"""SparseFedAvg: FedAvg whose messages carry only what the mask keeps.

Down: packed mask bits + kept values (+ dense BN/bias tensors). Up: kept values only.
Each reply is decoded strictly by the Flower-free core; a malformed reply is rejected
with its reason logged and the round continues with the other clients.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedprune.fl.server_core import SparseServer


def record_bytes(record: ArrayRecord) -> int:
    """Serialized size of an ArrayRecord's arrays (what the transport carries)."""
    return sum(len(arr.data) for arr in record.values())


def to_record(arrays: dict) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def to_numpy(record: ArrayRecord) -> dict:
    return {k: v.numpy() for k, v in record.items()}


class SparseFedAvg(FedAvg):
    """FedAvg over the kept positions of a fixed global mask."""

    def __init__(self, core: SparseServer, **kwargs) -> None:
        super().__init__(**kwargs)
        self.core = core
        self.stats: dict[int, dict] = {}  # per round: bytes, clients, failures, seconds

    def _encode(self, arrays: ArrayRecord) -> ArrayRecord:
        return to_record(self.core.encode_down(to_numpy(arrays)))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        payload = self._encode(arrays)
        messages = list(super().configure_train(server_round, payload, config, grid))
        self.stats[server_round] = {"bytes_down_per_client": record_bytes(payload),
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
        accepted = []
        for msg in replies:
            reply = self._accept(msg)
            if reply is None:
                stats["failures"] += 1
                continue
            accepted.append(reply)
            stats["bytes_up"] += reply[3]
            stats["client_seconds"] += float(reply[2].get("compute_seconds", 0.0))
        # Replies arrive in whatever order the clients finish; summing in partition order
        # keeps the aggregate independent of arrival order.
        accepted.sort(key=lambda r: (r[2].get("partition-id", -1), r[4]))
        states = [r[0] for r in accepted]
        weights = [r[1] for r in accepted]
        losses = [float(r[2].get("train_loss", 0.0)) for r in accepted]
        log(INFO, "aggregate_train: %d accepted, %d rejected", len(states), stats["failures"])
        if not states:
            return None, None
        aggregated = self.core.aggregate(states, weights)
        total = float(sum(weights))
        train_loss = sum(w * l for w, l in zip(weights, losses)) / total
        return to_record(aggregated), MetricRecord({"train_loss": train_loss,
                                                    "num-examples": int(total)})

    def _accept(self, msg: Message):
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
        except (KeyError, ValueError, TypeError) as err:  # WireError is a ValueError
            log(WARNING, "rejected reply from node %s: %s", node, err)
            return None
        return state, n, dict(metrics), record_bytes(record), node
