"""Query rounds on the Grid: one message per node, replies with errors logged and dropped.

Used before training by adaptive BN selection (FedTiny) and client-scored mask inits
(SNIP, SynFlow); bytes both ways are metered for the run records.
"""

from __future__ import annotations

import time
from logging import WARNING

from flwr.app import Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from fedprune.config import ExperimentConfig

from .records import config_record, record_bytes, to_record


def wait_for_nodes(grid: Grid, count: int) -> list[int]:
    """The node ids once ``count`` nodes have registered."""
    while len(nodes := list(grid.get_node_ids())) < count:  # registration can lag
        time.sleep(1)
    return nodes


def ask(grid: Grid, cfg: ExperimentConfig, nodes: list[int], kind: str, arrays: dict,
        meter: dict) -> list[Message]:
    """Send ``arrays`` to every node as ``query.<kind>``; the replies without errors."""
    record = to_record(arrays)
    conf = config_record(cfg)
    messages = [Message(RecordDict({"arrays": record, "config": conf}),
                        message_type=f"query.{kind}", dst_node_id=n) for n in nodes]
    meter["bytes_down"] += len(nodes) * record_bytes(record)
    replies = list(grid.send_and_receive(messages, timeout=cfg.fed.round_timeout))
    ok = []
    for msg in replies:
        if msg.has_error():
            log(WARNING, "%s: node %s failed: %s", kind, msg.metadata.src_node_id,
                msg.error.reason)
            continue
        if "arrays" in msg.content.array_records:
            meter["bytes_up"] += record_bytes(msg.content["arrays"])
        ok.append(msg)
    return ok
