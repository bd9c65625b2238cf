"""PruneFL and FedDST cores: hand-computed golden cases and independent reference checks."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedprune.config import TrainConfig
from fedprune.fedtiny.progressive import Schedule
from fedprune.fl.dynamic import (GradSquareAccumulator, client_adjust, layer_moves,
                                 masked_state, prunefl_reselect, sparse_average, vote_masks)
from fedprune.masks.regrow import prune_and_grow
from fedprune.train import train_local

B = np.array  # shorthand for hand-built arrays


def _bool(*rows):
    return np.array(rows, dtype=bool)


# ----------------------------------------------------------------------------- FedDST server


def test_vote_masks_golden_share_first_then_magnitude_then_c_order():
    # flat positions 0..5 of a 2x3 layer; weights [1, 1, 2] -> shares
    # [0.5, 0.75, 0.25, 0.5, 0.25, 0.75]: keep 1 and 5, then the 0-vs-3 tie by |magnitude|.
    masks = [{"w": _bool([1, 1, 0], [0, 1, 0]), "v": _bool(1, 0, 1, 0)},
             {"w": _bool([1, 0, 1], [0, 0, 1]), "v": _bool(0, 1, 0, 1)},
             {"w": _bool([0, 1, 0], [1, 0, 1]), "v": _bool(1, 1, 0, 0)}]
    # position 2 has the largest magnitude but a quarter of the vote: it must not win
    magnitude = {"w": B([[0.1, 0.2, 5.0], [-0.3, 0.0, 0.4]]), "v": B([1.0, 1.0, 1.0, 1.0])}
    out = vote_masks(masks, [1, 1, 2], {"w": 3, "v": 1}, magnitude)
    np.testing.assert_array_equal(out["w"], _bool([0, 1, 0], [1, 0, 1]))
    # "v" shares [0.75, 0.75, 0.25, 0.25], equal magnitudes: the earlier position wins
    np.testing.assert_array_equal(out["v"], _bool(1, 0, 0, 0))
    applied = masked_state({"w": magnitude["w"], "v": magnitude["v"]}, out)
    np.testing.assert_array_equal(applied["w"], B([[0, 0.2, 0], [-0.3, 0, 0.4]]))
    np.testing.assert_array_equal(magnitude["w"][0], B([0.1, 0.2, 5.0]))  # input untouched


def test_vote_masks_equal_shares_from_different_clients_still_tie():
    # weights [1, 2, 3, 4]: {c0, c1} and {c2} both hold 3/10 of the vote, but the float
    # sums are 0.30000000000000004 and 0.3; magnitude must decide, not rounding.
    masks = [{"w": _bool(1, 0)}, {"w": _bool(1, 0)}, {"w": _bool(0, 1)}, {"w": _bool(0, 0)}]
    out = vote_masks(masks, [1, 2, 3, 4], {"w": 1}, {"w": B([0.1, -0.9])})
    np.testing.assert_array_equal(out["w"], _bool(0, 1))
    with pytest.raises(ValueError, match="cannot keep 3 of 2"):
        vote_masks(masks, [1, 2, 3, 4], {"w": 3}, {"w": B([0.1, -0.9])})


def test_sparse_average_golden():
    states = [{"w": B([[1.0, 2.0], [9.0, 0.0]], dtype=np.float32), "b": B([1.0]),
               "n": B(3, dtype=np.int64)},
              {"w": B([[5.0, 0.0], [7.0, 0.0]], dtype=np.float32), "b": B([2.0]),
               "n": B(5, dtype=np.int64)}]
    masks = [{"w": _bool([1, 1], [0, 0])},  # client 0's stray 9.0 at (1, 0) is not kept
             {"w": _bool([1, 0], [1, 0])}]
    out = sparse_average(states, masks, [1, 3])
    # (0,0): (1*1 + 3*5) / 4; (0,1): client 0 alone; (1,0): client 1 alone; (1,1): nobody
    np.testing.assert_array_equal(out["w"], B([[4.0, 2.0], [7.0, 0.0]], dtype=np.float32))
    assert out["w"].dtype == np.float32
    np.testing.assert_allclose(out["b"], [1.75])  # unmasked: plain weighted mean
    assert out["n"] == 4 and out["n"].dtype == np.int64  # counters: median, as weighted_average
    with pytest.raises(ValueError, match="one state, mask set and weight per client"):
        sparse_average(states, masks, [1])


# ----------------------------------------------------------------------------- PruneFL


def test_prunefl_reselect_golden_planted_and_ties_prefer_kept():
    state = {"a": B([[0.5, -0.2, 0.0], [0.0, 0.0, 0.7]]), "b": B([0.3, 0.0, 0.0, -0.4]),
             "bias": B([1.0, 2.0])}
    masks = {"a": _bool([1, 1, 0], [0, 0, 1]), "b": _bool(1, 0, 0, 1)}
    # "a": pruned positions 2 and 4 carry the planted largest importance
    importance = {"a": B([[0.1, 0.9, 5.0], [0.0, 3.0, 0.05]]), "b": B([1.0, 1.0, 1.0, 1.0])}
    before = copy.deepcopy(state), copy.deepcopy(masks)
    new_state, new_masks = prunefl_reselect(state, masks, importance)
    np.testing.assert_array_equal(new_masks["a"], _bool([0, 1, 1], [0, 1, 0]))
    # kept -0.2 keeps its value; grown 2 and 4 start at zero; dropped 0 and 5 are zeroed
    np.testing.assert_array_equal(new_state["a"], B([[0.0, -0.2, 0.0], [0.0, 0.0, 0.0]]))
    # all-equal importance: the current mask stays (C order would give [1, 1, 0, 0])
    np.testing.assert_array_equal(new_masks["b"], masks["b"])
    np.testing.assert_array_equal(new_state["b"], state["b"])
    np.testing.assert_array_equal(new_state["bias"], B([1.0, 2.0]))
    assert {n: int(m.sum()) for n, m in new_masks.items()} == {"a": 3, "b": 2}
    for got, want in zip((state, masks), before):  # inputs untouched
        for n in want:
            np.testing.assert_array_equal(got[n], want[n])


def _linear(weight, bias):
    layer = nn.Linear(len(weight[0]), len(weight))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.copy_(torch.tensor(bias))
    return layer


def test_grad_square_accumulator_equals_mean_of_autograd_squares():
    model = _linear([[0.5, -1.0, 0.25], [1.5, 0.0, -0.5]], [0.1, -0.2])
    steps = [(torch.tensor([[1.0, 2.0, -1.0], [0.5, 0.0, 3.0]]), torch.tensor([0, 1])),
             (torch.tensor([[-2.0, 1.0, 0.0]]), torch.tensor([1]))]
    acc = GradSquareAccumulator(model, ["weight"])
    hook = acc.hook()
    for x, y in steps:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        hook()
    reference = copy.deepcopy(model)
    squares = [torch.autograd.grad(F.cross_entropy(reference(x), y), reference.weight)[0] ** 2
               for x, y in steps]
    got = acc.result()
    assert list(got) == ["weight"] and got["weight"].dtype == np.float32 and acc.steps == 2
    np.testing.assert_allclose(got["weight"], ((squares[0] + squares[1]) / 2).numpy(),
                               rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="no training step"):
        GradSquareAccumulator(model, ["weight"]).result()
    with pytest.raises(KeyError, match="nope"):
        GradSquareAccumulator(model, ["nope"])


def test_grad_square_accumulator_sees_pruned_positions_during_train_local():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    mask = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1], [1, 1, 0, 0]], dtype=torch.bool)
    batches = [(torch.randn(5, 4), torch.randint(0, 3, (5,))) for _ in range(2)]
    acc = GradSquareAccumulator(model, ["weight"])
    cfg = TrainConfig(lr=0.1, momentum=0.0, weight_decay=0.0)
    train_local(model, batches, cfg, {"weight": mask}, on_backward=acc.hook())
    got = acc.result()["weight"]
    assert acc.steps == 2
    assert (got[~mask.numpy()] > 0).all()  # dense: the masked-out gradient was seen
    assert (model.weight.detach()[~mask] == 0).all()  # and training stayed sparse


# ----------------------------------------------------------------------------- FedDST client


def test_prune_and_grow_golden_never_regrows_what_it_drops():
    weight = torch.tensor([[0.9, 0.0, 0.05, 0.0], [0.0, 0.7, 0.0, -0.02]])
    mask = weight != 0  # active: flat 0, 2, 5, 7
    # the two weights about to be dropped (2, 7) carry the largest gradients
    grad = torch.tensor([[0.0, 0.1, 50.0, -3.0], [2.0, 0.0, 0.5, 100.0]])
    new_w, new_m = prune_and_grow(weight, mask, grad.abs(), k=2)
    # drop 7 (|-0.02|) and 2 (0.05); grow 3 and 4 (largest |g| among 1, 3, 4, 6)
    assert new_m.view(-1).tolist() == [True, False, False, True, True, True, False, False]
    assert new_w.view(-1).tolist() == pytest.approx([0.9, 0, 0, 0, 0, 0.7, 0, 0])
    assert torch.equal(mask, weight != 0)  # input untouched
    # ties: equal |w| drops the earlier position, equal |g| grows the earlier one
    w2, m2 = prune_and_grow(torch.tensor([0.3, 0.0, 0.3, 0.0]),
                              torch.tensor([True, False, True, False]),
                              torch.tensor([0.0, 1.0, 0.0, 1.0]), k=1)
    assert m2.tolist() == [False, True, True, False]
    assert w2.tolist() == pytest.approx([0.0, 0.0, 0.3, 0.0])


def test_prune_and_grow_rejects_k_beyond_what_can_move():
    mask = torch.tensor([True, True, True, False])
    with pytest.raises(ValueError, match=r"K=2 must be in \[0, min\(active=3, pruned=1\)\]"):
        prune_and_grow(torch.ones(4), mask, torch.ones(4), k=2)


def _tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def test_client_adjust_exact_counts_and_matches_independent_rigl():
    model = _tiny_model()
    gen = torch.Generator().manual_seed(1)
    masks = {n: torch.rand(p.shape, generator=gen) < 0.5
             for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2}
    batches = [(torch.randn(7, 6, generator=gen), torch.randint(0, 3, (7,), generator=gen))
               for _ in range(2)]
    k = {"0.weight": 4, "3.weight": 2}
    # independent reference: dense mean gradient at the masked weights, then argsort picks
    ref = copy.deepcopy(model).train()
    with torch.no_grad():
        for n, m in masks.items():
            dict(ref.named_parameters())[n].mul_(m)
    weights = [dict(ref.named_parameters())[n] for n in k]
    loss = sum(F.cross_entropy(ref(x), y, reduction="sum") for x, y in batches) / 14
    grads = dict(zip(k, torch.autograd.grad(loss, weights)))
    ref_w = {n: w.detach().clone() for n, w in zip(k, weights)}
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    new = client_adjust(model, masks, batches, k, "cpu")

    params = dict(model.named_parameters())
    for name, kk in k.items():
        old, m = masks[name].view(-1), new[name].view(-1)
        assert int(m.sum()) == int(old.sum())  # density exact
        assert int((old & ~m).sum()) == kk and int((m & ~old).sum()) == kk  # k each way
        active, pruned = old.nonzero().squeeze(1), (~old).nonzero().squeeze(1)
        drop = active[ref_w[name].view(-1)[active].abs().argsort()[:kk]]
        grow = pruned[grads[name].view(-1)[pruned].abs().argsort(descending=True)[:kk]]
        assert set((old & ~m).nonzero().squeeze(1).tolist()) == set(drop.tolist())
        assert set((m & ~old).nonzero().squeeze(1).tolist()) == set(grow.tolist())
        w = params[name].detach().view(-1)
        assert (w[~m] == 0).all() and (w[grow] == 0).all()  # grown start at zero
        stay = old & m
        assert torch.equal(w[stay], ref_w[name].view(-1)[stay])  # kept weights unchanged
        assert params[name].grad is None
    for n, b in model.named_buffers():  # BN running statistics restored
        assert torch.equal(b, buffers[n]), n
    with pytest.raises(KeyError, match="without a mask"):
        client_adjust(model, masks, batches, {"0.bias": 1}, "cpu")


def test_layer_moves_follows_the_cosine_schedule():
    s = Schedule(rounds=40, delta_r=5, r_end=20, alpha=0.4)  # alpha_10 = 0.2
    masks = {"a": np.arange(100) < 10, "b": torch.arange(12) < 10}
    assert layer_moves(s, 10, masks) == {"a": 2, "b": 2}
    assert layer_moves(s, 0, masks) == {"a": 4, "b": 2}  # b: only 2 pruned positions
