"""Flower ClientApp: wires messages to fedprune.fl.client_core (all logic lives there).

The experiment config travels in every message (ConfigRecord key ``fedprune-config``),
so a client needs nothing but its ``partition-id`` / ``num-partitions`` node config.
"""

from __future__ import annotations

import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedprune.config import from_yaml
from fedprune.fedtiny.bn_selection import client_bn_stats, client_candidate_losses
from fedprune.fl.client_core import (check_partition, client_evaluate, client_scores,
                                     client_train)

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


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, pid, payload, server_round = _unpack(msg, context)
    conf = msg.content["config"]
    # the round's mask-adjustment plan (FedTiny, PruneFL, FedDST, gates) and its records
    plan = {k: v for k, v in conf.items() if k.startswith("adjust-")}
    extras = {k: {n: a.numpy() for n, a in r.items()}
              for k, r in msg.content.array_records.items() if k != "arrays"}
    reply, metrics, records = client_train(cfg, pid, payload, server_round, plan, extras)
    content = RecordDict({"arrays": _record(reply),
                          "metrics": MetricRecord({**metrics, "partition-id": pid})})
    for key, arrays in records.items():
        content[key] = _record(arrays)
    return Message(content=content, reply_to=msg)


def _record(arrays: dict) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, pid, payload, _ = _unpack(msg, context)
    metrics = client_evaluate(cfg, pid, payload)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@app.query("bn_stats")
def bn_stats(msg: Message, context: Context) -> Message:
    """Adaptive BN selection, round A: BN input statistics of every candidate."""
    cfg, pid, payload, _ = _unpack(msg, context)
    arrays = _record(client_bn_stats(cfg, pid, payload))
    return Message(content=RecordDict({"arrays": arrays,
                                       "metrics": MetricRecord({"partition-id": pid})}),
                   reply_to=msg)


@app.query("candidate_loss")
def candidate_loss(msg: Message, context: Context) -> Message:
    """Adaptive BN selection, round B: local loss of every candidate with pooled BN."""
    cfg, pid, payload, _ = _unpack(msg, context)
    losses, n = client_candidate_losses(cfg, pid, payload)
    metrics = MetricRecord({"losses": losses, "num-examples": n, "partition-id": pid})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


@app.query("scores")
def scores(msg: Message, context: Context) -> Message:
    """Client-scored mask init: SNIP / SynFlow scores (or own mask) of the dense model."""
    cfg, pid, payload, _ = _unpack(msg, context)
    arrays, n = client_scores(cfg, pid, payload)
    return Message(content=RecordDict({"arrays": _record(arrays), "metrics": MetricRecord(
        {"num-examples": n, "partition-id": pid})}), reply_to=msg)
