"""Token pruning (fedprune.prune.tokens): WPR, Zero-TPrune's stages, ToMe's merge, the
random control, FLOPs from token counts, and bad input. Hand-computed cases throughout."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from fedprune.config import ModelConfig
from fedprune.models import build_model
from fedprune.prune.tokens import (ZeroTPrune, bipartite_merge, combine_heads, token_pruner,
                                   weighted_pagerank)

# rows = queries; columns sum to 1.5, 1.0, 0.5
A3 = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [1.0, 0.0, 0.0]])


def test_wpr_two_steps_and_stationary_distribution_by_hand():
    att = A3.view(1, 1, 3, 3)
    s1 = weighted_pagerank(att, 1)[0, 0]  # column sums / 3
    torch.testing.assert_close(s1, torch.tensor([0.5, 1 / 3, 1 / 6]))
    s2 = weighted_pagerank(att, 2)[0, 0]  # s2[j] = sum_i A[i, j] s1[i]
    torch.testing.assert_close(s2, torch.tensor([5 / 12, 5 / 12, 1 / 6]))
    # pi = pi A: pi1 = pi0, pi2 = pi0 / 2 -> (0.4, 0.4, 0.2)
    torch.testing.assert_close(weighted_pagerank(att, 200)[0, 0],
                               torch.tensor([0.4, 0.4, 0.2]), atol=1e-5, rtol=0)
    # the class token's head start: s0 = (w, 1, 1) / (w + 2), then one step
    w = 3.0 ** 0.5
    s0 = torch.tensor([w, 1.0, 1.0]) / (w + 2)
    torch.testing.assert_close(weighted_pagerank(att, 1, cls_weight=w)[0, 0], A3.T @ s0)


def test_heads_combine_by_root_mean_square_after_the_variance_filter():
    peaked = torch.tensor([0.7, 0.1, 0.1, 0.1])  # var(N s) = 1.08: filtered (> 0.7)
    mild = torch.tensor([0.4, 0.3, 0.2, 0.1])  # var(N s) = 0.2
    mild2 = torch.tensor([0.1, 0.2, 0.3, 0.4])
    flat = torch.full((4,), 0.25)  # var 0: filtered (< 0.01)
    out = combine_heads(torch.stack([peaked, mild, mild2, flat]).unsqueeze(0))[0]
    torch.testing.assert_close(out, ((mild ** 2 + mild2 ** 2) / 2).sqrt())
    # no head passes: all are used
    out = combine_heads(torch.stack([flat, peaked]).unsqueeze(0))[0]
    torch.testing.assert_close(out, ((flat ** 2 + peaked ** 2) / 2).sqrt())
    # filters off: plain RMS over every head
    out = combine_heads(torch.stack([flat, peaked]).unsqueeze(0), None, None)[0]
    torch.testing.assert_close(out, ((flat ** 2 + peaked ** 2) / 2).sqrt())


def _attention_to(n: int, weights: list[float]) -> torch.Tensor:
    """Every query attends to the keys in proportion to ``weights`` (one head)."""
    row = torch.tensor(weights) / sum(weights)
    return row.expand(n, n).reshape(1, 1, n, n).clone()


def test_i_stage_drops_the_planted_least_attended_tokens_never_the_class_token():
    # the class token (0) receives no attention at all; tokens 4 and 2 the least after it
    att = _attention_to(6, [0.0, 4.0, 1.0, 5.0, 0.5, 3.0])
    keys = torch.randn(1, 1, 6, 8)
    block = SimpleNamespace(last_attention=att, last_keys=keys)
    x = torch.arange(6.0).view(1, 6, 1)
    pruner = ZeroTPrune(keep=[0.6], s_share=0.0, v_min=None, v_max=None)
    out, sizes = pruner.reduce(0, 6, block, x, torch.ones(1, 6, 1), remove=2)
    assert out.flatten().tolist() == [0.0, 1.0, 3.0, 5.0]  # 2 and 4 gone, order kept
    assert sizes.shape == (1, 4, 1)


def test_sharpened_graph_is_the_softmax_at_temperature_tau():
    from fedprune.prune.tokens.wpr import sharpen

    row = torch.tensor([[[[0.5, 0.3, 0.2]]]])
    torch.testing.assert_close(sharpen(row, 0.5)[0, 0, 0],
                               torch.tensor([0.25, 0.09, 0.04]) / 0.38)  # squares, by hand
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 5, 5)
    att = torch.softmax(logits, -1)
    torch.testing.assert_close(sharpen(att, 0.5), torch.softmax(logits / 0.5, -1))
    assert sharpen(att, 1.0) is att
    # the pruner ranks on the sharpened graph: WPR of softmax(2 z), computed independently
    pruner = ZeroTPrune(tau=0.5, v_min=None, v_max=None, cls_weight="uniform")
    ref = weighted_pagerank(torch.softmax(2 * logits, -1), 3)
    torch.testing.assert_close(pruner.importance(att, 3), (ref ** 2).mean(1).sqrt())
    with pytest.raises(ValueError, match=r"zero-tprune: tau=0 must be > 0"):
        ZeroTPrune(tau=0)


def test_class_attention_control_drops_what_the_class_token_ignores():
    # every patch token attends to token 2 (so WPR would keep it), but the class token's
    # row gives 2 and 4 the least weight, and itself none
    att = _attention_to(6, [0.0, 1.0, 9.0, 1.0, 1.0, 1.0])
    att[0, 0, 0] = torch.tensor([0.0, 0.3, 0.05, 0.3, 0.05, 0.3])
    block = SimpleNamespace(last_attention=att, last_keys=torch.randn(1, 1, 6, 8))
    x = torch.arange(6.0).view(1, 6, 1)
    out, _ = token_pruner("cls-attn", keep=[0.6]).reduce(0, 6, block, x, torch.ones(1, 6, 1),
                                                         remove=2)
    assert out.flatten().tolist() == [0.0, 1.0, 3.0, 5.0]
    wpr, _ = ZeroTPrune(keep=[0.6], s_share=0.0, v_min=None, v_max=None).reduce(
        0, 6, block, x, torch.ones(1, 6, 1), remove=2)
    assert 2.0 in wpr.flatten().tolist()  # the two criteria differ on this graph


def test_s_stage_drops_the_planted_duplicate_from_the_less_important_half():
    keys = torch.eye(7)[:, :7].clone().view(1, 1, 7, 7)
    keys[0, 0, 2] = keys[0, 0, 5]  # token 2 duplicates token 5
    importance = torch.tensor([[9.0, 1.0, 2.0, 3.0, 4.0, 8.0, 7.0]])  # 2 in A, 5 in B
    kept = ZeroTPrune().s_stage(importance, keys, 1)
    assert kept.tolist() == [[0, 1, 3, 4, 5, 6]]
    # the same duplicate, but 2 is the more important one: 5 (now in A) goes
    importance = torch.tensor([[9.0, 1.0, 8.0, 3.0, 4.0, 2.0, 7.0]])
    assert ZeroTPrune().s_stage(importance, keys, 1).tolist() == [[0, 1, 2, 3, 4, 6]]


def test_restricted_graph_scores_equal_the_gathered_sub_graph():
    """WPR + head filter on the full-size restricted graph (what the I-stage runs after the
    S-stage) equals the same on the explicitly gathered, renormalised sub-matrix."""
    from fedprune.prune.tokens.wpr import restrict

    torch.manual_seed(0)
    att = torch.softmax(3 * torch.randn(2, 3, 9, 9), -1)
    present = torch.ones(2, 9, dtype=torch.bool)
    present[0, [2, 5]] = False
    present[1, [1, 7]] = False
    pruner = ZeroTPrune(v_min=0.05, v_max=0.5)
    full = pruner.importance(restrict(att, present), 7, present)
    for b in range(2):
        idx = present[b].nonzero().flatten()
        sub = att[b:b + 1][:, :, idx][:, :, :, idx]
        sub = sub / sub.sum(-1, keepdim=True)
        torch.testing.assert_close(full[b, idx], pruner.importance(sub, 7)[0])
        assert (full[b, ~present[b]] == 0).all()


def test_tome_merges_the_planted_pair_into_a_size_weighted_mean():
    n, d = 6, 6
    metric = torch.eye(n, d).unsqueeze(0)
    metric[0, 2] = metric[0, 3]  # A token 2 (even) and B token 3 (odd) are the same
    x = torch.arange(n * 2, dtype=torch.float).view(1, n, 2)
    sizes = torch.tensor([1.0, 1.0, 2.0, 1.0, 1.0, 1.0]).view(1, n, 1)
    out, new_sizes = bipartite_merge(x, sizes, metric, 1)
    # unmerged A tokens (0, 4) in order, then B tokens (1, 3, 5) with 2 merged into 3
    expected = torch.stack([x[0, 0], x[0, 4], x[0, 1], (2 * x[0, 2] + x[0, 3]) / 3, x[0, 5]])
    torch.testing.assert_close(out[0], expected)
    assert new_sizes.flatten().tolist() == [1.0, 1.0, 1.0, 3.0, 1.0]
    # the class token is never merged, even when it is the most similar
    metric = torch.eye(n, d).unsqueeze(0)
    metric[0, 0] = metric[0, 1]
    out, _ = bipartite_merge(x, torch.ones(1, n, 1), metric, 1)
    torch.testing.assert_close(out[0, 0], x[0, 0])


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return build_model(ModelConfig(name="vit", width=8)).eval()


def _counted_flops(model, images) -> int:
    """FLOPs of the forward pass as torch's own counter sees them (matrix products)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(images)
    return counter.get_total_flops()


