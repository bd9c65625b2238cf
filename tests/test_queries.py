"""Query rounds before training (SNIP/SynFlow scores, FedTiny's adaptive BN selection)
through the real ClientApp and the real query runner: bad replies of every kind are
rejected with client, field and reason, and never decide the outcome."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from client.client_app import app as client_app
from fedprune.config import load_config
from fedprune.fl.server_core import SparseServer
from fedprune.methods import method_class
from server.experiment import make_strategy
from server.query import QuorumError, run_queries
from flower_helpers import FakeGrid, node_context, set_identity

BASE = ["data.num_clients=4", "data.train_subset=400", "data.partitioner=iid",
        "model.width=2", "mask.density=0.2", "fed.quorum=0.25", "train.eval_batch_size=50"]


def _run(overrides, tamper):
    """Query rounds of ``overrides``' method on 4 real clients; ``tamper(kind, pid, metrics,
    arrays)`` may change a reply (in place) before it reaches the server."""
    cfg = load_config("default", [*BASE, *overrides])
    core = SparseServer(cfg)
    method = method_class(cfg.method.name)(cfg, core)
    strategy = make_strategy(cfg, core, method)

    def answer(msg: Message):
        pid = msg.metadata.dst_node_id - 1
        set_identity(msg.metadata.dst_node_id)
        out = client_app(msg, node_context(cfg, pid, 4))
        metrics = dict(out.content["metrics"])
        arrays = {k: {n: a.numpy() for n, a in r.items()}
                  for k, r in out.content.array_records.items()}
        tamper(str(msg.content["config"]["fedprune-query"]), pid, metrics, arrays)
        content = RecordDict({"metrics": MetricRecord(metrics)})
        for key, value in arrays.items():
            content[key] = ArrayRecord({k: Array(v) for k, v in value.items()})
        return Message(content=content, reply_to=msg)

    record = run_queries(FakeGrid([1, 2, 3, 4], answer), method, strategy.base_spec())
    return core, record


def test_snip_scores_bad_replies_are_rejected_and_do_not_choose_the_mask(data_root, caplog):
    def tamper(kind, pid, metrics, arrays):
        scores = arrays["arrays"]
        first = next(iter(scores))
        if pid == 1:
            scores[first] = scores[first].copy()
            scores[first].reshape(-1)[0] = np.nan  # NaN score
        elif pid == 2:
            scores[first] = -scores[first] - 1.0  # negative scores
        elif pid == 3:
            metrics["num-examples"] = -3  # used to abort the run
    with caplog.at_level(logging.WARNING):
        core, record = _run(["method.name=snip"], tamper)
    assert record["clients"] == 1 and record["rejected"] == 3
    for needle in ("non-finite", "below the minimum 0.0", "metrics.num-examples"):
        assert needle in caplog.text, needle
    # the mask is exactly client 0's own top-k (its scores alone)
    alone, _ = _run(["method.name=snip", "fed.quorum=0"],
                    lambda kind, pid, m, a: m.update({"num-examples": -1}) if pid else None)
    for name, mask in core.masks.items():
        np.testing.assert_array_equal(mask, alone.masks[name])


def test_bn_selection_rejects_bad_statistics_and_losses(data_root, caplog):
    def tamper(kind, pid, metrics, arrays):
        if kind == "bn_stats":
            stats = arrays["arrays"]
            if pid == 1:  # a NaN variance
                key = next(k for k in stats if k.endswith("/var"))
                stats[key] = stats[key].copy()
                stats[key][0] = np.nan
            elif pid == 2:  # a count that is not examples x positions
                key = next(k for k in stats if k.endswith("/count"))
                stats[key] = np.array(int(stats[key]) + 1, np.int64)
            elif pid == 3:  # a count sent as a vector (used to abort the run)
                key = next(k for k in stats if k.endswith("/count"))
                stats[key] = np.array([1, 2], np.int64)
        elif kind == "candidate_loss" and pid == 0:
            metrics["losses"] = [float("nan")] + metrics["losses"][1:]  # used to win
    with caplog.at_level(logging.WARNING):
        core, record = _run(["method.name=fedtiny", "method.candidates=3"], tamper)
    assert record["clients_stats"] == 1 and record["clients_losses"] == 3
    assert record["rejected"] == 4
    for needle in ("non-finite", "positions", "shape (2,), expected ()", "losses[0]"):
        assert needle in caplog.text, needle
    assert all(np.isfinite(w) for w in record["weighted_losses"])
    assert record["chosen"] == record["candidates"][int(np.argmin(record["weighted_losses"]))]


def test_a_query_round_below_quorum_stops_with_the_reason(data_root):
    def tamper(kind, pid, metrics, arrays):
        metrics["num-examples"] = 0
    with pytest.raises(QuorumError, match="query round 'scores'"):
        _run(["method.name=snip", "fed.retries=1"], tamper)


@pytest.mark.parametrize("planted,unsure,confident,chosen", [
    # candidates: uniform, erk, global_magnitude; global_magnitude wins by 0.1 on every
    # client: an established margin, kept under either setting
    ([[1.0, 1.0, 0.9], [2.0, 2.0, 1.9], [1.5, 1.5, 1.4], [1.2, 1.2, 1.1]], "init", True,
     "global_magnitude"),
    # uniform wins on the weighted mean, but two clients prefer erk: not established
    ([[1.0, 1.2, 2.0], [2.0, 1.9, 3.0], [1.5, 1.7, 2.0], [1.2, 1.1, 2.0]], "init", False,
     "erk"),
    ([[1.0, 1.2, 2.0], [2.0, 1.9, 3.0], [1.5, 1.7, 2.0], [1.2, 1.1, 2.0]], "pick", False,
     "uniform")])
def test_bn_selection_margin_over_clients_and_the_unsure_fallback(data_root, planted, unsure,
                                                                  confident, chosen):
    def tamper(kind, pid, metrics, arrays):
        if kind == "candidate_loss":
            metrics["losses"] = planted[pid]
    _, record = _run(["method.name=fedtiny", "method.candidates=3", "method.init=erk",
                      f"method.unsure={unsure}"], tamper)
    margin = record["margin"]
    assert margin["confident"] is confident and margin["clients"] == 4
    if confident:  # rival - best = 0.1 on every client: zero spread
        assert margin["margin"] == pytest.approx(0.1) and margin["low"] == pytest.approx(0.1)
    else:  # erk - uniform per client: 0.2, -0.1, 0.2, -0.1, weighted by the clients'
        # examples: exactly the difference of the weighted losses, and contains zero
        weighted = record["weighted_losses"]
        assert margin["rival"] == 1
        assert margin["margin"] == pytest.approx(weighted[1] - weighted[0])
        assert 0 < margin["margin"] < 0.2 and margin["low"] < 0 < margin["high"]
    assert record["chosen"] == chosen
    assert ("fallback" in record) == (unsure == "init" and not confident)


@pytest.mark.parametrize("select_on,chosen", [("loss", "uniform"), ("error", "erk")])
def test_bn_selection_on_error_picks_the_most_accurate_candidate(data_root, caplog, select_on,
                                                                 chosen):
    """uniform has the lowest loss (near ln 10: it predicts nothing) but the highest error;
    erk is the most accurate by 0.1 on every client. An error above 1 is rejected."""
    losses = [2.30, 2.40, 2.50]
    errors = [0.90, 0.70, 0.80]

    def tamper(kind, pid, metrics, arrays):
        if kind == "candidate_loss":
            metrics["losses"] = losses
            metrics["errors"] = [1.5, 0.0, 0.0] if pid == 3 else errors
    with caplog.at_level(logging.WARNING):
        _, record = _run(["method.name=fedtiny", "method.candidates=3",
                          f"method.select_on={select_on}"], tamper)
    assert "errors[0]" in caplog.text and "above the maximum 1.0" in caplog.text
    assert record["clients_losses"] == 3 and record["select_on"] == select_on
    assert record["weighted_errors"] == pytest.approx(errors)
    assert record["client_errors"] == [errors] * 3
    assert record["chosen"] == chosen
    margin = record["margin"]  # over the runner-up by the signal chosen on
    assert margin["margin"] == pytest.approx(0.1) and margin["confident"]
    assert record["candidates"][margin["rival"]] == ("erk" if select_on == "loss"
                                                     else "global_magnitude")
