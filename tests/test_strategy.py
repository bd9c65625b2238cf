"""SparseFedAvg on hand-built replies: exact aggregation, strict rejection, byte counts."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from fedprune.config import load_config
from fedprune.fl.server_core import SparseServer
from fedprune.masks import wire
from server.strategy import SparseFedAvg, record_bytes
from flower_helpers import error_reply, reply, server_message


@pytest.fixture()
def core():
    cfg = load_config("default", ["model.width=2", "mask.density=0.3", "data.num_clients=3"])
    return SparseServer(cfg)


def _client_state(core, seed):
    """A plausible client result: random values at kept positions, zeros elsewhere."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, value in core.state.items():
        if np.issubdtype(value.dtype, np.integer):
            out[name] = np.array(seed, dtype=value.dtype).reshape(value.shape)
            continue
        v = rng.normal(size=value.shape).astype(value.dtype)
        out[name] = np.where(core.masks[name], v, 0).astype(value.dtype) if name in core.masks else v
    return out


def test_aggregation_matches_independent_weighted_mean(core):
    strategy = SparseFedAvg(core, min_available_nodes=2)
    a, b = _client_state(core, 1), _client_state(core, 2)
    msgs = [server_message(11, {}, {}), server_message(12, {}, {})]
    replies = [reply(msgs[0], wire.encode_up(a, core.masks), {"num-examples": 1}),
               reply(msgs[1], wire.encode_up(b, core.masks), {"num-examples": 3})]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["num-examples"] == 4
    for name, value in core.state.items():
        got = arrays[name].numpy()
        if np.issubdtype(value.dtype, np.integer):
            assert got == 2  # counters: max over clients
            continue
        expected = (a[name].astype(np.float64) * 1 + b[name].astype(np.float64) * 3) / 4
        np.testing.assert_allclose(got, expected.astype(value.dtype), rtol=0, atol=1e-7)
        if name in core.masks:
            assert np.all(got[~core.masks[name]] == 0)
    # only kept values travelled up: fewer bytes than two dense states, serialized alike
    from server.strategy import to_record

    assert strategy.stats[1]["bytes_up"] < record_bytes(to_record(a)) + record_bytes(to_record(b))


def test_bad_replies_are_rejected_and_the_round_goes_on(core, caplog):
    strategy = SparseFedAvg(core, min_available_nodes=2)
    good = _client_state(core, 1)
    name = next(iter(core.masks))
    bad_payload = wire.encode_up(good, core.masks)
    bad_payload[f"value/{name}"] = bad_payload[f"value/{name}"][:-1]  # one value short
    unknown = dict(wire.encode_up(good, core.masks), **{"value/not.a.tensor": np.zeros(1, np.float32)})
    msgs = [server_message(i, {}, {}) for i in (21, 22, 23, 24, 25)]
    replies = [
        reply(msgs[0], wire.encode_up(good, core.masks), {"num-examples": 5}),
        reply(msgs[1], bad_payload, {"num-examples": 5}),
        reply(msgs[2], unknown, {"num-examples": 5}),
        reply(msgs[3], None, {"num-examples": 5}),  # no arrays at all
        error_reply(msgs[4], "client crashed"),
    ]
    with caplog.at_level(logging.WARNING):
        arrays, _ = strategy.aggregate_train(3, replies)
    assert strategy.stats[3]["failures"] == 4
    text = caplog.text
    assert name in text and "not.a.tensor" in text and "client crashed" in text
    for k, v in good.items():  # the one good reply alone is the aggregate
        if not np.issubdtype(v.dtype, np.integer):
            np.testing.assert_array_equal(arrays[k].numpy(), v)


def test_all_rejected_keeps_previous_model(core):
    strategy = SparseFedAvg(core, min_available_nodes=1)
    msg = server_message(5, {}, {})
    assert strategy.aggregate_train(1, [error_reply(msg, "x")]) == (None, None)


def test_down_payload_is_packed_mask_plus_kept_values(core):
    strategy = SparseFedAvg(core)
    from server.strategy import to_record

    payload = strategy._encode(to_record(core.state))
    kept = sum(int(m.sum()) for m in core.masks.values())
    total = sum(m.size for m in core.masks.values())
    values = sum(payload[f"value/{n}"].numpy().size for n in core.masks)
    assert values == kept
    assert sum(payload[f"mask/{n}"].numpy().size for n in core.masks) == sum(
        -(-m.size // 8) for m in core.masks.values())
    assert record_bytes(payload) < record_bytes(to_record(core.state))
    assert kept < total


def test_fedtiny_topk_replies_are_checked_and_aggregated(core, caplog):
    """Top-K replies: out-of-range or over-K ones are rejected; the rest move one layer."""

    from fedprune.fedtiny.progressive import Schedule
    from flwr.app import Array, ArrayRecord

    from server.adjust import FedTinyAdjust

    adjuster = FedTinyAdjust(core.cfg, core, Schedule(rounds=4, delta_r=1, r_end=4, alpha=0.3))
    strategy = SparseFedAvg(core, adjuster)
    plan = adjuster.plan(1)
    [layer], [k] = plan["adjust-layers"], plan["adjust-ks"]
    assert layer == next(iter(core.masks)) and k > 0
    mask = core.masks[layer]
    pruned = np.flatnonzero(~mask.reshape(-1))
    good = wire.encode_sparse({layer: (pruned[:k], np.linspace(1, 2, k, dtype=np.float32))})
    too_many = wire.encode_sparse({layer: (pruned[:k + 1], np.ones(k + 1, np.float32))})
    out_of_range = {f"index/{layer}": np.array([mask.size], np.int32),
                    f"value/{layer}": np.ones(1, np.float32)}
    state = _client_state(core, 1)
    msgs = [server_message(i, {}, {}) for i in (31, 32, 33)]
    replies = []
    for msg, topk in zip(msgs, (good, too_many, out_of_range)):
        r = reply(msg, wire.encode_up(state, core.masks), {"num-examples": 4})
        r.content["fedtiny"] = ArrayRecord({key: Array(v) for key, v in topk.items()})
        replies.append(r)
    before = core.masks[layer].copy()
    with caplog.at_level(logging.WARNING):
        strategy.aggregate_train(1, replies)
    assert strategy.stats[1]["failures"] == 2 and "K=" in caplog.text and layer in caplog.text
    after = core.masks[layer]
    assert int(after.sum()) == int(before.sum())
    grown = np.flatnonzero(after.reshape(-1) & ~before.reshape(-1))
    assert set(grown) == set(pruned[:k].tolist())  # exactly the good reply's positions grew
