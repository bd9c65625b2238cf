"""The federated one-shot protocols on a trained CNN (the same methods as for language
models, ``method.model=cnn``): CIFAR-10 clients with Dirichlet label skew calibrate on
their own images; pooled equals centralized pruning on the union of their calibration
images, mask-vote is the vote over the clients' own results; the run reports accuracy."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from fedprune.config import ConfigError, ModelConfig, load_config

BASE = ["data.dataset=cifar10", "data.num_clients=3", "data.partitioner=dirichlet",
        "data.alpha=0.5", "data.train_subset=600", "data.test_subset=200",
        "model.name=resnet8", "model.width=4", "method.model=cnn", "method.calib_images=16",
        "fed.rounds=0", "fed.min_train_clients=2"]


@pytest.fixture()
def weights(tmp_path):
    """A seeded 'trained' ResNet-8 (random weights stand in: the protocols do not care)."""
    from safetensors.torch import save_file

    from fedprune.models import build_model

    torch.manual_seed(3)
    model = build_model(ModelConfig(name="resnet8", width=4), "cifar10")
    path = tmp_path / "resnet8.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _run(tmp_path, weights, overrides, name="run"):

    from client.client_app import app as client_app
    from fedprune.methods import method_class
    from server.experiment import run_oneshot
    from flower_helpers import FakeGrid, node_context, set_identity

    cfg = load_config("default", [*BASE, f"method.weights={weights}",
                                  f"data.cache_dir={tmp_path}/cache", *overrides])

    def answer(msg):
        pid = msg.metadata.dst_node_id - 1
        set_identity(msg.metadata.dst_node_id)
        return client_app(copy.deepcopy(msg), node_context(cfg, pid, 3))

    summary = run_oneshot(FakeGrid([1, 2, 3], answer), cfg, tmp_path / name,
                          method_class(cfg.method.name))
    return cfg, summary


def _clients_and_dense(cfg):
    from fedprune.fl.oneshot import client_batches, fresh_dense

    dense, _ = fresh_dense(cfg)
    return dense, [client_batches(cfg, pid, None) for pid in range(3)]


@pytest.mark.parametrize("pruner", ["wanda", "sparsegpt"])
def test_pooled_cnn_equals_centralized_on_the_union_of_calibration_images(
        pruner, tmp_path, weights, data_root):
    from safetensors.torch import load_file

    from fedprune.prune.base import SparsityTarget, get_pruner
    from fedprune.prune.pipeline import prune_model

    cfg, summary = _run(tmp_path, weights, ["method.name=pooled", f"method.pruner={pruner}"])
    assert summary["metric"] == "accuracy" and set(summary["accuracy_pruned"]) == {"test"}
    assert 0 <= summary["accuracy_pruned"]["test"] <= 1
    assert summary["record"]["contributors"] == [[0, 1, 2]]  # one block: the whole CNN
    dense, clients = _clients_and_dense(cfg)
    assert [sum(len(b) for b in c) for c in clients] == [16, 16, 16]
    prune_model(dense, get_pruner(pruner), SparsityTarget(0.5),
                [b for c in clients for b in c], progress=False)
    saved = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    for name, value in dense.state_dict().items():
        torch.testing.assert_close(saved[name], value, atol=1e-5, rtol=1e-4)


def test_mask_vote_cnn_is_the_vote_over_the_clients_own_results(tmp_path, weights,
                                                                 data_root):
    from safetensors.torch import load_file

    from fedprune.prune.adapters import adapter_for
    from fedprune.prune.base import SparsityTarget, get_pruner
    from fedprune.prune.consensus import mask_vote
    from fedprune.prune.pipeline import prune_model

    cfg, summary = _run(tmp_path, weights, ["method.name=mask-vote"])
    assert summary["sparsity"] == pytest.approx(0.5, abs=1e-3)
    dense, clients = _clients_and_dense(cfg)
    masks = []
    for batches in clients:
        local = copy.deepcopy(dense)
        masks.append(prune_model(local, get_pruner("wanda"), SparsityTarget(0.5), batches,
                                 progress=False).masks)
    adapter = adapter_for(dense)
    saved = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    layers = adapter.prunable(adapter.blocks(dense)[0])
    for name, module in layers.items():
        flat = [adapter.from_native(module, m[name]) for m in masks]
        expected, _ = mask_vote(flat, adapter.get_matrix(module).detach(), SparsityTarget(0.5))
        got = adapter.from_native(module, saved[f"{name}.weight"])
        torch.testing.assert_close(got, expected)


def test_cnn_weights_are_checked_and_only_for_cnns(tmp_path, weights):
    with pytest.raises(ConfigError, match="method.weights=.*is for method.model=cnn"):
        load_config("default", ["method.name=pooled", "fed.rounds=0",
                                f"method.weights={weights}"])
    from fedprune.fl.oneshot import load_dense

    cfg = load_config("default", [*BASE, "method.name=pooled", "model.width=8",
                                  f"method.weights={weights}"])
    with pytest.raises(ValueError, match="does not hold a resnet8 \\(width 8\\)"):
        load_dense(cfg)


@pytest.mark.slow
def test_secure_pooled_cnn_in_a_flower_simulation(tmp_path, weights, data_root):
    """The whole path in Flower's simulation runtime: a trained CNN, 3 non-IID CIFAR-10
    clients, pooled SparseGPT with the statistics summed under SecAgg+."""
    from server.simulate import simulate

    cfg = load_config("default", [*BASE, "method.name=pooled", "method.pruner=sparsegpt",
                                  f"method.weights={weights}", "secagg.enabled=true",
                                  f"data.cache_dir={tmp_path}/cache",
                                  f"run.out_dir={tmp_path}", "run.name=cnn"])
    summary = simulate(cfg, tmp_path / "cnn")
    rows = [json.loads(x) for x in (tmp_path / "cnn" / "metrics.jsonl").read_text()
            .splitlines()]
    # SparseGPT under SecAgg+: the squared norms, then the Grams they scale
    assert [r["phase"] for r in rows] == ["sq", "gram"]
    assert all(r["secure"] and r["clients"] == 3 and r["clipped"] == 0 for r in rows)
    assert summary["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert (tmp_path / "cnn" / "model" / "model.safetensors").is_file()
