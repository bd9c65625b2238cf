"""Pooled federated pruning (Flower-free core): clients send only per-block sums, the
server prunes block by block; the result equals centralized sequential pruning on the
union of the clients' windows (masks identical for Wanda, weights allclose for SparseGPT
and ADMM), for unstructured and 2:4 sparsity, on a tiny Llama with grouped-query
attention, and on a real SmolLM2-135M block."""

from __future__ import annotations

import copy

import pytest
import torch

import fedprune.prune.methods  # noqa: F401  (registers the methods)
from fedprune.lm.tiny_models import tiny_llama
from fedprune.prune.base import SparsityTarget, get_pruner
from fedprune.prune.pipeline import prune_model
from fedprune.prune.pooled import PooledClient, PooledServer


def _federated(model, pruner, target, client_windows):
    server = PooledServer(copy.deepcopy(model), pruner, target)
    clients = [PooledClient(copy.deepcopy(model), [w], pruner.needs) for w in client_windows]
    update = None
    for index in range(len(server.blocks)):
        stats = [c.block_stats(index, update) for c in clients]
        update = server.prune_block(index, stats)
    return server


def _windows(seed, n, length=24):
    return torch.randint(3, 250, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method, pattern", [("wanda", ""), ("wanda", "2:4"),
                                             ("sparsegpt", ""), ("sparsegpt", "2:4"),
                                             ("admm", ""), ("magnitude", "")])
def test_pooled_equals_centralized_sequential_on_the_union(method, pattern):
    model = tiny_llama(seed=1)
    target = SparsityTarget.parse(0.5, pattern or None)
    parts = [_windows(s, n) for s, n in ((1, 3), (2, 1), (3, 4))]  # unequal clients
    server = _federated(model, get_pruner(method), target, parts)
    central = copy.deepcopy(model)
    report = prune_model(central, get_pruner(method), target, [torch.cat(parts)],
                         sequential=True, progress=False)
    assert set(server.masks) == set(report.masks)
    for name, mask in report.masks.items():
        assert torch.equal(server.masks[name], mask), name
    for (name, a), b in zip(server.model.named_parameters(), central.parameters()):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), name
    assert report.overall_sparsity == pytest.approx(0.5, abs=1e-9)


def test_one_client_alone_prunes_differently_from_the_pool():
    """Not trivially equal: a client's own statistics alone give another mask."""
    model = tiny_llama(seed=1)
    parts = [_windows(1, 3), _windows(2, 3)]
    pooled = _federated(model, get_pruner("wanda"), SparsityTarget(0.5), parts).masks
    alone = _federated(model, get_pruner("wanda"), SparsityTarget(0.5), parts[:1]).masks
    assert any(not torch.equal(pooled[n], alone[n]) for n in pooled)


def test_clients_follow_the_block_order_and_a_bad_update_is_refused():
    model = tiny_llama(seed=1)
    client = PooledClient(copy.deepcopy(model), [_windows(1, 2)], frozenset({"sq_norm"}))
    with pytest.raises(ValueError, match="asked for block 1"):
        client.block_stats(1, None)
    stats = client.block_stats(0, None)
    assert all(s.rows == 2 * 24 for s in stats.values())  # tokens x windows, one per row
    with pytest.raises(ValueError, match="update must hold exactly"):
        client.block_stats(1, {"nope": torch.zeros(1)})


