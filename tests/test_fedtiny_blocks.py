"""FedTiny building blocks: exact BN pooling; majority vote and score averaging golden cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedprune.fedtiny.bn_stats import apply_bn_stats_, collect_bn_stats, pool_bn_stats
from fedprune.fl.consensus import average_scores, majority_vote


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 5), nn.BatchNorm1d(5))


def test_pooled_bn_stats_equal_stats_of_concatenated_data():
    # float64 end to end: in float32 a conv's output on 5 images and on the same images in
    # a batch of 17 can differ in the 7th digit (kernel choice by batch size; seen on an
    # Intel Xeon, not on AMD EPYC), which is not what this test is about
    model = _model().double()
    gen = torch.Generator().manual_seed(1)
    # three clients with different sizes and shifted distributions (between-client variance)
    data = [(torch.randn(n, 3, 8, 8, generator=gen) * s + o).double()
            for n, s, o in ((5, 1.0, 0.0), (9, 2.0, 3.0), (3, 0.5, -2.0))]
    per_client = [collect_bn_stats(model, [(x, None)], train_mode=False) for x in data]
    pooled = pool_bn_stats(per_client)
    everything = collect_bn_stats(model, [(torch.cat(data), None)], train_mode=False)
    assert set(everything) == {"1", "5"}
    for name in everything:
        assert pooled[name].count == everything[name].count
        np.testing.assert_allclose(pooled[name].mean, everything[name].mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(pooled[name].var, everything[name].var, rtol=1e-10, atol=1e-12)
    # a naive average of client variances misses the between-client part
    naive = np.mean([c["1"].var for c in per_client], axis=0)
    assert not np.allclose(naive, everything["1"].var, rtol=1e-3)
    # train mode: the first BN's input does not depend on batching, so it pools exactly too
    train = pool_bn_stats([collect_bn_stats(model, [(x, None)]) for x in data])
    whole = collect_bn_stats(model, [(torch.cat(data), None)])
    np.testing.assert_allclose(train["1"].var, whole["1"].var, rtol=1e-10, atol=1e-12)
    # and a statistics pass leaves the running buffers untouched
    assert torch.equal(model[1].running_mean, torch.zeros(4))


def test_bn_stats_match_an_independent_computation_and_apply():
    model = _model()
    x = torch.randn(6, 3, 8, 8)
    stats = collect_bn_stats(model, [(x[:2], None), (x[2:], None)])
    conv_out = model[0](x).detach().double()  # (6, 4, 6, 6): the first BN input
    np.testing.assert_allclose(stats["1"].mean, conv_out.mean((0, 2, 3)).numpy(), atol=1e-12)
    np.testing.assert_allclose(stats["1"].var, conv_out.var((0, 2, 3), unbiased=False).numpy(),
                               atol=1e-12)
    apply_bn_stats_(model, stats)
    n = stats["1"].count
    torch.testing.assert_close(model[1].running_var.double(),
                               torch.from_numpy(stats["1"].var * n / (n - 1)), rtol=1e-6, atol=1e-7)


def test_bn_stats_of_the_wrong_shape_are_rejected():
    model = _model()
    stats = collect_bn_stats(model, [(torch.randn(2, 3, 8, 8), None)])
    bad = dict(stats)
    bad["1"] = type(stats["1"])(2, np.zeros(7), np.ones(7))
    with pytest.raises(ValueError, match="'1'"):
        pool_bn_stats([stats, bad])
    with pytest.raises(ValueError, match="'1'"):
        apply_bn_stats_(model, {"1": bad["1"]})


def test_majority_vote_golden():
    a = np.array([1, 1, 0, 0], bool)
    b = np.array([1, 0, 1, 0], bool)
    c = np.array([1, 0, 0, 1], bool)
    np.testing.assert_array_equal(majority_vote([a, b, c]), [True, False, False, False])
    # weighted: client c holds most examples, so its mask wins wherever it disagrees alone
    np.testing.assert_array_equal(majority_vote([a, b, c], weights=[1, 1, 5]),
                                  [True, False, False, True])
    # two clients disagreeing: exact ties follow the tie rule
    np.testing.assert_array_equal(majority_vote([a, b], tie="keep"), [True, True, True, False])
    np.testing.assert_array_equal(majority_vote([a, b], tie="prune"), [True, False, False, False])
    with pytest.raises(ValueError, match="binary"):
        majority_vote([np.array([0, 2])])


def test_score_averaging_golden():
    s1, s2 = np.array([1.0, 4.0]), np.array([3.0, 0.0])
    np.testing.assert_allclose(average_scores([s1, s2], weights=[1, 3]), [2.5, 1.0])
    with pytest.raises(ValueError, match="shapes"):
        average_scores([s1, np.zeros(3)])
