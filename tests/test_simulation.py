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


@pytest.mark.slow
def test_adaptive_bn_selection_before_training(tmp_path, data_root):
    """FedTiny coarse pruning as two real query rounds, then training at the target density."""
    from safetensors.numpy import load_file

    from server.simulate import simulate

    cfg = load_config("default", [
        "data.num_clients=3", "data.train_subset=900", "data.test_subset=300",
        "model.width=4", "mask.density=0.1", "fed.rounds=1", "train.max_steps=2",
        "method.name=fedtiny", "method.candidates=4", f"run.out_dir={tmp_path}", "run.name=bn",
    ])
    summary = simulate(cfg, tmp_path / "bn")
    sel = json.loads((tmp_path / "bn" / "selection.json").read_text())
    assert sel["candidates"][:3] == ["uniform", "erk", "global_magnitude"]
    assert sel["clients_stats"] == 3 and sel["clients_losses"] == 3
    assert sel["chosen"] == sel["candidates"][int(np.argmin(sel["weighted_losses"]))]
    assert sel["bytes_down"] > 0 and sel["bytes_up"] > 0
    assert summary["selection"]["chosen"] == sel["chosen"]
    masks = load_file(str(tmp_path / "bn" / "mask.safetensors"))
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept == round(0.1 * sum(m.size for m in masks.values()))


@pytest.mark.slow
def test_fedtiny_progressive_pruning_end_to_end(tmp_path, data_root):
    """BN selection, then two scheduled layers move by top-K growth; density stays exact."""
    from safetensors.numpy import load_file

    from fedprune.fedtiny.candidates import build_candidates
    from fedprune.fl.server_core import SparseServer, load_state_
    from fedprune.models import build_model
    from server.simulate import simulate

    overrides = ["data.num_clients=3", "data.train_subset=900", "data.test_subset=300",
                 "model.width=4", "mask.density=0.1", "fed.rounds=3", "train.max_steps=3",
                 "method.name=fedtiny", "method.candidates=3", "method.delta_r=1",
                 "method.r_end=3", "method.alpha=0.3", f"run.out_dir={tmp_path}",
                 "run.name=ft"]
    cfg = load_config("default", overrides)
    simulate(cfg, tmp_path / "ft")
    rows = [json.loads(x) for x in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    moved = [r["adjusted_layer"] for r in rows[1:]]
    assert moved[0] and moved[1] and moved[2] == ""  # rounds 1 and 2 adjust, 3 >= r_end
    assert moved[0] != moved[1] and all(r["adjusted_k"] >= 0 for r in rows)
    chosen = json.loads((tmp_path / "ft" / "selection.json").read_text())["chosen"]
    dense = build_model(cfg.model, cfg.data.dataset)
    load_state_(dense, SparseServer(cfg).initial_state)
    start = dict(build_candidates(dense, 0.1, 3, cfg.mask.seed))[chosen]
    final = load_file(str(tmp_path / "ft" / "mask.safetensors"))
    for name, mask in final.items():
        before = start[name].numpy()
        assert int(mask.sum()) == int(before.sum()), name  # per-layer count unchanged
        changed = bool((mask.astype(bool) != before).any())
        assert changed == (name in moved[:2]), name  # only the scheduled layers moved
    weights = load_file(str(tmp_path / "ft" / "model.safetensors"))
    for name, mask in final.items():
        assert np.all(weights[name][~mask.astype(bool)] == 0), name
