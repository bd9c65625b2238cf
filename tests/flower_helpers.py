"""Helpers to build Flower Messages outside a running app (tests only)."""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity


def set_identity(node_id: int = 0) -> None:
    # A Message built outside a running app needs a task identity (internal API).
    TaskIdentity.run_id = 1
    TaskIdentity.task_id = 1
    TaskIdentity.node_id = node_id


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
