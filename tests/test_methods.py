"""Federated methods as registered units: their server parts through the real strategy on
hand-built replies (checks, rejections, exact mask moves), their client parts' checks, and
the registry contract every method must meet."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedprune.config import ConfigError, load_config
from fedprune.fl.server_core import SparseServer
from fedprune.masks import wire
from fedprune.methods import Method, method_class, method_names
from fedprune.methods.fedtiny import FedTinyClient
from server.experiment import make_strategy
from flower_helpers import server_message, train_reply

# quorum 0: one accepted reply is enough here (rejections are planted; quorum has its own tests)
BASE = ["model.width=2", "mask.density=0.3", "data.num_clients=3", "fed.rounds=4", "fed.quorum=0"]


def _setup(*extra):
    cfg = load_config("default", [*BASE, *extra])
    core = SparseServer(cfg)
    method = method_class(cfg.method.name)(cfg, core)
    return core, method, make_strategy(cfg, core, method)


def _state(core, seed):
    rng = np.random.default_rng(seed)
    return {n: (np.where(core.masks[n], rng.normal(size=v.shape), 0).astype(v.dtype)
                if n in core.masks else v.copy()) for n, v in core.state.items()}


def _with(msg, key, arrays):
    msg.content[key] = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
    return msg


def test_registry_holds_every_method_with_its_three_parts():
    assert method_names() == ["channel-prune", "feddst", "fedtiny", "fixed", "gates",
                              "l0-average",
                              "mask-vote", "pooled", "prunefl", "snip", "structured",
                              "synflow", "token-select"]
    for name in method_names():
        cls = method_class(name)
        assert issubclass(cls, Method) and cls.name == name == cls.config_cls().name
        rounds = 0 if cls.config_cls.one_shot else 4
        model = ["model.name=vit"] if name == "token-select" else []  # needs a transformer
        assert load_config("default", [f"method.name={name}", "mask.density=0.5",
                                       f"fed.rounds={rounds}", *model]).method.name == name
    with pytest.raises(ConfigError, match="method.name='nope' is not valid"):
        load_config("default", ["method.name=nope"])
    with pytest.raises(ConfigError, match="method.candidates"):  # options are typed per method
        load_config("default", ["method.name=prunefl", "method.candidates=3"])


def test_prunefl_grows_the_planted_positions_and_rejects_bad_gradients(caplog):
    core, method, strategy = _setup("method.name=prunefl", "method.delta_r=1")
    assert method.plan(1) is not None and method.plan(3) is None  # r_end = 3/4 of 4 rounds
    strategy.plans[1] = method.plan(1)
    layer = "layers.1.0.conv1.weight"
    pruned = np.flatnonzero(~core.masks[layer].reshape(-1))[:3]
    grads = {n: np.full(m.shape, 1e-3, np.float32) for n, m in core.masks.items()}
    grads[layer].reshape(-1)[pruned] = 50.0  # planted: far above every kept position
    bad_shape = {**grads, layer: np.ones((2, 2), np.float32)}
    negative = {**grads, "fc.weight": -np.ones(core.masks["fc.weight"].shape, np.float32)}
    state = _state(core, 1)
    replies = [_with(train_reply(server_message(i, {}, {}), wire.encode_up(state, core.masks),
                                 5, i - 1), "dst", g)
               for i, g in ((1, grads), (2, bad_shape), (3, negative))]
    before = {n: m.copy() for n, m in core.masks.items()}
    with caplog.at_level(logging.WARNING):
        strategy.aggregate_train(1, replies)
    assert strategy.stats[1]["failures"] == 2
    assert f"dst/{layer}" in caplog.text and "below the minimum 0.0" in caplog.text
    for name, mask in core.masks.items():
        assert int(mask.sum()) == int(before[name].sum()), name  # per-layer count exact
    assert core.masks[layer].reshape(-1)[pruned].all()  # the planted positions grew
    assert np.all(core.state[layer].reshape(-1)[pruned] == 0)  # grown weights start at zero
    assert strategy.stats[1]["adjusted_layer"] == "all"


def test_feddst_votes_over_client_masks_and_rejects_wrong_counts(caplog):
    core, method, strategy = _setup("method.name=feddst", "method.delta_r=1",
                                    "method.alpha=0.5")
    plan = strategy.plans[1] = method.plan(1)
    assert plan.own_masks and "fc.weight" in plan.config["layers"]
    layer = "fc.weight"
    mask = core.masks[layer].reshape(-1)
    on, off = np.flatnonzero(mask), np.flatnonzero(~mask)

    def moved(swap_out, swap_in):
        m = {n: v.copy() for n, v in core.masks.items()}
        flat = m[layer].reshape(-1)
        flat[swap_out], flat[swap_in] = False, True
        return m

    # clients 1 and 2 (8 of 10 examples) move the same weight; client 3 another one
    own = [moved(on[0], off[0]), moved(on[0], off[0]), moved(on[1], off[1])]
    wrong = moved([on[2], on[3]], off[2])  # keeps one weight fewer: rejected
    replies = []
    for i, (m, n) in enumerate(zip([*own, wrong], (4, 4, 2, 3))):
        state = {k: (np.where(m[k], 1.0, 0).astype(v.dtype) if k in m else v)
                 for k, v in _state(core, i).items()}
        replies.append(train_reply(server_message(i + 1, {}, {}), wire.encode_down(state, m),
                                   n, i % 3))
    with caplog.at_level(logging.WARNING):
        strategy.aggregate_train(1, replies)
    assert strategy.stats[1]["failures"] == 1 and "keeps" in caplog.text
    new = core.masks[layer].reshape(-1)
    assert new[off[0]] and not new[on[0]]  # the 80% vote moved
    assert new[on[1]] and not new[off[1]]  # the 20% vote did not
    assert int(new.sum()) == len(on)


def test_fedtiny_client_refuses_k_beyond_the_growable_positions():
    core, _, _ = _setup("method.name=fedtiny", "method.delta_r=1")
    masks = {n: torch.from_numpy(m) for n, m in core.masks.items()}
    pruned = int((~masks["fc.weight"]).sum())
    client = FedTinyClient(core.cfg)
    with pytest.raises(ValueError, match="fc.weight.*K="):
        client.training({"layers": ["fc.weight"], "ks": [pruned + 1]}, {}, core.model, masks,
                        torch.device("cpu"))
    with pytest.raises(ValueError, match="not a masked tensor"):
        client.training({"layers": ["nope.weight"], "ks": [1]}, {}, core.model, masks,
                        torch.device("cpu"))
    with pytest.raises(ValueError, match="no query 'nope'"):
        client.answer("nope", 0, {})


def test_gates_refuse_an_unreachable_density_before_any_round():
    with pytest.raises(ValueError, match="mask.density=0.01 keeps 13 of 1326"):
        _setup("method.name=gates", "method.rounds=2", "mask.density=0.01")


def test_gates_leave_an_excluded_tensor_untouched():
    """mask.exclude reaches the gates: no gate on conv1, so it stays dense (it used to get
    a gate and end 31% kept)."""
    core, method, strategy = _setup("method.name=gates", "method.rounds=1",
                                    "mask.exclude=[conv1.weight]", "mask.density=0.5")
    assert "conv1.weight" not in core.masks and "conv1.weight" not in method.gates
    plan = strategy.plans[1] = method.plan(1)
    assert "conv1.weight" not in plan.records["gates"]
    state = _state(core, 3)
    gates = {n: np.linspace(0, 1, len(g)).astype(np.float32) for n, g in method.gates.items()}
    replies = [_with(train_reply(server_message(i + 1, {}, {}),
                                 wire.encode_up(state, core.masks), 4, i), "gates", gates)
               for i in range(3)]
    strategy.aggregate_train(1, replies)
    assert strategy.stats[1]["adjusted_layer"] == "gates"
    assert "conv1.weight" not in core.masks
    assert np.array_equal(core.state["conv1.weight"], state["conv1.weight"])
    assert 0.45 < sum(int(m.sum()) for m in core.masks.values()) / sum(
        m.size for m in core.masks.values()) <= 0.5
