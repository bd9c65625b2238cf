"""Token pruning on BERT-style encoders: token sites in Hugging Face layers, FLOPs, the
embedding-fidelity measures, and the real all-MiniLM-L6-v2 through `fedprune prune`."""

from __future__ import annotations

import json

import pytest
import torch

from fedprune.lm.tiny_models import tiny_bert
from fedprune.prune.adapters import adapter_for
from fedprune.prune.adapters.hf_tokens import encoder_flops, token_state
from fedprune.prune.tokens import token_pruner
from fedprune.prune.tokens.encoder import embed, fidelity, length_batches


def _bert(impl: str = "eager"):
    model = tiny_bert(seed=0).eval()
    model.config._attn_implementation = impl
    return model


def _run(model, pruner, ids):
    pruner.attach(model)
    try:
        return model(input_ids=ids).last_hidden_state
    finally:
        pruner.detach(model)


def test_sites_change_no_output_and_no_state_dict_key():
    model = _bert()
    ids = torch.randint(5, 100, (3, 20))
    keys = list(model.state_dict())
    dense = model(input_ids=ids).last_hidden_state
    adapter_for(model).token_blocks(model)
    torch.testing.assert_close(model(input_ids=ids).last_hidden_state, dense, rtol=0, atol=0)
    assert list(model.state_dict()) == keys
    out = _run(model, token_pruner("zero-tprune", keep=[1.0, 1.0]), ids)
    torch.testing.assert_close(out, dense, rtol=0, atol=0)  # removes nothing: the same


@pytest.mark.parametrize("name,options,counts", [
    ("zero-tprune", {"keep": [0.5, 1.0]}, [20, 11, 11]),  # 1 + round(19 * 0.5)
    ("random", {"keep": [1.0, 0.5]}, [20, 20, 11]),
    ("tome", {"r": 4}, [20, 16, 12])])
def test_token_counts_and_flops_by_hand(name, options, counts):
    from torch.utils.flop_counter import FlopCounterMode

    model = _bert()
    ids = torch.randint(5, 100, (1, 20))
    out = _run(model, token_pruner(name, **options), ids)
    adapter = adapter_for(model)
    assert out.shape[1] == counts[-1] and adapter.token_counts(model) == counts
    c = model.config
    d, ff = c.hidden_size, c.intermediate_size
    by_hand = sum(2 * n * d * 3 * d + 4 * n * n * d + 2 * n * d * d + 4 * a * d * ff
                  for n, a in zip(counts[:-1], counts[1:]))
    assert adapter.token_flops(model, counts) == encoder_flops(c, counts) == by_hand
    with FlopCounterMode(display=False) as counter:  # dense: torch's own count agrees,
        model(input_ids=ids)  # plus BertModel's pooler (one d x d product, not a layer)
    assert counter.get_total_flops() == encoder_flops(c, [20, 20, 20]) + 2 * d * d


def test_tome_sizes_add_up_and_weight_the_mean():
    model = _bert()
    ids = torch.randint(5, 100, (2, 16))
    pruner = token_pruner("tome", r=5)
    pruner.attach(model)
    try:
        model(input_ids=ids)
        sizes = token_state(model).sizes
        assert sizes.shape == (2, 6, 1)
        assert sizes.sum(1).flatten().tolist() == [16.0, 16.0]  # every token counted once
        assert sizes.max() > 1
    finally:
        pruner.detach(model)


def test_fused_attention_padding_and_cross_attention_are_refused():
    model = _bert("sdpa")
    ids = torch.randint(5, 100, (2, 12))
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        _run(model, token_pruner("zero-tprune", keep=[0.5, 1.0]), ids)
    model = _bert()
    pruner = token_pruner("tome", r=2)
    pruner.attach(model)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, -3:] = 0
    with pytest.raises(ValueError, match="unpadded batches"):
        model(input_ids=ids, attention_mask=mask)
    model(input_ids=ids, attention_mask=torch.ones(2, 12, dtype=torch.long))  # all ones: fine
    pruner.detach(model)


def test_fidelity_by_hand():
    dense = torch.eye(3)
    pruned = torch.tensor([[1.0, 0, 0], [0, 0.6, 0.8], [0, 0.8, 0.6]])
    got = fidelity(dense, pruned)
    assert got["cosine_mean"] == pytest.approx((1 + 0.6 + 0.6) / 3)
    assert got["cosine_min"] == pytest.approx(0.6)
    # sentence 1's pruned embedding is nearer sentence 2's twin, and 2's nearer 1's
    assert got["retrieval_top1"] == pytest.approx(1 / 3)


def test_length_batches_group_equal_lengths_and_embed_keeps_order():
    sentences = [[1, 5, 2], [1, 6, 7, 2], [1, 8, 2], [1, 9, 9, 2], [1, 4, 2]]
    batches = length_batches(sentences, batch=2)
    assert [idx for idx, _ in batches] == [[0, 2], [4], [1, 3]]
    assert batches[2][1].tolist() == [[1, 6, 7, 2], [1, 9, 9, 2]]
    model = _bert()
    emb, flops = embed(model, batches)
    single = model(input_ids=torch.tensor([sentences[3]])).last_hidden_state.mean(1)
    torch.testing.assert_close(emb[3], torch.nn.functional.normalize(single, dim=-1)[0],
                               rtol=1e-5, atol=1e-5)
    c = model.config
    expected = (3 * encoder_flops(c, [3] * 3) + 2 * encoder_flops(c, [4] * 3)) / 5
    assert flops == pytest.approx(expected)


def test_minilm_through_the_prune_command(tmp_path, data_root, capsys):
    """The real all-MiniLM-L6-v2 (from its PyPI package) on held-out WikiText-2 sentences."""
    from fedprune.cli import main

    def prune(*args: str) -> dict:
        out = tmp_path / args[1]
        assert main(["prune", "--model", "minilm", "--eval-sentences", "48", "--skip-speed",
                     "--out", str(out), *args]) == 0
        return json.loads((out / "report.json").read_text())

    report = prune("--method", "zero-tprune", "--keep", "1,0.7,0.7,1,1,1")
    dense, pruned = report["dense"], report["pruned"]
    assert report["sentences"] == 48
    assert dense["cosine_mean"] == pytest.approx(1.0) and dense["retrieval_top1"] == 1.0
    assert 0.5 < pruned["cosine_mean"] < 0.9999 and pruned["retrieval_top1"] > 0.8
    assert 0.2 < report["flops_reduction"] < 0.6
    assert "twin retrieval" in capsys.readouterr().out
    nothing = prune("--method", "random", "--keep", "1,1,1,1,1,1")
    assert nothing["pruned"]["cosine_min"] == pytest.approx(1.0, abs=1e-5)
    assert nothing["flops_reduction"] == pytest.approx(0.0)
