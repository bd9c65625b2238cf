"""Flower ClientApp: wires messages to fedprune.fl.client_core (all logic lives there).

The experiment config travels in every message (ConfigRecord key ``fedprune-config``),
so a client needs nothing but its ``partition-id`` / ``num-partitions`` node config; the
settings a node owns (data root, cache, device, threads, trusted paths) come from its
node config or environment, never from the server (``fedprune.deploy.node.localize``). Query
rounds arrive as message type ``query`` naming their kind (``fedprune-query``) and go to
the configured method's client part, so this app names no method. Injected faults
(``faults`` section, simulation only) are applied to the honest reply last.

Secure aggregation (``secagg``): the server's SecAgg+ stages arrive as ``train``
messages carrying Flower's ``secaggplus`` config record; ``secure_mod`` hands exactly
those to Flower's ``secaggplus_mod``, whose masked-vector stage calls ``secure_answer``:
the method's answer to the query, encoded by ``fedprune.fl.secure.SecureSum``. Every
other message passes untouched. Faults are not injected under secure aggregation.
"""

from __future__ import annotations

import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from fedprune.config import from_yaml
from fedprune.deploy.node import localize
from fedprune.fl.client_core import (check_partition, client_evaluate, client_query,
                                     client_train)
from fedprune.fl.faults import inject
from fedprune.fl.secure import SCALE_PREFIX, SecureSum


def secure_answer(msg: Message, context: Context) -> Message:
    """SecAgg+'s masked-vector stage: answer the query, return the encoded vector."""
    ins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    conf = ins.config
    cfg = localize(from_yaml(bytes(conf["fedprune-config"]).decode()), context.node_config)
    torch.set_num_threads(cfg.sim.torch_threads)
    pid = int(context.node_config["partition-id"])
    check_partition(cfg, pid, int(context.node_config["num-partitions"]))
    names = [n for n in str(conf["payload-names"]).split("\n") if n]
    received = dict(zip(names, parameters_to_ndarrays(ins.parameters)))
    layout = SecureSum.from_json(str(conf["secure"]), received)
    payload = {k: v for k, v in received.items() if not k.startswith(SCALE_PREFIX)}
    config = {k[len("query."):]: v for k, v in conf.items() if k.startswith("query.")}
    arrays, metrics = client_query(cfg, pid, str(conf["fedprune-query"]), payload, config)
    examples = int(metrics["num-examples"])
    vector, clipped = layout.encode(arrays, examples)
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(vector), examples,
                 {**metrics, "partition-id": pid, "secagg-clipped": clipped})
    return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)


def secure_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's SecAgg+ for the stages of a secure query round; all else passes."""
    if msg.metadata.message_type == MessageType.TRAIN and \
            RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, secure_answer)
    return call_next(msg, context)


app = ClientApp(mods=[secure_mod])


def _unpack(msg: Message, context: Context):
    conf = msg.content["config"]
    raw = conf["fedprune-config"]  # UTF-8 YAML bytes (server/records.py)
    cfg = localize(from_yaml(raw.decode() if isinstance(raw, bytes) else str(raw)),
                   context.node_config)
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
