"""Federated pruning of a language model on Flower: the `pooled` method end to end in a
real simulation (3 text clients, tiny Llama): every block pooled from all clients, the
model saved with save_pretrained, and the result equal to centralized pruning on the
union of the clients' windows; its statistics replies checked by the validation layer."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from fedprune.config import ConfigError, load_config

LLM = ["method.name=pooled", "method.model=tiny-llama", "fed.rounds=0", "data.num_clients=3",
       "text.windows=2", "text.length=32", "text.eval_windows=2", "text.eval_length=32"]


def test_one_shot_methods_need_zero_training_rounds_and_a_known_pruner():
    with pytest.raises(ConfigError, match="one-shot.*fed.rounds=0"):
        load_config("default", [*LLM, "fed.rounds=3"])
    with pytest.raises(ConfigError, match="method.pruner='lottery'"):
        load_config("default", [*LLM, "method.pruner=lottery"])
    with pytest.raises(ConfigError, match="method.pattern"):
        load_config("default", [*LLM, "method.pattern=5:4"])


@pytest.mark.slow
@pytest.mark.parametrize("pruner", ["wanda", "sparsegpt"])
def test_pooled_on_flower_equals_centralized_pruning_on_the_union(pruner, tmp_path, data_root):
    from transformers import AutoModelForCausalLM

    from fedprune.lm.clients import partition_text
    from fedprune.lm.loading import load_causal_lm
    from fedprune.prune.base import SparsityTarget, get_pruner
    from fedprune.prune.pipeline import prune_model
    from server.simulate import simulate

    cfg = load_config("default", [*LLM, f"method.pruner={pruner}", f"run.out_dir={tmp_path}",
                                  "run.name=llm"])
    run = tmp_path / "llm"
    summary = simulate(cfg, run)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["block"] for r in rows] == [0, 1]  # one query round per block
    assert all(r["clients"] == 3 and r["partitions"] == [0, 1, 2] for r in rows)
    assert summary["record"]["contributors"] == [[0, 1, 2], [0, 1, 2]]
    assert summary["sparsity"] == pytest.approx(0.5, abs=1e-9)
    assert set(summary["perplexity_pruned"]) == {"ptb", "wikitext2", "shakespeare"}
    assert summary["bytes_up"] > 0 and summary["bytes_down"] > 0
    # the client processes' peak memory: at least a loaded torch + transformers (> 100 MB),
    # far below this machine's memory (a wrong unit would be 1024x off either way)
    assert all(100 < r["client_peak_rss_mb"] < 16_000 for r in rows)
    assert summary["client_peak_rss_mb"] == max(r["client_peak_rss_mb"] for r in rows)
    saved = AutoModelForCausalLM.from_pretrained(run / "model")  # plain transformers
    assert (run / "partition_text.csv").exists()

    model, tokenizer = load_causal_lm("tiny-llama")
    windows = [c.windows for c in partition_text(cfg.text, 3, tokenizer)]
    central = copy.deepcopy(model)
    prune_model(central, get_pruner(pruner), SparsityTarget(0.5),
                list(torch.cat(windows).split(1)), sequential=True, progress=False)
    for (name, a), b in zip(saved.named_parameters(), central.parameters()):
        if pruner == "wanda":
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert np.isfinite(list(summary["perplexity_pruned"].values())).all()


def _run_pooled(tmp_path, overrides, tamper, unreachable=lambda block, pid: False,
                on_query=None):
    """The pooled method's query rounds with 4 real text clients through the real ClientApp
    and query runner (FakeGrid, no Ray); ``tamper(block, pid, metrics, arrays)`` may spoil
    a reply before the server sees it; ``unreachable(block, pid)``: the message is lost."""
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    from client.client_app import app as client_app
    from fedprune.methods import method_class
    from server.query import base_spec, run_queries
    from flower_helpers import FakeGrid, error_reply, node_context, set_identity

    cfg = load_config("default", [*LLM, "data.num_clients=4", f"data.cache_dir={tmp_path}",
                                  *overrides])
    cls = method_class(cfg.method.name)  # pooled unless the overrides name another
    core = cls.make_core(cfg)
    method = cls(cfg, core)

    def answer(msg):
        pid = msg.metadata.dst_node_id - 1
        if unreachable(int(msg.content["config"].get("query.block", -1)), pid):
            return None
        set_identity(msg.metadata.dst_node_id)
        try:  # Flower's runtime turns a ClientApp exception into an error reply
            out = client_app(msg, node_context(cfg, pid, 4))
        except ValueError as err:
            return error_reply(msg, str(err))
        metrics = dict(out.content["metrics"])
        arrays = {n: a.numpy() for n, a in out.content["arrays"].items()}
        tamper(int(msg.content["config"].get("query.block", -1)), pid, metrics, arrays)
        return Message(RecordDict({"metrics": MetricRecord(metrics), "arrays": ArrayRecord(
            {k: Array(v) for k, v in arrays.items()})}), reply_to=msg)

    record = run_queries(FakeGrid([1, 2, 3, 4], answer), method,
                         base_spec(cfg, core.client_sizes()), on_query)
    return core, record


@pytest.mark.parametrize("pruner, spoil, field", [
    ("wanda", "nan_norm", "non-finite"),
    ("wanda", "negative_norm", "below the minimum 0.0"),
    ("wanda", "wrong_shape", "shape"),
    ("wanda", "wrong_dtype", "dtype"),
    ("wanda", "rows", "rows"),
    ("wanda", "other_block", "metrics.block"),
    ("sparsegpt", "gram_diagonal", "squared norm"),
    ("sparsegpt", "inf_gram", "non-finite"),
    ("sparsegpt", "gram_alias_forward", "gram-as"),
    ("sparsegpt", "gram_alias_missing", "exactly one of"),
])
def test_bad_statistics_are_rejected_and_the_block_goes_on(pruner, spoil, field, tmp_path,
                                                          data_root, caplog):
    import logging

    def tamper(block, pid, metrics, arrays):
        if pid != 3:  # one bad client of four, every block
            return
        sq = next(k for k in arrays if k.startswith("sq/"))
        gram = next((k for k in arrays if k.startswith("gram/")), None)
        if spoil == "nan_norm":
            arrays[sq] = arrays[sq].copy()
            arrays[sq][0] = np.nan
        elif spoil == "negative_norm":
            arrays[sq] = -arrays[sq]
        elif spoil == "wrong_shape":
            arrays[sq] = arrays[sq][:-1]
        elif spoil == "wrong_dtype":
            arrays[sq] = arrays[sq].astype(np.int64)
        elif spoil == "rows":
            key = next(k for k in arrays if k.startswith("rows/"))
            arrays[key] = np.array(int(arrays[key]) + 1, np.int64)
        elif spoil == "other_block":
            metrics["block"] = block + 1
        elif spoil == "gram_diagonal":  # a triangle's first entry is G[0, 0]
            arrays[gram] = arrays[gram].copy()
            arrays[gram][0] += 1.0 + abs(arrays[gram][0])
        elif spoil == "inf_gram":
            arrays[gram] = arrays[gram].copy()
            arrays[gram][1] = np.inf
        elif spoil == "gram_alias_forward":  # k refers to itself instead of q
            alias = next(k for k in arrays if k.startswith("gram-as/"))
            arrays[alias] = np.array(len(arrays), np.int64)
        elif spoil == "gram_alias_missing":  # neither a triangle nor a reference
            del arrays[next(k for k in arrays if k.startswith("gram-as/"))]
    with caplog.at_level(logging.WARNING):
        core, record = _run_pooled(tmp_path, [f"method.pruner={pruner}"], tamper)
    assert record["contributors"] == [[0, 1, 2], [0, 1, 2]]  # partition 3 never counted
    assert record["rejected"] == 2 and field in caplog.text
    assert sum(core.sparsity().values()) / len(core.sparsity()) == pytest.approx(0.5)


def test_a_client_that_misses_a_block_sits_out_the_rest(tmp_path, data_root, caplog):
    """Partition 2 never gets block 0's message: in block 1 it has no inputs to propagate,
    says so (an error reply), and the block goes on with the others. A client whose reply
    was only rejected (partition 1 in block 0) still holds the right inputs and rejoins."""
    import logging

    def tamper(block, pid, metrics, arrays):
        if block == 0 and pid == 1:
            metrics["num-examples"] = -1
    with caplog.at_level(logging.WARNING):
        core, record = _run_pooled(tmp_path, [], tamper,
                                   unreachable=lambda block, pid: block == 0 and pid == 2)
    assert record["contributors"] == [[0, 3], [0, 1, 3]]
    assert "no inputs of block 0" in caplog.text
    # after the last block no client keeps cached inputs behind
    assert not list((tmp_path / "fedprune-pooled").rglob("client-*.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("protocol, pruner, share", [
    ("mask-vote", "wanda", 1.0), ("l0-average", "sparsegpt", 1.0),
    ("l0-average", "sparsegpt", 0.5)])
def test_local_pruning_protocols_end_to_end(protocol, pruner, share, tmp_path, data_root):
    """Each client prunes on its own text (real Flower simulation, 3 text clients); the
    server's layers are what the combining rule gives on the clients' own results (with
    layer sampling: each client pruned only its blocks, each layer averaged over those
    that pruned it). SparseGPT for l0-average: with Wanda the kept values are the dense
    ones and l0-average reduces to mask-vote."""
    from transformers import AutoModelForCausalLM

    from fedprune.lm.clients import partition_text
    from fedprune.lm.loading import load_causal_lm
    from fedprune.methods.local import sample_blocks
    from fedprune.prune.base import SparsityTarget, get_pruner
    from fedprune.prune.consensus import l0_average, mask_vote
    from fedprune.prune.pipeline import prune_model
    from server.simulate import simulate

    extra = [f"method.sample_blocks={share}"] if share < 1 else []
    cfg = load_config("default", [*LLM, f"method.name={protocol}", f"method.pruner={pruner}",
                                  *extra, f"run.out_dir={tmp_path}", "run.name=llm"])
    summary = simulate(cfg, tmp_path / "llm")
    assert summary["record"]["contributors"] == [0, 1, 2]
    assert summary["sparsity"] == pytest.approx(0.5, abs=1e-9)
    saved = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "llm" / "model")
                 .named_parameters())
    model, tokenizer = load_causal_lm("tiny-llama")
    plans = sample_blocks(2, 3, share, cfg.run.seed) if share < 1 else [[0, 1]] * 3
    if share < 1:
        assert plans != [[0, 1]] * 3 and summary["record"]["clients_per_block"] == [
            sum(b in p for p in plans) for b in (0, 1)]
    own = []  # each client's own result, recomputed here
    for c, plan in zip(partition_text(cfg.text, 3, tokenizer), plans):
        local = copy.deepcopy(model)
        report = prune_model(local, get_pruner(pruner), SparsityTarget(0.5),
                             list(c.windows.split(1)), sequential=True, progress=False,
                             only=set(plan))
        own.append((dict(local.named_parameters()), report.masks))
    dense = dict(model.named_parameters())
    for name in {n for _, m in own for n in m}:
        have = [(p, m[name]) for p, m in own if name in m]
        masks = [m for _, m in have]
        if protocol == "mask-vote":
            expected, _ = mask_vote(masks, dense[f"{name}.weight"].detach(), SparsityTarget(0.5))
        else:
            expected, _ = l0_average([p[f"{name}.weight"].detach() for p, _ in have], masks,
                                     SparsityTarget(0.5))
        torch.testing.assert_close(saved[f"{name}.weight"], expected.float())


def test_layer_sampling_covers_every_block_with_the_quota():
    from fedprune.methods.local import sample_blocks

    plans = sample_blocks(30, 4, 0.25, seed=0)
    assert [len(p) for p in plans] == [8, 8, 8, 8]  # ceil(0.25 x 30) = 8 >= 30 / 4 dealt
    assert set().union(*map(set, plans)) == set(range(30))
    assert plans == sample_blocks(30, 4, 0.25, seed=0) != sample_blocks(30, 4, 0.25, seed=1)
    # more clients than the quota covers: the round-robin share wins where it is larger
    plans = sample_blocks(10, 2, 0.1, seed=3)
    assert [len(p) for p in plans] == [5, 5] and sorted(plans[0] + plans[1]) == list(range(10))
    assert sample_blocks(5, 3, 1.0, 0) == [[0, 1, 2, 3, 4]] * 3


def test_a_client_mask_with_the_wrong_count_is_rejected(tmp_path, data_root, caplog):
    import logging

    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    from client.client_app import app as client_app
    from fedprune.masks import wire
    from fedprune.methods import method_class
    from server.query import base_spec, run_queries
    from flower_helpers import FakeGrid, node_context, set_identity

    cfg = load_config("default", [*LLM, "method.name=mask-vote", f"data.cache_dir={tmp_path}"])
    cls = method_class("mask-vote")
    core = cls.make_core(cfg)

    def answer(msg):
        pid = msg.metadata.dst_node_id - 1
        set_identity(msg.metadata.dst_node_id)
        out = client_app(msg, node_context(cfg, pid, 3))
        arrays = {n: a.numpy() for n, a in out.content["arrays"].items()}
        if pid == 2:  # keeps one weight more than Wanda at 50% keeps
            key = next(iter(arrays))
            shape = tuple(core.model.get_submodule(key.split("/", 1)[1]).weight.shape)
            mask = wire.unpack_mask(arrays[key], shape, key, "test")
            mask.reshape(-1)[np.flatnonzero(~mask.reshape(-1))[0]] = True
            arrays[key] = wire.pack_mask(mask)
        return Message(RecordDict({"metrics": MetricRecord(dict(out.content["metrics"])),
                                   "arrays": ArrayRecord({k: Array(v) for k, v in
                                                          arrays.items()})}), reply_to=msg)

    with caplog.at_level(logging.WARNING):
        record = run_queries(FakeGrid([1, 2, 3], answer), cls(cfg, core),
                             base_spec(cfg, core.client_sizes()))
    assert record["contributors"] == [0, 1] and "the target keeps" in caplog.text


class _Crash(Exception):
    pass


@pytest.mark.parametrize("pruner, secure", [("wanda", False), ("wanda", True),
                                            ("sparsegpt", True)])
def test_an_interrupted_pooled_run_resumes_from_its_last_finished_block(pruner, secure,
                                                                        tmp_path, data_root):
    """The run dies while block 1 (of 2) is being asked; resumed, it redoes
    no finished block (the clients replay block 0 from the saved update) and ends with
    the uninterrupted run's model (Wanda: identical)."""

    from client.client_app import app as client_app
    from fedprune.methods import method_class
    from server.experiment import run_oneshot
    from flower_helpers import FakeGrid, node_context, set_identity

    over = [*LLM, "data.num_clients=3", f"data.cache_dir={tmp_path}/cache",
            "text.eval_windows=1", f"secagg.enabled={str(secure).lower()}",
            f"method.pruner={pruner}"]
    cfg = load_config("default", over)
    cls = method_class("pooled")

    def grid(crash_at=None):
        contexts, asked = {}, []

        def answer(msg):
            msg = copy.deepcopy(msg)  # each node its own copy, as Flower's transport does
            records = msg.content.config_records  # a query, or a SecAgg+ stage
            conf = records.get("config") or records.get("fitins.config") or {}
            block = int(conf.get("query.block", -1))
            if block >= 0 and (not asked or asked[-1] != (block, conf.get("query.replay"))):
                asked.append((block, conf.get("query.replay")))
            if block == crash_at:
                raise _Crash
            pid = msg.metadata.dst_node_id - 1
            set_identity(msg.metadata.dst_node_id)
            context = contexts.setdefault(pid, node_context(cfg, pid, 3))
            return client_app(msg, context)
        return FakeGrid([1, 2, 3], answer), asked

    whole, _ = grid()
    expected = run_oneshot(whole, cfg, tmp_path / "whole", cls)
    first, _ = grid(crash_at=1)
    with pytest.raises(_Crash):
        run_oneshot(first, cfg, tmp_path / "run", cls)
    assert [p.name for p in (tmp_path / "run" / "blocks").iterdir()] == ["block-0000.safetensors"]
    second, asked = grid()
    resumed = run_oneshot(second, cfg, tmp_path / "run", cls, resume=True)
    assert asked[0] == (1, 0)  # block 1 first, the clients replaying nothing before block 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text()
            .splitlines()]
    per_block = 2 if pruner == "sparsegpt" else 1  # secure SparseGPT: two phases a block
    assert [r["block"] for r in rows] == [0] * per_block + [1] * per_block
    assert [r["round"] for r in rows] == list(range(1, 2 * per_block + 1))
    assert resumed["record"]["contributors"] == [[0, 1, 2], [0, 1, 2]]
    assert resumed["perplexity_dense"] == expected["perplexity_dense"]
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / "model")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        if pruner == "sparsegpt":  # updated values from stochastically rounded sums
            assert int(((x == 0) != (y == 0)).sum()) <= 1e-3 * x.numel(), name
            torch.testing.assert_close(x, y, atol=1e-3, rtol=1e-3)
        elif secure:  # the fixed point is stochastically rounded: near-ties may differ
            assert int((x != y).sum()) <= 1e-3 * x.numel(), name
        else:
            assert torch.equal(x, y), name


