"""Secure aggregation (SecAgg+) of the ``pooled`` statistics: the fixed-point layout
(golden), and Flower's own SecAggPlusWorkflow and secaggplus_mod driving the real ClientApp
and query runner in process: the server gets only the sum, within the stated quantization
bound of the plain sum, and a client whose clear metrics fail is left out of the sum."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from fedprune.config import ConfigError, load_config
from fedprune.fl.secure import SecureSum

from test_fedllm import LLM, _run_pooled


def test_secure_sum_layout_golden():
    gram = np.array([[4.0, 1.0, -2.0], [1.0, 9.0, 3.0], [-2.0, 3.0, 16.0]])
    u = np.array([1.0, 2.0, 4.0])  # entry scales u_j u_k: 1 2 4 / 2 4 8 / 4 8 16
    layout = SecureSum({"g": (3, 3), "v": (2,)}, {"g": u, "v": np.array([10.0, 5.0])}, {"g"})
    vector, clipped = layout.encode({"g": gram, "v": np.array([30.0, -5.0])}, examples=2)
    # names in sorted order; the upper triangle row by row, each entry divided by
    # examples x its scale
    np.testing.assert_array_equal(vector[0], [4 / 2, 1 / 4, -2 / 8, 9 / 8, 3 / 16, 16 / 32])
    np.testing.assert_array_equal(vector[1], [1.5, -0.5])
    assert clipped == 3 and layout.entries() == 8  # 2.0, 1.125 and 1.5 lie outside [-1, 1]
    # SecAgg+'s result is the example-weighted mean of the vectors: decode gives the sum
    other, _ = layout.encode({"g": 2 * gram, "v": np.array([0.0, 1.0])}, examples=6)
    mean = [(2 * a + 6 * b) / 8 for a, b in zip(vector, other)]
    sums = layout.decode(mean, total_examples=8)
    np.testing.assert_allclose(sums["g"], 3 * gram)
    np.testing.assert_allclose(sums["v"], [30.0, -4.0])
    np.testing.assert_allclose(layout.bound("g", 8, 10), 2 * np.outer(u, u) * 8 / 1024)
    again = SecureSum.from_json(layout.to_json(), layout.scale_arrays())
    assert again.shapes == layout.shapes and again.triangular == layout.triangular
    assert all(np.array_equal(again.scales[n], layout.scales[n]) for n in layout.scales)
    with pytest.raises(ValueError, match="'v' has shape"):
        layout.encode({"g": gram, "v": np.zeros(3)}, 1)
    with pytest.raises(ValueError, match="scales of 'v' must be finite and > 0"):
        SecureSum({"v": (2,)}, {"v": np.array([1.0, 0.0])})
    with pytest.raises(ValueError, match="not square"):
        SecureSum({"v": (2,)}, {"v": np.ones(2)}, {"v"})
    with pytest.raises(ValueError, match="no scale vector"):
        SecureSum.from_json(layout.to_json(), {})


def test_secagg_needs_a_method_that_sums_and_enough_bits():
    with pytest.raises(ConfigError, match="secagg.enabled=true needs a method"):
        load_config("default", [*LLM, "method.name=mask-vote", "secagg.enabled=true"])
    with pytest.raises(ConfigError, match="overflows secagg.modulus_bits"):
        load_config("default", [*LLM, "secagg.enabled=true", "secagg.quant_bits=30",
                                "secagg.modulus_bits=31"])
    with pytest.raises(ConfigError, match="secagg.quant_bits"):
        load_config("default", [*LLM, "secagg.quant_bits=31"])


def _secure_run(tmp_path, overrides, tamper_metrics=None):
    """The pooled rounds through Flower's SecAggPlusWorkflow and the real ClientApp (its
    secure_mod and Flower's secaggplus_mod), each node keeping its own Context."""

    from client.client_app import app as client_app
    from fedprune.methods import method_class
    from server.query import base_spec, run_queries
    from flower_helpers import FakeGrid, node_context, set_identity

    cfg = load_config("default", [*LLM, "data.num_clients=4", f"data.cache_dir={tmp_path}",
                                  "secagg.enabled=true", *overrides])
    cls = method_class("pooled")
    core = cls.make_core(cfg)
    contexts = {}

    def answer(msg):
        # Flower serializes each message; in process the workflow's stage-0 messages share
        # one content object, which secaggplus_mod edits: give each node its own copy
        msg = copy.deepcopy(msg)
        pid = msg.metadata.dst_node_id - 1
        set_identity(msg.metadata.dst_node_id)
        context = contexts.setdefault(pid, node_context(cfg, pid, 4))
        out = client_app(msg, context)
        metrics = out.content.config_records.get("fitres.metrics")  # compat keeps them there
        if metrics is not None and tamper_metrics is not None:
            tamper_metrics(pid, metrics)
        return out

    seen = []
    record = run_queries(FakeGrid([1, 2, 3, 4], answer), cls(cfg, core),
                         base_spec(cfg, core.client_sizes()),
                         lambda q, replies, meter: seen.append((q, replies, meter)))
    return core, record, seen


