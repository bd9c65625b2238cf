"""Adaptive BN selection: candidates at exact density; the planted best candidate wins."""

from __future__ import annotations

import pytest

from fedprune.config import ModelConfig
from fedprune.fedtiny.candidates import build_candidates, select_candidate
from fedprune.masks import kept_counts
from fedprune.models import build_model


def test_candidates_differ_in_allocation_at_exact_density():
    model = build_model(ModelConfig(name="resnet8", width=8))
    cands = build_candidates(model, 0.05, count=6, seed=1)
    assert [n for n, _ in cands][:3] == ["uniform", "erk", "global_magnitude"]
    totals = {sum(kept_counts(m).values()) for _, m in cands}
    total = sum(m.numel() for m in cands[0][1].values())
    assert totals == {round(0.05 * total)}
    allocations = {tuple(kept_counts(m).values()) for _, m in cands}
    assert len(allocations) == 6  # six different layer-wise allocations
    again = build_candidates(model, 0.05, count=6, seed=1)
    assert all(tuple(kept_counts(a).values()) == tuple(kept_counts(b).values())
               for (_, a), (_, b) in zip(cands, again))  # seeded


def test_planted_best_candidate_is_selected():
    # candidate 2 is best on the big client although client 0 prefers candidate 0
    losses = [[0.5, 2.0, 1.0], [3.0, 2.5, 1.2], [2.0, 2.0, 1.1]]
    counts = [10, 100, 50]
    assert select_candidate(losses, counts) == 2
    # an unweighted mean would pick the same here; weights decide this one:
    assert select_candidate([[0.0, 1.0], [2.0, 1.0]], [1, 9]) == 1
    assert select_candidate([[0.0, 1.0], [2.0, 1.0]], [9, 1]) == 0
    with pytest.raises(ValueError, match="different numbers"):
        select_candidate([[1.0], [1.0, 2.0]], [1, 1])
    # equal error rates: the tie-break (the weighted loss) decides, not the order
    errors = [[0.9, 0.8, 0.8], [0.9, 0.8, 0.8]]
    assert select_candidate(errors, [1, 1]) == 1
    assert select_candidate(errors, [1, 1], tie_break=[2.3, 2.5, 2.4]) == 2


def test_warmup_settings_are_checked():
    import pytest

    from fedprune.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="method.candidates=0"):
        load_config("default", ["method.name=fedtiny", "method.warmup_rounds=2"])
    with pytest.raises(ConfigError, match="leaves no round after the selection"):
        load_config("default", ["method.name=fedtiny", "method.candidates=3",
                                "method.warmup_rounds=15", "fed.rounds=15"])
    with pytest.raises(ConfigError, match="method.warmup_mask"):
        load_config("default", ["method.name=fedtiny", "method.warmup_mask=sparse"])
    with pytest.raises(ConfigError, match="method.select_on"):
        load_config("default", ["method.name=fedtiny", "method.select_on=accuracy"])