@pytest.mark.parametrize("name,options", [
    ("zero-tprune", {"keep": [1.0, 0.5, 1.0, 0.5]}), ("random", {"keep": [1.0, 0.5, 1.0, 0.5]}),
    ("cls-attn", {"keep": [1.0, 0.5, 1.0, 0.5]}), ("tome", {"r": 8})])
def test_token_counts_and_flops_follow_the_schedule(vit, name, options):
    images = torch.randn(2, 3, 32, 32)
    dense = vit(images)
    pruner = token_pruner(name, **options)
    pruner.attach(vit)
    try:
        out = vit(images)
    finally:
        pruner.detach(vit)
    expected = {"tome": [65, 57, 49, 41, 33, 25, 17],
                "zero-tprune": [65, 65, 33, 33, 17, 17, 17],
                "random": [65, 65, 33, 33, 17, 17, 17],
                "cls-attn": [65, 65, 33, 33, 17, 17, 17]}[name]
    assert vit.last_tokens == expected
    one = images[:1]
    pruner.attach(vit)
    try:  # torch's counter on one image: the reducers' own products come on top
        counted = _counted_flops(vit, one)
    finally:
        pruner.detach(vit)
    if name in ("random", "cls-attn"):  # their reducers multiply nothing: exact agreement
        assert vit.flops(expected) == counted
    else:
        assert vit.flops(expected) < counted < 1.15 * vit.flops(expected)
    assert _counted_flops(vit, one) == vit.flops()  # dense: exact
    assert vit.flops(expected) < vit.flops()
    assert out.shape == dense.shape and not torch.allclose(out, dense)
    torch.testing.assert_close(vit(images), dense)  # detached: the dense model again