def _plain_sums(replies):
    from fedprune.prune.pooled import sum_stats

    names = replies[0].records["arrays"]
    return {n: sum_stats([r.records["arrays"][n] for r in replies]) for n in names}


# At 12 bits Wanda's squared norms show a visible quantization error; SparseGPT at 30 bits
# exercises the two phases (squared norms, then Grams scaled entry by entry by them).
@pytest.mark.parametrize("pruner, bits", [("sparsegpt", 30), ("sparsegpt", 16), ("wanda", 12)])
def test_secure_sums_equal_the_plain_sums_within_the_quantization_bound(pruner, bits, tmp_path,
                                                                        data_root):
    overrides = [f"method.pruner={pruner}", f"secagg.quant_bits={bits}",
                 f"secagg.modulus_bits={bits + 10}"]
    core, record, secure = _secure_run(tmp_path, overrides)
    _, _, plain = _secure_run(tmp_path, overrides[:1] + ["secagg.enabled=false"])
    assert record["contributors"] == [[0, 1, 2, 3], [0, 1, 2, 3]]
    phases = [q.config.get("phase") for q, _, _ in secure]
    assert phases == (["sq", "gram"] * 2 if pruner == "sparsegpt" else [None, None])
    for query, replies, meter in secure:
        assert query.secure is not None and len(replies) == 1  # the server holds one sum
        assert replies[0].metrics["clipped"] == 0
    # block 0, where both runs see the same inputs (after it, the quantized statistics
    # have moved SparseGPT's weights a little, and with them the next block's inputs)
    expected = _plain_sums(plain[0][1])
    assert sum(r.examples for r in plain[0][1]) == 8
    worst = 0.0
    for query, replies, _ in secure[:len(phases) // 2]:
        total = replies[0].examples
        assert total == 8
        for name, got in replies[0].records["arrays"].items():
            want = expected[name]
            assert got.rows == want.rows
            key = "gram" if query.config.get("phase") == "gram" else "sq"
            a, b = (got.gram, want.gram) if key == "gram" else (got.sq_norm, want.sq_norm)
            err = (a - b).abs().numpy()
            bound = query.secure.bound(f"{key}/{name}", total, bits)
            assert (err <= bound).all(), (name, key, (err - bound).max())
            worst = max(worst, float(err.max()) / float(b.abs().max()))
    if bits < 30:
        assert worst > 0  # coarse enough to show: the test would see a wrong bound
    assert sum(core.sparsity().values()) / len(core.sparsity()) == pytest.approx(0.5)


def test_a_client_whose_metrics_fail_is_left_out_of_the_secure_sum(tmp_path, data_root,
                                                                   caplog):
    import logging

    def wrong_block(pid, metrics):
        if pid == 3:
            metrics["block"] = int(metrics["block"]) + 1

    with caplog.at_level(logging.WARNING):
        _, record, secure = _secure_run(tmp_path, [], wrong_block)
    assert record["contributors"] == [[0, 1, 2], [0, 1, 2]]
    assert record["rejected"] == 2 and "left out of the sum" in caplog.text

    def other_block(block, pid, metrics, arrays):
        if pid == 3:
            metrics["block"] = block + 1
    plain = []
    _run_pooled(tmp_path, [], other_block, on_query=lambda q, r, m: plain.append(r))
    for (query, replies, _), clear in zip(secure[:1], plain[:1]):  # same inputs
        expected = _plain_sums(clear)
        for name, got in replies[0].records["arrays"].items():
            bound = query.secure.bound(f"sq/{name}", replies[0].examples, 30)
            assert ((got.sq_norm - expected[name].sq_norm).abs().numpy() <= bound).all()


@pytest.mark.slow
def test_secure_pooled_end_to_end_in_a_flower_simulation(tmp_path, data_root):
    """3 text clients through Flower's simulation runtime (Ray workers, serialized
    messages): every block is a secure sum of all three, nothing is clipped, and the
    pruned model is centralized Wanda's on the union up to quantization-level ties."""
    import torch
    from transformers import AutoModelForCausalLM

    from fedprune.lm.clients import partition_text
    from fedprune.lm.loading import load_causal_lm
    from fedprune.prune.base import SparsityTarget, get_pruner
    from fedprune.prune.pipeline import prune_model
    from server.simulate import simulate

    cfg = load_config("default", [*LLM, "secagg.enabled=true", f"run.out_dir={tmp_path}",
                                  "run.name=llm"])
    summary = simulate(cfg, tmp_path / "llm")
    rows = _rows(tmp_path / "llm")
    assert [r["block"] for r in rows] == [0, 1]
    assert all(r["secure"] and r["clients"] == 3 and r["clipped"] == 0 for r in rows)
    assert all(100 < r["client_peak_rss_mb"] < 16_000 for r in rows)  # the largest client's
    assert summary["record"]["contributors"] == [[0, 1, 2], [0, 1, 2]]
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "llm" / "model")
    model, tokenizer = load_causal_lm("tiny-llama")
    windows = [c.windows for c in partition_text(cfg.text, 3, tokenizer)]
    prune_model(model, get_pruner("wanda"), SparsityTarget(0.5),
                list(torch.cat(windows).split(1)), sequential=True, progress=False)
    differ = total = 0
    for a, b in zip(saved.parameters(), model.parameters()):
        differ, total = differ + int((a != b).sum()), total + a.numel()
    assert differ <= 1e-4 * total


def _rows(run):
    import json

    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_one_pass_secure_sums_cover_every_layer_within_the_bound(tmp_path, data_root):
    """One pass, every layer of every block: all from the dense model, so every sum is
    comparable with the plain one (SparseGPT: squared norms, then Grams)."""
    overrides = ["method.pruner=sparsegpt", "method.one_pass=true"]
    _, record, secure = _secure_run(tmp_path, overrides)
    _, _, plain = _secure_run(tmp_path, overrides + ["secagg.enabled=false"])
    assert record["contributors"] == [[0, 1, 2, 3]]
    assert [q.config.get("phase") for q, _, _ in secure] == ["sq", "gram"] and len(plain) == 1
    expected = _plain_sums(plain[0][1])
    assert len(expected) == 14
    for query, replies, _ in secure:
        key = query.config["phase"]
        assert set(replies[0].records["arrays"]) == set(expected)
        for name, got in replies[0].records["arrays"].items():
            a, b = (got.gram, expected[name].gram) if key == "gram" else \
                (got.sq_norm, expected[name].sq_norm)
            assert ((a - b).abs().numpy() <= query.secure.bound(
                f"{key}/{name}", replies[0].examples, 30)).all()
