"""Helpers to build Flower Messages outside a running app (tests only)."""

from __future__ import annotations

from flwr.app import (Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord,
                      RecordDict)
from flwr.supercore.task_identity import TaskIdentity


def set_identity(node_id: int = 0) -> None:
    # A Message built outside a running app needs a task identity (internal API).
    TaskIdentity.run_id = 1
    TaskIdentity.task_id = 1
    TaskIdentity.node_id = node_id


def node_context(cfg, partition_id: int, num_partitions: int) -> Context:
    """A client's Context as a simulation gives it: its partition, and the node settings
    (data root, cache, trusted files) of the user's own config (fedprune.deploy.node)."""
    from fedprune.deploy.node import own_settings

    return Context(run_id=1, node_id=partition_id + 1, state=RecordDict(), run_config={},
                   node_config={"partition-id": partition_id, "num-partitions": num_partitions,
                                **own_settings(cfg)})


def server_message(dst: int, arrays: dict, config: dict, message_type: str = "train") -> Message:
    set_identity(0)
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "config": ConfigRecord(config)})
    return Message(content=content, message_type=message_type, dst_node_id=dst)


def reply(to: Message, arrays: dict | None, metrics: dict) -> Message:
    set_identity(to.metadata.dst_node_id)
    content = {"metrics": MetricRecord(metrics)}
    if arrays is not None:
        content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    return Message(content=RecordDict(content), reply_to=to)


def error_reply(to: Message, reason: str) -> Message:
    set_identity(to.metadata.dst_node_id)
    return Message(Error(code=0, reason=reason), reply_to=to)


def train_reply(to: Message, arrays: dict | None, examples: object, partition: int = 0,
                **metrics) -> Message:
    """A training reply with the metrics every reply carries (loss 1.0 unless given)."""
    return reply(to, arrays, {"num-examples": examples, "partition-id": partition,
                              "train_loss": 1.0, **metrics})


class FakeGrid:
    """A Grid stand-in for driving strategies and query rounds without Flower's runtime:
    ``answer(message)`` returns the node's reply Message, or None when it does not answer
    (a time-out)."""

    def __init__(self, nodes, answer) -> None:
        set_identity(0)
        self.nodes, self.answer, self.sent = list(nodes), answer, []

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        if messages:  # an evaluation step with fraction_evaluate=0 sends nothing
            self.sent.append(messages)
        replies = [self.answer(m) for m in messages]
        set_identity(0)
        return [r for r in replies if r is not None]


def crash(pid: int) -> list:
    """A crash of the machine for a run: SIGKILL to ``pid`` and every process below it at
    once (no finally, no handler runs). Returns the processes, to wait on."""
    import signal

    import psutil

    tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    for proc in tree:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    return tree