def test_a_schedule_that_removes_nothing_changes_nothing(vit):
    images = torch.randn(2, 3, 32, 32)
    dense = vit(images)
    for pruner in (token_pruner("zero-tprune", keep=[1.0] * 6), token_pruner("tome", r=0)):
        pruner.attach(vit)
        torch.testing.assert_close(vit(images), dense)
        pruner.detach(vit)


def test_bad_token_pruning_input_is_named(vit):
    with pytest.raises(ValueError, match=r"keep\[1\]=1.5 is outside \(0, 1\]"):
        token_pruner("zero-tprune", keep=[1.0, 1.5])
    with pytest.raises(ValueError, match=r"keep\[0\]=0 is outside"):
        token_pruner("random", keep=[0])
    with pytest.raises(ValueError, match="not registered.*random.*tome.*zero-tprune"):
        token_pruner("evit")
    with pytest.raises(ValueError, match="names 9 blocks, the model has 6"):
        token_pruner("zero-tprune", keep=[1.0] * 9).attach(vit)
    cnn = build_model(ModelConfig(name="resnet8", width=4))
    with pytest.raises(ValueError, match="token pruning needs a transformer.*ResNet"):
        token_pruner("tome", r=4).attach(cnn)


def _prune(tmp_path, *args: str) -> int:
    from fedprune.cli import main

    return main(["prune", "--model", "cifar10:vit:4", "--cnn-epochs", "0", "--eval-images",
                 "200", "--skip-speed", "--out", str(tmp_path / "out"), *args])


