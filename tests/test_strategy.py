"""SparseFedAvg on hand-built replies: exact aggregation, one validation layer rejecting every
bad-input class with client, field and reason, quorum and retries, time-outs counted as
failures, robust aggregation against a poisoned client."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fedprune.config import load_config
from fedprune.fl.faults import GARBAGE, corrupt
from fedprune.fl.server_core import SparseServer
from fedprune.masks import wire
from fedprune.methods import method_class
from server.experiment import make_strategy
from server.strategy import QuorumError, record_bytes, to_record
from flower_helpers import FakeGrid, error_reply, reply, server_message, train_reply

BASE = ["model.width=2", "mask.density=0.3", "data.num_clients=3", "fed.quorum=0"]


def _setup(*extra, sizes=None):
    cfg = load_config("default", [*BASE, *extra])
    core = SparseServer(cfg)
    method = method_class(cfg.method.name)(cfg, core)
    return core, make_strategy(cfg, core, method, sizes)


@pytest.fixture()
def setup():
    return _setup()


def _client_state(core, seed):
    """A plausible client result: random values at kept positions, zeros elsewhere."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, value in core.state.items():
        if np.issubdtype(value.dtype, np.integer):
            out[name] = np.array(seed, dtype=value.dtype).reshape(value.shape)
            continue
        v = rng.normal(size=value.shape).astype(value.dtype)
        kept = core.masks.get(name)
        out[name] = v if kept is None else np.where(kept, v, 0).astype(value.dtype)
    return out


