"""Every mask method end to end through a real Flower simulation (3 clients, CIFAR-10):
it finishes at the target density and records what moved."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedprune.config import load_config

SMALL = ["data.num_clients=3", "data.train_subset=600", "data.test_subset=200",
         "model.width=4", "mask.density=0.1", "fed.rounds=3", "train.max_steps=2"]

METHODS = {
    "snip": ["mask.init=snip", "mask.score_batches=2"],
    "synflow_vote": ["mask.init=synflow", "mask.consensus=vote"],
    "prunefl": ["dst.method=prunefl", "dst.r_end=3"],
    "feddst": ["dst.method=feddst", "dst.r_end=3", "dst.alpha=0.5"],
    "fedtiny_blocks": ["fedtiny.delta_r=1", "fedtiny.r_end=3", "fedtiny.granularity=block",
                       "fedtiny.order=reverse"],
    # channel granularity: width-4 layers need a looser target to keep a channel each
    "gates": ["gates.rounds=2", "gates.lam=0.01", "mask.density=0.3"],
}


def _rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_method_end_to_end(method, tmp_path, data_root):
    from safetensors.numpy import load_file

    from server.simulate import simulate

    cfg = load_config("default", [*SMALL, *METHODS[method], f"run.out_dir={tmp_path}",
                                  f"run.name={method}"])
    run = tmp_path / method
    summary = simulate(cfg, run)
    masks = {n: m.astype(bool) for n, m in load_file(str(run / "mask.safetensors")).items()}
    weights = load_file(str(run / "model.safetensors"))
    kept, total = sum(int(m.sum()) for m in masks.values()), sum(m.size for m in masks.values())
    for name, mask in masks.items():
        assert np.all(weights[name][~mask] == 0), name
    rows = _rows(run)
    assert len(rows) == 4 and all(r["failures"] == 0 for r in rows[1:])
    if method == "gates":  # channel granularity: at most the target, whole output rows
        assert 0.2 < kept / total <= 0.3
        conv = masks["layers.0.0.conv1.weight"].reshape(masks["layers.0.0.conv1.weight"].shape[0], -1)
        assert set(conv.all(1) | ~conv.any(1)) == {True}  # every row all kept or all pruned
        assert rows[2]["adjusted_layer"] == "gates" and rows[1]["density"] == 1.0
        assert summary["density"] == pytest.approx(kept / total)
        return
    assert kept == round(0.1 * total)  # exact density
    if method in ("snip", "synflow_vote"):
        record = json.loads((run / "score_init.json").read_text())
        assert record["clients"] == 3 and record["bytes_up"] > 0
        return
    moved = [r["adjusted_layer"] for r in rows[1:]]
    assert moved[0] and moved[1] and moved[2] == ""  # rounds 1, 2 adjust; 3 = r_end
    if method == "fedtiny_blocks":  # reverse order: the classifier block, then the last block
        assert moved[0] == "fc.weight"
        assert moved[1].split(",") == ["layers.2.0.conv1.weight", "layers.2.0.conv2.weight",
                                       "layers.2.0.shortcut.0.weight"]
    else:
        assert moved[0] == "all" and rows[1]["adjusted_k"] > 0