@pytest.mark.parametrize("pruner", ["wanda", "sparsegpt"])
def test_one_pass_pooled_equals_centralized_non_sequential_pruning(pruner, tmp_path,
                                                                   data_root):
    """method.one_pass: one query round, every layer's statistics from the dense model;
    the result is centralized non-sequential pruning on the union of the clients' windows
    (and not the sequential one)."""
    from fedprune.lm.clients import partition_text
    from fedprune.lm.loading import load_causal_lm
    from fedprune.prune.base import SparsityTarget, get_pruner
    from fedprune.prune.pipeline import prune_model

    rounds = []
    core, record = _run_pooled(tmp_path, [f"method.pruner={pruner}", "method.one_pass=true"],
                               lambda *a: None, on_query=lambda q, r, m: rounds.append(q.kind))
    assert rounds == ["pooled-all"] and record["contributors"] == [[0, 1, 2, 3]]
    model, tokenizer = load_causal_lm("tiny-llama")
    cfg = load_config("default", [*LLM, "data.num_clients=4"])
    union = list(torch.cat([c.windows for c in partition_text(cfg.text, 4, tokenizer)]).split(1))
    results = {}
    for sequential in (False, True):
        central = copy.deepcopy(model)
        prune_model(central, get_pruner(pruner), SparsityTarget(0.5), union,
                    sequential=sequential, progress=False)
        results[sequential] = central
    for (name, a), b in zip(core.model.named_parameters(), results[False].parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert any(not torch.allclose(a, b, atol=1e-5) for a, b in
               zip(core.model.parameters(), results[True].parameters()))
