"""Paired comparisons over seeds: golden intervals computed by hand."""

from __future__ import annotations

import math

import pytest

from fedprune.fedtiny.candidates import select_candidate, selection_margin
from fedprune.study import (mean_interval, paired_difference, t_critical,
                            weighted_mean_interval)


def test_t_quantiles_from_the_table_and_the_expansion():
    assert t_critical(2) == 4.303 and t_critical(4) == 2.776 and t_critical(30) == 2.042
    assert t_critical(40) == pytest.approx(2.021, abs=1e-3)  # tables: 2.021
    assert t_critical(120) == pytest.approx(1.980, abs=1e-3)  # tables: 1.980
    with pytest.raises(ValueError, match="at least 2 values"):
        t_critical(0)


def test_mean_interval_by_hand():
    # values 1, 2, 3: mean 2, sd 1, half-width t_{0.975,2} * 1 / sqrt(3)
    got = mean_interval([1.0, 2.0, 3.0])
    assert got.mean == 2.0 and got.n == 3
    assert got.half_width == pytest.approx(4.303 / math.sqrt(3))
    assert got.low == pytest.approx(-0.4843, abs=1e-4) and not got.distinguishable
    assert mean_interval([1.0, 1.1, 0.9]).distinguishable  # [0.75, 1.25] excludes zero
    one = mean_interval([0.7])
    assert one.mean == 0.7 and math.isnan(one.half_width) and not one.distinguishable


def test_pairing_removes_the_shared_seed_spread():
    # method a is b + 0.01 on every seed; the seeds themselves differ by up to 0.1
    b = {0: 0.50, 1: 0.60, 2: 0.40}
    a = {s: v + 0.01 + 0.001 * s for s, v in b.items()}
    diff = paired_difference(a, b)
    assert diff.mean == pytest.approx(0.011) and diff.distinguishable
    # unpaired, the two intervals overlap almost entirely
    assert mean_interval(list(a.values())).low < mean_interval(list(b.values())).high
    # a difference that changes sign is not distinguishable
    mixed = paired_difference({0: 0.51, 1: 0.58, 2: 0.41}, b)
    assert not mixed.distinguishable and mixed.low < 0 < mixed.high
    # only common seeds count
    assert paired_difference({0: 1.0, 5: 9.0}, {0: 0.5, 1: 0.0}).n == 1
    with pytest.raises(ValueError, match="share no seed"):
        paired_difference({0: 1.0}, {1: 1.0})


def test_weighted_mean_interval_by_hand():
    # values 1, -1 with weights 3, 1: mean 0.5; var = 2/1 * ((3*0.5)^2 + (1*1.5)^2) / 4^2
    # = 9/16, so the half-width is t_{0.975,1} * 0.75
    got = weighted_mean_interval([1.0, -1.0], [3, 1])
    assert got.mean == 0.5 and got.half_width == pytest.approx(12.706 * 0.75)
    # equal weights: exactly the unweighted interval
    same = weighted_mean_interval([1.0, 2.0, 3.0], [5, 5, 5])
    assert same.mean == 2.0 and same.half_width == pytest.approx(4.303 / math.sqrt(3))
    with pytest.raises(ValueError, match="3 values for 2 weights"):
        weighted_mean_interval([1.0, 2.0, 3.0], [1, 1])
    with pytest.raises(ValueError, match="positive sum"):
        weighted_mean_interval([1.0], [0])


def test_selection_margin_has_the_sign_of_the_weighted_choice():
    # two small clients prefer candidate 0, one large client prefers candidate 1: the
    # example-weighted choice is 1, though the unweighted mean difference favours 0
    losses = [[1.0, 1.2], [1.0, 1.2], [1.0, 0.9]]
    counts = [1, 1, 10]
    best = select_candidate(losses, counts)
    assert best == 1
    margin = selection_margin(losses, best, 0, counts)
    # weighted losses: candidate 0 1.0, candidate 1 (1.2 + 1.2 + 10 * 0.9) / 12 = 0.95
    assert margin["margin"] == pytest.approx(0.05)
    assert selection_margin(losses, best, 0)["margin"] == pytest.approx(-0.1)  # unweighted
