"""Query rounds before training, node availability and quorum, on the Grid.

A method's query rounds (``Method.queries``: SNIP/SynFlow scores, FedTiny's adaptive BN
selection) are driven here: each :class:`~fedprune.methods.Query` goes to every node as a
``query`` message naming its kind, every reply is checked against the query's spec by the
same validation layer as training replies, a round below quorum is sent again up to
``fed.retries`` times, and the checked replies go back to the method. Bytes both ways are
metered for the run records.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from logging import INFO, WARNING

from flwr.app import Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from fedprune.config import ExperimentConfig
from fedprune.fl.replies import Checked, Metric, ReplyError, ReplySpec, examples, validate
from fedprune.methods import Method, Query

from .records import config_record, record_bytes, to_numpy, to_record
from .secure import secure_ask


class QuorumError(RuntimeError):
    """Too few clients answered acceptably (or were available) to go on."""


def quorum(cfg: ExperimentConfig, sampled: int) -> int:
    """Accepted replies a round of ``sampled`` clients needs: fed.quorum of them, >= 1."""
    return max(1, math.ceil(cfg.fed.quorum * sampled - 1e-9))


def base_spec(cfg: ExperimentConfig, sizes: list[int] | None = None) -> ReplySpec:
    """What every reply carries: its partition and an example count bounded by
    ``fed.max_examples`` and, when the server knows them, the partitions' sizes."""
    def within_partition(reply: Checked) -> None:
        if sizes is not None and reply.examples > sizes[reply.partition]:
            raise ReplyError(reply.client, "metrics.num-examples",
                             f"{reply.examples} exceeds partition {reply.partition}'s "
                             f"{sizes[reply.partition]} examples")
    n = cfg.data.num_clients
    return ReplySpec(metrics={"partition-id": Metric("int", low=0, high=n - 1),
                              "num-examples": examples(cfg.fed.max_examples),
                              "peak-rss-mb": Metric("float", low=0.0, required=False)},
                     checks=[within_partition])


def available_nodes(grid: Grid, cfg: ExperimentConfig) -> list[int]:
    """The registered nodes once all ``data.num_clients`` are there, or, after
    ``fed.node_wait`` seconds, those present if at least ``fed.min_train_clients``."""
    deadline = time.time() + cfg.fed.node_wait
    while len(nodes := list(grid.get_node_ids())) < cfg.data.num_clients:
        if time.time() >= deadline:
            if len(nodes) >= cfg.fed.min_train_clients:
                log(WARNING, "only %d of %d nodes registered within fed.node_wait=%ss; "
                    "going on with them", len(nodes), cfg.data.num_clients, cfg.fed.node_wait)
                return nodes
            raise QuorumError(f"only {len(nodes)} of {cfg.data.num_clients} nodes registered "
                              f"within fed.node_wait={cfg.fed.node_wait}s, fewer than "
                              f"fed.min_train_clients={cfg.fed.min_train_clients}")
        time.sleep(0.5)
    return nodes


def run_queries(grid: Grid, method: Method, base: ReplySpec,
                on_query: Callable[[Query, list[Checked], dict], None] | None = None
                ) -> dict | None:
    """Drive ``method.queries()``; return its record with the bytes metered, or None when
    the method has no query rounds. ``base``: what every reply carries (example count,
    partition), merged into each query's spec. ``on_query(query, replies, meter)`` is
    called after each query round (``meter``: that round's bytes, rejections, seconds)."""
    queries = method.queries()
    meter = {"bytes_down": 0, "bytes_up": 0, "rejected": 0}
    try:
        query = next(queries)
        while True:
            start, before = time.time(), dict(meter)
            replies = ask(grid, method.cfg, query, base.merged(query.spec), meter)
            if on_query is not None:
                on_query(query, replies, {**{k: meter[k] - before[k] for k in meter},
                                          "seconds": time.time() - start})
            query = queries.send(replies)
    except StopIteration as done:
        return None if done.value is None else {**done.value, **meter}


def ask(grid: Grid, cfg: ExperimentConfig, query: Query, spec: ReplySpec, meter: dict
        ) -> list[Checked]:
    """Send ``query`` to every available node; the checked replies in partition order."""
    record = to_record(query.arrays)
    for attempt in range(cfg.fed.retries + 1):
        nodes = available_nodes(grid, cfg)
        if query.secure is not None:
            need = quorum(cfg, len(nodes))
            total = secure_ask(grid, cfg, query, spec, meter, nodes, attempt)
            if total is not None and len(total.metrics["contributors"]) >= need:
                return [total]
            got = 0 if total is None else len(total.metrics["contributors"])
            log(WARNING, "query %s: the secure sum holds %d of %d clients, below the quorum "
                "of %d (attempt %d of %d)", query.kind, got, len(nodes), need, attempt + 1,
                cfg.fed.retries + 1)
            continue
        conf = config_record(cfg)
        conf["fedprune-query"] = query.kind
        for key, value in query.config.items():
            conf[f"query.{key}"] = value
        messages = [Message(RecordDict({"arrays": record, "config": conf}),
                            message_type="query", dst_node_id=n) for n in nodes]
        meter["bytes_down"] += len(nodes) * record_bytes(record)
        replies = list(grid.send_and_receive(messages, timeout=cfg.fed.round_timeout))
        checked = [c for c in (_check(m, spec, query.kind, meter) for m in replies) if c]
        need = quorum(cfg, len(nodes))
        if len(checked) >= need:
            log(INFO, "query %s: %d of %d clients accepted", query.kind, len(checked),
                len(nodes))
            return sorted(checked, key=lambda r: (r.partition, r.node))
        log(WARNING, "query %s: %d of %d clients accepted, below the quorum of %d "
            "(attempt %d of %d)", query.kind, len(checked), len(nodes), need, attempt + 1,
            cfg.fed.retries + 1)
    raise QuorumError(f"query round {query.kind!r}: fewer accepted replies than "
                      f"fed.quorum={cfg.fed.quorum} needs in {cfg.fed.retries + 1} attempts")


def check_reply(msg: Message, spec: ReplySpec) -> Checked:
    """One reply checked against ``spec``; a client's error reply, or any field that breaks
    the spec, raises ReplyError naming the client and the field."""
    node = msg.metadata.src_node_id
    client = f"node {node}"
    if msg.has_error():
        raise ReplyError(client, "error", f"the client failed: {msg.error.reason}")
    metrics = msg.content.metric_records.get("metrics")
    if metrics is None:
        raise ReplyError(client, "metrics", "record missing")
    arrays = {k: to_numpy(r) for k, r in msg.content.array_records.items()}
    return validate(arrays, dict(metrics), spec, client, node)


def reply_bytes(msg: Message) -> int:
    return 0 if msg.has_error() else sum(record_bytes(r)
                                         for r in msg.content.array_records.values())


def _check(msg: Message, spec: ReplySpec, kind: str, meter: dict) -> Checked | None:
    meter["bytes_up"] += reply_bytes(msg)
    try:
        return check_reply(msg, spec)
    except ReplyError as err:
        log(WARNING, "query %s: rejected reply from %s: field %s: %s", kind, err.client,
            err.field, err.reason)
        meter["rejected"] += 1
        return None
