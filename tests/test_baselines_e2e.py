"""Contract: every registered method runs end to end through the same dispatch (the real
Flower simulation, 3 clients, CIFAR-10): it finishes at its target density, every reply
is accepted, and it records what moved."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedprune.config import load_config
from fedprune.methods import method_names

SMALL = ["data.num_clients=3", "data.train_subset=600", "data.test_subset=200",
         "model.width=4", "mask.density=0.1", "fed.rounds=3", "train.max_steps=2"]

METHODS = {
    "fixed_random": ["method.name=fixed", "method.init=random"],
    "snip": ["method.name=snip", "method.score_batches=2"],
    "synflow_vote": ["method.name=synflow", "method.consensus=vote"],
    "prunefl": ["method.name=prunefl", "method.r_end=3"],
    "feddst": ["method.name=feddst", "method.r_end=3", "method.alpha=0.5"],
    # one dense warm-up round, then adaptive BN selection on that model, then progressive
    "fedtiny_warmup": ["method.name=fedtiny", "method.candidates=3", "method.warmup_rounds=1",
                       "method.delta_r=1", "method.r_end=3"],
    "fedtiny_blocks": ["method.name=fedtiny", "method.delta_r=1", "method.r_end=3",
                       "method.granularity=block", "method.order=reverse"],
    # channel granularity: width-4 layers need a looser target to keep a channel each
    "gates": ["method.name=gates", "method.rounds=2", "method.lam=0.01", "mask.density=0.3"],
    # channels physically removed after round 2, Taylor evidence from the clients
    "channel-prune_taylor": ["method.name=channel-prune", "method.criterion=taylor",
                             "method.prune_round=2", "method.fraction=0.3",
                             "method.evidence_batches=1"],
    # a ViT; in round 2 the clients score three token-pruning schedules on their data
    "token-select": ["method.name=token-select", "model.name=vit", "method.select_round=2",
                     "method.eval_batches=1", "method.flops_budget=0.8", "mask.density=0.3"],
}


def test_the_contract_covers_every_registered_method():
    """Every training method runs here; the one-shot ones (federated LLM pruning) run end
    to end in tests/test_fedllm.py."""
    from fedprune.methods import method_class

    trained = {m for m in method_names() if not method_class(m).config_cls.one_shot}
    assert {m.split("_")[0] for m in METHODS} == trained
    assert set(method_names()) - trained == {"pooled", "mask-vote", "l0-average", "structured"}


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
    if method.startswith("channel-prune"):
        _check_channel_prune(rows, weights, summary)
        return
    if method == "token-select":
        choice = summary["method_report"]["token_selection"]
        assert choice["round"] == 2 and choice["clients"] == 3 and len(choice["loss"]) == 3
        allowed = [k for k, f in enumerate(choice["flops_ratio"]) if f <= 0.8]
        assert choice["allowed"] == allowed and choice["chosen"] in allowed
        assert choice["chosen"] == min(allowed, key=lambda k: choice["loss"][k])
        assert kept == round(0.3 * total)
        return
    assert kept == round(0.1 * total)  # exact density
    if method in ("snip", "synflow_vote"):
        record = json.loads((run / "selection.json").read_text())
        assert record["clients"] == 3 and record["bytes_up"] > 0 and record["rejected"] == 0
        return
    if method == "fixed_random":
        assert all(r["adjusted_layer"] == "" for r in rows)
        return
    if method == "fedtiny_warmup":
        record = json.loads((run / "selection.json").read_text())
        assert record["after_round"] == 1 and record["clients_losses"] == 3
        assert record["chosen"] in record["candidates"] and "margin" in record
        assert rows[1]["density"] == 1.0 and rows[1]["adjusted_layer"] == ""  # dense warm-up
        assert rows[2]["density"] == pytest.approx(0.1, abs=0.01)  # the selected mask
        assert rows[2]["adjusted_layer"] and rows[3]["adjusted_layer"] == ""  # r_end = 3
        return
    moved = [r["adjusted_layer"] for r in rows[1:]]
    assert moved[0] and moved[1] and moved[2] == ""  # rounds 1, 2 adjust; 3 = r_end
    if method == "fedtiny_blocks":  # reverse order: the classifier block, then the last block
        assert moved[0] == "fc.weight"
        assert moved[1].split(",") == ["layers.2.0.conv1.weight", "layers.2.0.conv2.weight",
                                       "layers.2.0.shortcut.0.weight"]
    else:
        assert moved[0] == "all" and rows[1]["adjusted_k"] > 0


def _check_channel_prune(rows, weights, summary):
    """Round 2 removed channels: later payloads and the saved model are smaller, and the
    saved tensors load into the registry model shrunk to the recorded channel counts."""
    from fedprune.config import ModelConfig
    from fedprune.models import build_model

    assert [r["adjusted_layer"] for r in rows[1:]] == ["", "channels", ""]
    assert rows[3]["bytes_down_per_client"] < rows[1]["bytes_down_per_client"]
    dense = build_model(ModelConfig(name="resnet8", width=4), "cifar10")
    n_dense = sum(p.numel() for p in dense.parameters())
    n_saved = sum(v.size for k, v in weights.items() if "running" not in k and
                  "num_batches" not in k)
    assert 0.6 * n_dense < n_saved < 0.8 * n_dense  # fraction 0.3 of the parameters
