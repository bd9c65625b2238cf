"""FedPrLLM-style mask voting and FedSpaLLM-style l0 averaging on hand-built client masks
and weights: exact expected masks and weights, the exact kept count per comparison group
(layer, row, 2:4), the stated tie rule, and bad input named."""

from __future__ import annotations

import pytest
import torch

from fedprune.prune.base import SparsityTarget
from fedprune.prune.consensus import l0_average, mask_vote

T = torch.tensor
W = T([[0.1, 0.4, -0.3, 0.2], [0.5, -0.1, 0.2, 0.3]])
KEEP = [T([[1, 1, 0, 0], [1, 0, 1, 0]]).bool(),   # votes to keep:
        T([[1, 0, 1, 0], [1, 0, 0, 1]]).bool(),   # [[2, 2, 2, 0],
        T([[0, 1, 1, 0], [1, 1, 0, 0]]).bool()]   #  [3, 1, 1, 1]]


def test_mask_vote_layer_keeps_the_most_voted_positions():
    weight, mask = mask_vote(KEEP, W, SparsityTarget(0.5))
    # 4 of 8 kept: the 3-vote position, then all three 2-vote positions
    assert mask.tolist() == [[True, True, True, False], [True, False, False, False]]
    torch.testing.assert_close(weight, T([[0.1, 0.4, -0.3, 0], [0.5, 0, 0, 0]]))


@pytest.mark.parametrize("target", [SparsityTarget(0.5, scope="row"),
                                    SparsityTarget.parse(0.5, "2:4")])
def test_mask_vote_rows_and_2_4_break_ties_by_dense_magnitude(target):
    weight, mask = mask_vote(KEEP, W, target)
    # row 0: three 2-vote ties -> |0.4|, |-0.3| kept; row 1: 3 votes, then |0.3| of the 1s
    assert mask.tolist() == [[False, True, True, False], [True, False, False, True]]
    scaled, _ = mask_vote(KEEP, W, target, scale=True)  # kept weights x (keep votes / 3)
    torch.testing.assert_close(scaled, T([[0, 0.4 * 2 / 3, -0.3 * 2 / 3, 0],
                                          [0.5, 0, 0, 0.3 / 3]]))
    assert weight[~mask].abs().sum() == 0


W1 = T([[1.0, 0.0, 3.0, 0.0], [0.0, 2.0, 0.0, 4.0]])
W2 = T([[3.0, 5.0, 0.0, 0.0], [0.0, 0.0, 1.0, 2.0]])


def test_l0_average_averages_over_the_clients_that_kept_each_weight():
    weight, mask = l0_average([W1, W2], [W1 != 0, W2 != 0], SparsityTarget(0.5))
    # averages [[2, 5, 3, 0], [0, 2, 1, 3]] over keep counts [[2, 1, 1, 0], [0, 1, 1, 2]];
    # the union keeps 6 > 4: both 2-count positions, then the largest |average| of the 1s
    assert mask.tolist() == [[True, True, True, False], [False, False, False, True]]
    assert weight.tolist() == [[2.0, 5.0, 3.0, 0.0], [0.0, 0.0, 0.0, 3.0]]
    rows, row_mask = l0_average([W1, W2], [W1 != 0, W2 != 0], SparsityTarget(0.5, scope="row"))
    assert row_mask.tolist() == [[True, True, False, False], [False, True, False, True]]
    assert rows.tolist() == [[2.0, 5.0, 0.0, 0.0], [0.0, 2.0, 0.0, 3.0]]


@pytest.mark.parametrize("target", [SparsityTarget(0.6), SparsityTarget(0.5, scope="row"),
                                    SparsityTarget.parse(0.5, "2:4")])
def test_both_hit_the_exact_count_per_group_on_random_clients(target):
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(16, 32, generator=g)
    masks = [torch.rand(16, 32, generator=g) > 0.5 for _ in range(5)]
    weights = [dense.masked_fill(~m, 0) + 0.01 * torch.randn(16, 32, generator=g) * m
               for m in masks]
    for weight, mask in (mask_vote(masks, dense, target), l0_average(weights, masks, target)):
        if target.m:  # every group of 4 keeps exactly 2
            assert (mask.view(-1, 4).sum(1) == 2).all()
        elif target.scope == "row":
            assert (mask.sum(1) == 16).all()
        else:
            assert int(mask.sum()) == 16 * 32 - round(0.6 * 16 * 32)
        assert (weight[~mask] == 0).all()


def test_bad_client_input_is_named():
    with pytest.raises(ValueError, match="client 1's mask is torch.int64"):
        mask_vote([KEEP[0], KEEP[1].long()], W, SparsityTarget(0.5))
    with pytest.raises(ValueError, match=r"client 0's mask is torch.bool \(2, 2\)"):
        mask_vote([torch.ones(2, 2, dtype=torch.bool)], W, SparsityTarget(0.5))
    with pytest.raises(ValueError, match="2 weights for 1 masks"):
        l0_average([W1, W2], [W1 != 0], SparsityTarget(0.5))
    with pytest.raises(ValueError, match="no client masks"):
        mask_vote([], W, SparsityTarget(0.5))
