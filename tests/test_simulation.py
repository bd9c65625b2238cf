"""End-to-end Flower simulation on real CIFAR-10 (Ray, real processes)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedprune.config import load_config


@pytest.mark.slow
def test_three_clients_two_rounds_end_to_end(tmp_path, data_root):
    from safetensors.numpy import load_file

    from server.simulate import simulate

    cfg = load_config("default", [
        "data.num_clients=3", "data.partitioner=iid", "data.train_subset=3000",
        "data.test_subset=1000",
        "model.width=8", "mask.density=0.2", "fed.rounds=2", "fed.fraction_evaluate=1.0",
        f"run.out_dir={tmp_path}",
        "run.name=e2e",
    ])
    summary = simulate(cfg, tmp_path / "e2e")
    run = tmp_path / "e2e"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["clients"] == 3 and r["failures"] == 0 for r in rows[1:])
    assert rows[-1]["accuracy"] > 0.15  # chance is 0.10
    # federated evaluation ran on the clients' partitions every round
    assert all(0.0 <= r["fed_accuracy"] <= 1.0 and r["fed_loss"] > 0 for r in rows[1:])
    assert summary["final_accuracy"] == rows[-1]["accuracy"]
    assert 0 < summary["bytes_vs_dense"] < 0.5
    for name in ("summary.json", "metrics.csv", "config.yaml", "accuracy.png",
                 "partition.csv", "partition_heatmap.png"):
        assert (run / name).exists(), name
    weights, masks = load_file(str(run / "model.safetensors")), load_file(str(run / "mask.safetensors"))
    kept = total = 0
    for name, mask in masks.items():
        mask = mask.astype(bool)
        assert np.all(weights[name][~mask] == 0), name  # pruned weights exactly zero
        assert np.count_nonzero(weights[name][mask]) > 0.99 * mask.sum()
        kept, total = kept + mask.sum(), total + mask.size
    assert kept == round(0.2 * total)
