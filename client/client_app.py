"""Flower ClientApp: wires messages to fedprune.fl.client_core (all logic lives there).

The experiment config travels in every message (ConfigRecord key ``fedprune-config``),
so a client needs nothing but its ``partition-id`` / ``num-partitions`` node config. Query
rounds arrive as message type ``query`` naming their kind (``fedprune-query``) and go to
the configured method's client part, so this app names no method. Injected faults
(``faults`` section, simulation only) are applied to the honest reply last.
"""

from __future__ import annotations

import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedprune.config import from_yaml
from fedprune.fl.client_core import (check_partition, client_evaluate, client_query,
                                     client_train)
from fedprune.fl.faults import inject

app = ClientApp()


def _unpack(msg: Message, context: Context):
    conf = msg.content["config"]
    raw = conf["fedprune-config"]  # UTF-8 YAML bytes (server/records.py)
    cfg = from_yaml(raw.decode() if isinstance(raw, bytes) else str(raw))
    torch.set_num_threads(cfg.sim.torch_threads)
    pid = int(context.node_config["partition-id"])
    check_partition(cfg, pid, int(context.node_config["num-partitions"]))
    payload = {k: v.numpy() for k, v in msg.content["arrays"].items()}
    return cfg, pid, payload, int(conf.get("server-round", 0))


def _reply(msg: Message, cfg, pid: int, server_round: int, arrays: dict, metrics: dict,
           records: dict | None = None) -> Message:
    records = {"arrays": arrays, **(records or {})}
    records, metrics = inject(cfg, pid, server_round, records, {**metrics, "partition-id": pid})
    content = RecordDict({"metrics": MetricRecord(metrics)})
    for key, value in records.items():
        if value:  # a reply with no arrays (e.g. candidate losses) sends no record
            content[key] = ArrayRecord({k: Array(v) for k, v in value.items()})
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, pid, payload, server_round = _unpack(msg, context)
    conf = msg.content["config"]
    plan = None
    if conf.get("fedprune-plan", False):  # the method's plan for this round, and its records
        plan = {k[len("plan."):]: v for k, v in conf.items() if k.startswith("plan.")}
    extras = {k: {n: a.numpy() for n, a in r.items()}
              for k, r in msg.content.array_records.items() if k != "arrays"}
    reply, metrics, records = client_train(cfg, pid, payload, server_round, plan, extras)
    return _reply(msg, cfg, pid, server_round, reply, metrics, records)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, pid, payload, server_round = _unpack(msg, context)
    metrics = client_evaluate(cfg, pid, payload)
    return Message(content=RecordDict({"metrics": MetricRecord({**metrics, "partition-id": pid})}),
                   reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """A method's query round before training (e.g. SNIP scores, BN statistics)."""
    cfg, pid, payload, _ = _unpack(msg, context)
    conf = msg.content["config"]
    config = {k[len("query."):]: v for k, v in conf.items() if k.startswith("query.")}
    arrays, metrics = client_query(cfg, pid, str(conf["fedprune-query"]), payload, config)
    return _reply(msg, cfg, pid, 0, arrays, metrics)