def test_prune_command_reports_accuracy_flops_and_tokens(tmp_path, data_root, monkeypatch,
                                                          capsys):
    import json

    monkeypatch.setenv("FEDPRUNE_CACHE", str(tmp_path / "cache"))
    assert _prune(tmp_path, "--method", "zero-tprune", "--keep", "1,0.5,1,1,1,1") == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["dense"]["tokens_per_block"] == [65] * 7
    assert report["pruned"]["tokens_per_block"] == [65, 65, 33, 33, 33, 33, 33]
    assert report["flops_reduction"] == pytest.approx(
        1 - report["pruned"]["flops"] / report["dense"]["flops"]) and \
        report["flops_reduction"] > 0.3
    assert 0 <= report["pruned"]["accuracy"] <= 1
    assert "pruned: accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--method", "zero-tprune", "--keep", "1,1.5"], r"keep\[1\]=1.5 is outside"),
    (["--method", "zero-tprune"], "needs --keep"),
    (["--method", "tome"], "--merge-r must be >= 1"),
    (["--method", "tome", "--merge-r", "4", "--keep", "1"], "tome takes --merge-r"),
    (["--method", "random", "--keep", "x"], "--keep"),
    (["--method", "tome", "--merge-r", "4", "--model", "cifar10:resnet8:4"],
     "token pruning needs a transformer")])
def test_prune_command_names_bad_token_settings(tmp_path, data_root, monkeypatch, capsys,
                                                args, message):
    monkeypatch.setenv("FEDPRUNE_CACHE", str(tmp_path / "cache"))
    assert _prune(tmp_path, *args) == 2
    assert re.search(message, capsys.readouterr().err)


def _select_method(*overrides: str):
    from fedprune.config import load_config
    from fedprune.fl.server_core import SparseServer
    from fedprune.methods import method_class

    cfg = load_config("default", ["method.name=token-select", "model.name=vit",
                                  "model.width=4", "fed.rounds=2", *overrides])
    return method_class("token-select")(cfg, SparseServer(cfg))


def _reply(pid: int, loss, correct, count: int):
    import numpy as np

    from fedprune.fl.replies import Checked

    return Checked(f"client {pid}", pid + 1, {"num-examples": 100, "partition-id": pid},
                   {"tokens": {"loss_sum": np.array(loss, float),
                               "correct": np.array(correct, float),
                               "count": np.array([count])}})


def test_token_selection_picks_the_planted_best_schedule_within_the_budget():
    method = _select_method("method.schedules=1,1,1,1,1,1;1,0.7,1,0.7,1,0.7;1,0.5,1,0.5,1,0.5",
                            "method.flops_budget=0.9")
    assert method.flops[0] == pytest.approx(1.0) and method.flops[2] < method.flops[1] < 0.9
    assert method.allowed == [1, 2]  # keeping every token is over the budget
    assert method.plan(1) is None and method.plan(2) is not None  # select_round 0: the last
    # weighted means: schedule 0 best (over budget), then 2 (planted), then 1
    replies = [_reply(0, [10.0, 30.0, 20.0], [9, 5, 7], 10),
               _reply(1, [90.0, 330.0, 240.0], [80, 40, 60], 90)]
    method.combine(2, method.plan(2), replies, {})
    choice = method.report()["token_selection"]
    assert choice["chosen"] == 2 and choice["chosen_schedule"] == [1, 0.5, 1, 0.5, 1, 0.5]
    assert choice["loss"] == pytest.approx([1.0, 3.6, 2.6])
    assert choice["accuracy"] == pytest.approx([0.89, 0.45, 0.67])
    # the choice survives a checkpoint
    again = _select_method("method.schedules=1,1,1,1,1,1;1,0.7,1,0.7,1,0.7;1,0.5,1,0.5,1,0.5",
                           "method.flops_budget=0.9")
    again.load_state_dict(method.state_dict())
    assert again.report() == method.report()


def test_token_selection_settings_are_checked():
    from fedprune.config import ConfigError, load_config

    base = ["method.name=token-select", "fed.rounds=2"]
    with pytest.raises(ConfigError, match="model.name='resnet8' has none"):
        load_config("default", base)
    with pytest.raises(ConfigError, match=r"schedule 1: .*keep\[0\]=2.0"):
        load_config("default", [*base, "model.name=vit", "method.schedules=1,1;2,1"])
    with pytest.raises(ConfigError, match="select_round=5 is after the last round"):
        load_config("default", [*base, "model.name=vit", "method.select_round=5"])
    with pytest.raises(ConfigError, match="no schedule fits"):
        _select_method("method.schedules=1,1,1,1,1,1", "method.flops_budget=0.5")
