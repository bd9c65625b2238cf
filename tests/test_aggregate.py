"""Example-weighted aggregation: exact golden arrays."""

from __future__ import annotations

import numpy as np
import pytest

from fedprune.fl.aggregate import weighted_average


def test_weighted_average_golden():
    a = {"w": np.array([[1.0, 0.0], [0.0, 4.0]], np.float32), "nbt": np.array(3, np.int64)}
    b = {"w": np.array([[3.0, 0.0], [0.0, 0.0]], np.float32), "nbt": np.array(7, np.int64)}
    out = weighted_average([a, b], [1, 3])
    # (1*1 + 3*3)/4 = 2.5 ; (1*4 + 3*0)/4 = 1.0 ; pruned positions stay exactly 0
    np.testing.assert_array_equal(out["w"], np.array([[2.5, 0.0], [0.0, 1.0]], np.float32))
    assert out["w"].dtype == np.float32
    assert out["nbt"] == 5 and out["nbt"].dtype == np.int64  # counters: median (3, 7) -> 5
    assert isinstance(out["nbt"], np.ndarray)  # 0-d array (Flower rejects numpy scalars)


def test_unweighted_mean_would_differ():
    a, b = {"w": np.array([0.0])}, {"w": np.array([10.0])}
    assert weighted_average([a, b], [9, 1])["w"][0] == pytest.approx(1.0)


def test_mismatched_states_are_rejected():
    with pytest.raises(ValueError, match="tensors"):
        weighted_average([{"a": np.zeros(1)}, {"b": np.zeros(1)}], [1, 1])
    with pytest.raises(ValueError, match="weights"):
        weighted_average([{"a": np.zeros(1)}], [1, 2])
    with pytest.raises(ValueError, match="positive sum"):
        weighted_average([{"a": np.zeros(1)}], [0])


def test_one_client_cannot_set_a_counter():
    """num_batches_tracked used to take the maximum, so one client set it to 2^62."""
    states = [{"n": np.array(v, np.int64)} for v in (10, 12, 2**62)]
    assert weighted_average(states, [1, 1, 1])["n"] == 12