def test_a_client_without_its_cache_replays_the_finished_blocks_to_the_same_inputs():
    """A resumed run's client recomputes block k's inputs from the saved updates of blocks
    0..k-1: the same tensors the client that never stopped holds (4-block Llama)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedprune.prune.adapters import adapter_for
    from fedprune.prune.pooled import replay_inputs

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=4, num_attention_heads=4,
                                         max_position_embeddings=64)).eval()
    pruner, windows = get_pruner("sparsegpt"), [_windows(1, 2)]
    server = PooledServer(copy.deepcopy(model), pruner, SparsityTarget(0.5))
    client = PooledClient(copy.deepcopy(model), windows, pruner.needs)
    updates, update = [], None
    for index in range(3):
        update = server.prune_block(index, [client.block_stats(index, update)])
        updates.append(update)
    client.block_stats(3, update)  # now holds the inputs of block 3
    adapter = adapter_for(model)
    replayed = replay_inputs(adapter, copy.deepcopy(model), windows, updates)
    assert len(replayed) == len(client.inputs)
    for a, b in zip(replayed, client.inputs):
        assert torch.equal(a.hidden, b.hidden)
    shorter = replay_inputs(adapter, copy.deepcopy(model), windows, updates[:1])
    assert not torch.equal(shorter[0].hidden, replayed[0].hidden)


@pytest.mark.slow
def test_pooled_equals_centralized_on_a_real_smollm2_block():
    """SmolLM2-135M (the package's weights), two clients with different PTB windows: block
    0 pruned by Wanda from the pooled sums equals block 0 of centralized pruning on the
    union (SparseGPT's equality is checked on the tiny Llama above, every block)."""
    from fedprune.lm.calib import sample_windows
    from fedprune.lm.loading import load_causal_lm
    from fedprune.lm.tokens import encode_split

    model, tokenizer = load_causal_lm("smollm2-135m")
    ids = encode_split(tokenizer, "ptb", "train")
    parts = [sample_windows(ids, 2, 32, seed) for seed in (1, 2)]
    pruner, target = get_pruner("wanda"), SparsityTarget(0.5)
    server = PooledServer(copy.deepcopy(model), pruner, target)
    clients = [PooledClient(model, [w], pruner.needs) for w in parts]  # read-only here
    server.prune_block(0, [c.block_stats(0, None) for c in clients])
    central = copy.deepcopy(model)
    report = prune_model(central, pruner, target, [torch.cat(parts)], sequential=False,
                         progress=False)  # block 0 sees the dense inputs either way
    block0 = list(server.masks)
    assert len(block0) == 7 and all(n.startswith("model.layers.0.") for n in block0)
    for name in block0:
        assert torch.equal(server.masks[name], report.masks[name]), name


def test_compact_statistics_send_each_distinct_gram_once_as_a_triangle():
    """q and k read one input: k's Gram goes as a reference to q's; every Gram as its
    upper triangle. The server decodes the same symmetric matrices, and a reply that
    refers to a Gram of another width is rejected."""
    import numpy as np

    from fedprune.fl.replies import ReplyError
    from fedprune.methods.pooled import _stats_spec, encode_stats
    from fedprune.prune.base import LayerStats

    x, y = torch.randn(10, 4), torch.randn(10, 3)
    stats = {}
    for name, rows in (("q", x), ("k", x), ("o", y)):
        stats[name] = LayerStats.empty(rows.shape[1], with_gram=True)
        stats[name].add_batch_(rows)
    compact = encode_stats(stats, compact=True)
    assert set(compact) == {"sq/q", "rows/q", "gram/q", "sq/k", "rows/k", "gram-as/k",
                            "sq/o", "rows/o", "gram/o"}
    assert compact["gram/q"].shape == (10,) and int(compact["gram-as/k"]) == 0
    full = encode_stats(stats)
    assert sum(a.nbytes for a in compact.values()) < 0.6 * sum(a.nbytes for a in full.values())
    spec = _stats_spec({"q": 4, "k": 4, "o": 3}, True, {"q": 1, "k": 1, "o": 1})
    decoded = spec.records["arrays"](compact, "client 0", "arrays")
    for name, s in stats.items():
        upper = torch.triu(s.gram)
        assert torch.equal(decoded[name].gram, upper + torch.triu(upper, 1).T)
        assert torch.equal(decoded[name].sq_norm, s.sq_norm) and decoded[name].rows == 10
    bad = {**compact, "gram-as/o": np.array(0, np.int64)}
    del bad["gram/o"]
    with pytest.raises(ReplyError, match="no Gram of this width"):
        spec.records["arrays"](bad, "client 0", "arrays")