def test_aggregation_matches_independent_weighted_mean(setup):
    core, strategy = setup
    a, b = _client_state(core, 1), _client_state(core, 2)
    msgs = [server_message(11, {}, {}), server_message(12, {}, {})]
    replies = [train_reply(msgs[0], wire.encode_up(a, core.masks), 1, 0),
               train_reply(msgs[1], wire.encode_up(b, core.masks), 3, 1)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["num-examples"] == 4
    for name, value in core.state.items():
        got = arrays[name].numpy()
        if np.issubdtype(value.dtype, np.integer):
            assert got == 1  # counters: median of (1, 2) rounded down
            continue
        expected = (a[name].astype(np.float64) * 1 + b[name].astype(np.float64) * 3) / 4
        np.testing.assert_allclose(got, expected.astype(value.dtype), rtol=0, atol=1e-7)
        if name in core.masks:
            assert np.all(got[~core.masks[name]] == 0)
    # only kept values travelled up: fewer bytes than two dense states, serialized alike
    assert strategy.stats[1]["bytes_up"] < record_bytes(to_record(a)) + record_bytes(to_record(b))


# ----------------------------------------------------------------------------- bad inputs


def _honest(core, msg, pid=0, n=5):
    return {"arrays": wire.encode_up(_client_state(core, 7), core.masks)}, {
        "num-examples": n, "partition-id": pid, "train_loss": 1.0}


def _as_message(msg, records, metrics):
    out = reply(msg, None, metrics)
    for key, arrays in records.items():
        out.content[key] = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
    return out


def _bad_cases(core):
    """(name, field that must be named, records, metrics) for each bad-input class."""
    name = next(iter(core.masks))
    dense = next(n for n, v in core.state.items()
                 if n not in core.masks and v.dtype.kind == "f")
    cases = []
    for which in GARBAGE:  # the injected classes of fedprune.fl.faults
        records, metrics = corrupt(*_honest(core, None), which)
        cases.append((which, records, metrics))
    records, metrics = _honest(core, None)
    records["arrays"][f"dense/{dense}"] = records["arrays"][f"dense/{dense}"].copy()
    records["arrays"][f"dense/{dense}"].reshape(-1)[0] = np.nan
    cases.append(("nan_in_dense_tensor", records, metrics))
    for label, bad in (("inf_examples", float("inf")), ("vector_examples", [3, 4]),
                       ("zero_examples", 0), ("vector_loss", [0.5, 0.5])):
        records, metrics = _honest(core, None)
        key = "train_loss" if "loss" in label else "num-examples"
        metrics[key] = bad
        cases.append((label, records, metrics))
    records, metrics = _honest(core, None)
    records["stray"] = {"x": np.zeros(2, np.float32)}
    cases.append(("unexpected_record", records, metrics))
    records, metrics = _honest(core, None)
    records["arrays"][f"value/{name}"] = records["arrays"][f"value/{name}"][:-1]
    cases.append(("one_value_short", records, metrics))
    return cases


def test_every_bad_input_class_is_rejected_with_its_reason_and_the_round_goes_on(caplog):
    core, strategy = _setup("data.num_clients=40")
    cases = _bad_cases(core)
    good = _client_state(core, 1)
    msgs = [server_message(i + 1, {}, {}) for i in range(len(cases) + 2)]
    replies = [train_reply(msgs[0], wire.encode_up(good, core.masks), 5, 0)]
    replies += [_as_message(m, r, x) for m, (_, r, x) in zip(msgs[1:], cases)]
    replies.append(error_reply(msgs[-1], "client crashed"))
    with caplog.at_level(logging.WARNING):
        arrays, _ = strategy.aggregate_train(3, replies)
    stats = strategy.stats[3]
    assert stats["accepted"] == 1 and stats["rejected"] == len(cases) + 1
    rejections = [r.getMessage() for r in caplog.records if "rejected reply" in r.getMessage()]
    assert len(rejections) == len(cases) + 1
    assert all("field" in r for r in rejections) and "client crashed" in caplog.text
    for k, v in good.items():  # the one good reply alone is the aggregate
        if not np.issubdtype(v.dtype, np.integer):
            np.testing.assert_array_equal(arrays[k].numpy(), v)
            assert np.isfinite(arrays[k].numpy()).all()


def test_example_count_is_bounded_by_the_partition_size(caplog):
    core, strategy = _setup(sizes=[10, 20, 30])
    state = _client_state(core, 1)
    msgs = [server_message(i, {}, {}) for i in (1, 2)]
    replies = [train_reply(msgs[0], wire.encode_up(state, core.masks), 10, 0),
               train_reply(msgs[1], wire.encode_up(state, core.masks), 21, 1)]  # claims 21/20
    with caplog.at_level(logging.WARNING):
        strategy.aggregate_train(1, replies)
    assert strategy.stats[1]["accepted"] == 1
    assert "exceeds partition 1's 20 examples" in caplog.text


def test_all_rejected_keeps_previous_model(setup):
    _, strategy = setup
    msg = server_message(5, {}, {})
    assert strategy.aggregate_train(1, [error_reply(msg, "x")]) == (None, None)


# ----------------------------------------------------------------------------- quorum


def _grid(core, answer_for):
    """Nodes 1..3 (partitions 0..2); ``answer_for(pid, attempt)`` -> "ok", "bad" or None."""
    calls = {}

    def answer(msg):
        node = msg.metadata.dst_node_id
        pid = node - 1
        calls[pid] = calls.get(pid, -1) + 1
        kind = answer_for(pid, calls[pid])
        if kind is None:
            return None  # no answer within the time-out
        state = _client_state(core, pid)
        return train_reply(msg, wire.encode_up(state, core.masks),
                           5 if kind == "ok" else -1, pid)
    return FakeGrid([1, 2, 3], answer)


def test_below_quorum_the_round_is_sent_again_then_the_run_stops():
    core, strategy = _setup("fed.quorum=0.6", "fed.retries=2", "fed.rounds=1")
    # attempt 0: one good, one bad, one silent (1/3 < 0.6); attempt 1: all good
    grid = _grid(core, lambda pid, attempt: "ok" if attempt or pid == 0
                 else ("bad" if pid == 1 else None))
    result = strategy.start(grid, to_record(core.state), num_rounds=1)
    stats = strategy.stats[1]
    assert len(grid.sent) == 2 and stats["retries"] == 1 and stats["accepted"] == 3
    assert result.arrays is not None
    # never enough: the run stops with the reason after 1 + retries attempts
    core, strategy = _setup("fed.quorum=0.6", "fed.retries=1", "fed.rounds=1")
    grid = _grid(core, lambda pid, attempt: "ok" if pid == 0 else None)
    with pytest.raises(QuorumError, match=r"fed.quorum=0.6.*1 of 3.*2 attempts"):
        strategy.start(grid, to_record(core.state), num_rounds=1)


def test_clients_that_time_out_are_failures_not_accepted():
    core, strategy = _setup("fed.quorum=0.3", "fed.rounds=1")
    grid = _grid(core, lambda pid, attempt: None if pid == 2 else "ok")
    strategy.start(grid, to_record(core.state), num_rounds=1)
    stats = strategy.stats[1]
    assert stats["clients"] == 3 and stats["accepted"] == 2
    assert stats["timed_out"] == 1 and stats["failures"] == 1


# ----------------------------------------------------------------------------- robust rules


def test_median_ignores_a_poisoned_client_the_mean_moves_by_the_hand_computed_amount():
    for rule in ("mean", "median", "trimmed_mean"):
        core, strategy = _setup(f"fed.aggregation={rule}", "fed.trim=0.25",
                                "data.num_clients=4")
        name = next(iter(core.masks))
        states = [_client_state(core, s) for s in (1, 2, 3, 4)]
        for s in states[:3]:  # three honest clients agree on the kept values
            s[name] = states[0][name].copy()
        poisoned = states[3]
        poisoned[name] = np.where(core.masks[name], 1e3, 0).astype(np.float32)
        replies = [train_reply(server_message(i + 1, {}, {}),
                               wire.encode_up(s, core.masks), 5, i)
                   for i, s in enumerate(states)]
        arrays, _ = strategy.aggregate_train(1, replies)
        got = arrays[name].numpy()[core.masks[name]]
        honest_value = states[0][name][core.masks[name]]
        if rule == "mean":  # (3 h + 1000) / 4: moved by (1000 - h) / 4 exactly
            np.testing.assert_allclose(got - honest_value, (1e3 - honest_value) / 4, rtol=1e-5)
        else:  # median / trimmed mean of (h, h, h, 1000): exactly h
            np.testing.assert_array_equal(got, honest_value)


def test_down_payload_is_packed_mask_plus_kept_values(setup):
    core, strategy = setup
    grid = FakeGrid([1, 2, 3], lambda m: None)
    msgs = strategy.configure_train(1, to_record(core.state), load_record(), grid)
    payload = msgs[0].content["arrays"]
    kept = sum(int(m.sum()) for m in core.masks.values())
    total = sum(m.size for m in core.masks.values())
    values = sum(payload[f"value/{n}"].numpy().size for n in core.masks)
    assert values == kept
    assert sum(payload[f"mask/{n}"].numpy().size for n in core.masks) == sum(
        -(-m.size // 8) for m in core.masks.values())
    assert record_bytes(payload) < record_bytes(to_record(core.state))
    assert kept < total
    assert len(msgs) == 3 and msgs[0].content["config"]["fedprune-plan"] is False


def load_record():
    from flwr.app import ConfigRecord

    return ConfigRecord({})


def test_fedtiny_topk_replies_are_checked_and_aggregated(caplog):
    """Top-K replies: out-of-range, over-K or NaN ones are rejected; the rest move one layer."""
    core, strategy = _setup("method.name=fedtiny", "method.delta_r=1", "fed.rounds=4",
                            "method.r_end=4", "data.num_clients=4")
    plan = strategy.plans[1] = strategy.method.plan(1)
    [layer], [k] = plan.config["layers"], plan.config["ks"]
    assert layer == next(iter(core.masks)) and k > 0
    mask = core.masks[layer]
    pruned = np.flatnonzero(~mask.reshape(-1))
    good = wire.encode_sparse({layer: (pruned[:k], np.linspace(1, 2, k, dtype=np.float32))})
    too_many = wire.encode_sparse({layer: (pruned[:k + 1], np.ones(k + 1, np.float32))})
    out_of_range = {f"index/{layer}": np.array([mask.size], np.int32),
                    f"value/{layer}": np.ones(1, np.float32)}
    nan = wire.encode_sparse({layer: (pruned[:1], np.ones(1, np.float32))})
    nan[f"value/{layer}"] = np.array([np.nan], np.float32)
    state = _client_state(core, 1)
    replies = []
    for i, topk in enumerate((good, too_many, out_of_range, nan)):
        r = train_reply(server_message(31 + i, {}, {}), wire.encode_up(state, core.masks), 4, i)
        r.content["fedtiny"] = ArrayRecord({key: Array(v) for key, v in topk.items()})
        replies.append(r)
    before = core.masks[layer].copy()
    with caplog.at_level(logging.WARNING):
        strategy.aggregate_train(1, replies)
    assert strategy.stats[1]["failures"] == 3 and "K=" in caplog.text and layer in caplog.text
    assert "non-finite" in caplog.text
    after = core.masks[layer]
    assert int(after.sum()) == int(before.sum())
    grown = np.flatnonzero(after.reshape(-1) & ~before.reshape(-1))
    assert set(grown) == set(pruned[:k].tolist())  # exactly the good reply's positions grew
