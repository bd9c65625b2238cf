"""A query round whose replies are summed under Flower's SecAgg+ (the server sees the sum).

Flower's ``SecAggPlusWorkflow`` drives the four SecAgg+ stages (key setup, key shares,
masked vectors, unmasking) on a legacy strategy; here a small strategy hands it the
query (``configure_fit``) and takes the unmasked result back (``aggregate_fit``), and a
grid wrapper meters every stage's bytes and checks each client's clear metrics (its
partition, example count, the query's own metrics) before its masked vector joins the
sum: a client that fails them is left out as if it had dropped (SecAgg+ then removes its
pairwise masks from the others' vectors). What the server sees per client: its window
count, its metrics, and how many entries it clipped; the arrays only as their sum.
Under secure aggregation the server cannot check a single client's arrays: the sum is
checked against the query's spec, and a bad sum fails the round naming no client.
"""

from __future__ import annotations

from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, log, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from fedprune.config import ExperimentConfig
from fedprune.fl.replies import (Checked, ReplyError, ReplySpec, check_metrics, examples,
                                 validate)
from fedprune.fl.oneshot import example_bound
from fedprune.fl.secure import SecureSum

from .records import config_record


def secure_ask(grid: Grid, cfg: ExperimentConfig, query, spec: ReplySpec, meter: dict,
               nodes: list[int], attempt: int) -> Checked | None:
    """One SecAgg+ round of ``query`` over ``nodes``: the checked sum (as one reply whose
    metrics name its contributors), or None when too few clients got through. ``spec``:
    every reply's spec merged with the query's; its metrics are checked per client, the
    query's own records and checks on the sum."""
    secure: SecureSum = query.secure
    arrays = {**query.arrays, **secure.scale_arrays()}
    names = sorted(arrays)
    conf = {**config_record(cfg), "fedprune-query": query.kind, "secure": secure.to_json(),
            "payload-names": "\n".join(names)}
    conf.update({f"query.{k}": v for k, v in query.config.items()})
    ins = FitIns(ndarrays_to_parameters([arrays[n] for n in names]), conf)
    strategy = _Strategy(grid, nodes, ins)
    # a client's clear metrics: those every reply carries and the query's own; its example
    # count weighs its vector, so it may not exceed what a client calibrates on
    metrics = {**spec.metrics, "num-examples": examples(example_bound(cfg))}
    checking = _CheckingGrid(grid, metrics, meter, query.kind)
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(),
                                    run_config={}), strategy=strategy)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: attempt})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    s = cfg.secagg
    workflow = SecAggPlusWorkflow(
        num_shares=float(s.shares), reconstruction_threshold=float(s.threshold),
        max_weight=float(example_bound(cfg)), clipping_range=1.0,
        quantization_range=2 ** s.quant_bits, modulus_range=2 ** s.modulus_bits,
        timeout=cfg.fed.round_timeout)
    workflow(checking, context)
    if strategy.result is None:
        return None
    accepted = checking.accepted
    total = sum(m["num-examples"] for m in accepted.values())
    sums = secure.decode(strategy.result, total)
    arrays = {n: np.asarray(v, dtype=np.float64) for n, v in sums.items()}
    arrays.update({n: np.array(c * total, dtype=np.int64) for n, c in query.counts.items()})
    try:
        reply = validate({"arrays": arrays}, {"num-examples": total},
                         ReplySpec(records=query.spec.records,
                                   checks=query.spec.checks),
                         f"the secure sum of {len(accepted)} clients")
    except ReplyError as err:
        raise ReplyError(err.client, err.field, f"{err.reason} (under secure aggregation "
                         f"the server cannot tell which client caused it)") from None
    reply.metrics["contributors"] = sorted(m["partition-id"] for m in accepted.values())
    reply.metrics["clipped"] = sum(int(m.get("secagg-clipped", 0)) for m in accepted.values())
    reply.metrics["peak-rss-mb"] = max((float(m.get("peak-rss-mb", 0.0))
                                        for m in accepted.values()), default=0.0)
    log(INFO, "query %s: secure sum of %d clients (%d entries clipped)", query.kind,
        len(accepted), reply.metrics["clipped"])
    return reply


class _Strategy(Strategy):
    """The legacy strategy SecAggPlusWorkflow drives: our query in, the sum out."""

    def __init__(self, grid: Grid, nodes: list[int], ins: FitIns) -> None:
        self.grid, self.nodes, self.ins = grid, nodes, ins
        self.result: list[np.ndarray] | None = None

    def configure_fit(self, server_round, parameters, client_manager):
        # the workflow only reads the proxies' node ids; it sends through the grid itself
        return [(GridClientProxy(n, self.grid, 0), self.ins) for n in self.nodes]

    def aggregate_fit(self, server_round, results, failures):
        if results:  # every result carries the unmasked aggregate
            self.result = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class _CheckingGrid:
    """The run's grid, metering bytes and checking each masked-vector reply's metrics."""

    def __init__(self, grid: Grid, metrics: dict, meter: dict, kind: str) -> None:
        self.grid, self.metrics, self.meter, self.kind = grid, metrics, meter, kind
        self.accepted: dict[int, dict] = {}  # node -> checked metrics

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.meter["bytes_down"] += sum(content_bytes(m.content) for m in messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        kept = []
        for msg in replies:
            if not msg.has_error():
                self.meter["bytes_up"] += content_bytes(msg.content)
            if self._accept(msg):
                kept.append(msg)
        return kept

    def _accept(self, msg: Message) -> bool:
        node = msg.metadata.src_node_id
        if msg.has_error():
            log(WARNING, "query %s (secure): node %s failed: %s", self.kind, node,
                msg.error.reason)
            return True  # the workflow counts it as dropped
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS, {})
        if Key.MASKED_PARAMETERS not in configs:
            return True  # a key-exchange stage: nothing of ours to check
        metrics = dict(compat.recorddict_to_fitres(msg.content, keep_input=True).metrics)
        try:
            self.accepted[node] = check_metrics(metrics, self.metrics, f"node {node}")
            return True
        except ReplyError as err:
            log(WARNING, "query %s (secure): rejected node %s: field %s: %s; its vector "
                "is left out of the sum", self.kind, node, err.field, err.reason)
            self.meter["rejected"] += 1
            return False


def content_bytes(content: RecordDict) -> int:
    """What a message carries: array data plus the bytes/str values of its configs."""
    total = sum(len(a.data) for r in content.array_records.values() for a in r.values())
    for record in content.config_records.values():
        for value in record.values():
            items = value if isinstance(value, list) else [value]
            total += sum(len(v) for v in items if isinstance(v, (bytes, str)))
    return total

