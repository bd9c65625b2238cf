"""Server-side mask-adjustment methods on hand-built replies: checks, rejections, exact
mask moves (PruneFL-style, FedDST-style); the client side's K bound."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedprune.config import load_config
from fedprune.fl.client_adjust import make_client_adjust
from fedprune.fl.server_core import SparseServer
from fedprune.masks import wire
from server.adjust import make_adjuster
from server.strategy import SparseFedAvg
from flower_helpers import reply, server_message

BASE = ["model.width=2", "mask.density=0.3", "data.num_clients=3", "fed.rounds=4"]


def _core(*extra):
    return SparseServer(load_config("default", [*BASE, *extra]))


def _state(core, seed):
    rng = np.random.default_rng(seed)
    return {n: (np.where(core.masks[n], rng.normal(size=v.shape), 0).astype(v.dtype)
                if n in core.masks else v.copy()) for n, v in core.state.items()}


def _with(msg, key, arrays):
    msg.content[key] = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
    return msg


def test_prunefl_grows_the_planted_positions_and_rejects_bad_gradients(caplog):
    core = _core("dst.method=prunefl", "dst.delta_r=1")
    adjuster = make_adjuster(core.cfg, core)
    strategy = SparseFedAvg(core, adjuster)
    assert adjuster.plan(1) == {"adjust-method": "prunefl"} and adjuster.plan(3) is None
    layer = "layers.1.0.conv1.weight"
    pruned = np.flatnonzero(~core.masks[layer].reshape(-1))[:3]
    grads = {n: np.full(m.shape, 1e-3, np.float32) for n, m in core.masks.items()}
    grads[layer].reshape(-1)[pruned] = 50.0  # planted: far above every kept position
    bad_shape = {**grads, layer: np.ones((2, 2), np.float32)}
    negative = {**grads, "fc.weight": -np.ones(core.masks["fc.weight"].shape, np.float32)}
    state = _state(core, 1)
    replies = [_with(reply(server_message(i, {}, {}), wire.encode_up(state, core.masks),
                           {"num-examples": 5}), "dst", g)
               for i, g in ((1, grads), (2, bad_shape), (3, negative))]
    before = {n: m.copy() for n, m in core.masks.items()}
    with caplog.at_level(logging.WARNING):
        strategy.aggregate_train(1, replies)
    assert strategy.stats[1]["failures"] == 2
    assert layer in caplog.text and ">= 0" in caplog.text
    for name, mask in core.masks.items():
        assert int(mask.sum()) == int(before[name].sum()), name  # per-layer count exact
    assert core.masks[layer].reshape(-1)[pruned].all()  # the planted positions grew
    assert np.all(core.state[layer].reshape(-1)[pruned] == 0)  # grown weights start at zero


def test_feddst_votes_over_client_masks_and_rejects_wrong_counts(caplog):
    core = _core("dst.method=feddst", "dst.delta_r=1", "dst.alpha=0.5")
    adjuster = make_adjuster(core.cfg, core)
    strategy = SparseFedAvg(core, adjuster)
    plan = adjuster.plan(1)
    assert plan["adjust-method"] == "feddst" and "fc.weight" in plan["adjust-layers"]
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
        replies.append(reply(server_message(i + 1, {}, {}), wire.encode_down(state, m),
                             {"num-examples": n}))
    with caplog.at_level(logging.WARNING):
        strategy.aggregate_train(1, replies)
    assert strategy.stats[1]["failures"] == 1 and "keeps" in caplog.text
    new = core.masks[layer].reshape(-1)
    assert new[off[0]] and not new[on[0]]  # the 80% vote moved
    assert new[on[1]] and not new[off[1]]  # the 20% vote did not
    assert int(new.sum()) == len(on)


def test_client_refuses_k_beyond_the_growable_positions():
    core = _core()
    masks = {n: torch.from_numpy(m) for n, m in core.masks.items()}
    pruned = int((~masks["fc.weight"]).sum())
    plan = {"adjust-method": "fedtiny", "adjust-layers": ["fc.weight"], "adjust-ks": [pruned + 1]}
    with pytest.raises(ValueError, match="fc.weight.*K="):
        make_client_adjust(plan, core.cfg, core.model, masks, {}, torch.device("cpu"))
    with pytest.raises(ValueError, match="adjust-method"):
        make_client_adjust({"adjust-method": "nope"}, core.cfg, core.model, masks, {},
                           torch.device("cpu"))


def test_gates_refuse_an_unreachable_density_before_any_round():
    core = _core("gates.rounds=2", "mask.density=0.01")
    with pytest.raises(ValueError, match="mask.density=0.01 keeps 13 of 1326"):
        make_adjuster(core.cfg, core)
