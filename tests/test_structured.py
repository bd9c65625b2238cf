"""Structured pruning of transformers: groups, surgery, save/load, criteria, allocation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedprune.config import load_config
from fedprune.lm.tiny_models import TINY_FACTORIES, tiny_llama
from fedprune.prune.adapters import adapter_for
from fedprune.prune.base import LayerStats
from fedprune.prune.structured.evidence import GradEvidence, collect_gradients
from fedprune.prune.structured.groups import GroupSet, Member, contiguous_index
from fedprune.prune.structured.importance import Evidence, get_criterion
from fedprune.prune.structured.io import load_pruned, loads_plainly, save_pruned
from fedprune.prune.structured.job import StructuredConfig, gather_evidence, shrink
from fedprune.prune.structured.select import adaptive_keep, removal_count, uniform_keep
from fedprune.prune.structured.surgery import (
    compensate_bias_,
    mask_units_,
    remove_units_,
)


def _random_keep(groups: list[GroupSet], seed: int = 1) -> dict[str, torch.Tensor]:
    """Half the units of every set (one fewer per bucket), chosen at random."""
    g = torch.Generator().manual_seed(seed)
    keep = {}
    for gs in groups:
        if gs.bucket:
            keep[gs.name] = torch.cat([b * gs.bucket + torch.randperm(gs.bucket, generator=g)
                                       [:gs.bucket - 1] for b in range(gs.units // gs.bucket)])
        else:
            keep[gs.name] = torch.randperm(gs.units, generator=g)[:max(1, gs.units // 2)]
    return keep


def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "bert"])
@pytest.mark.parametrize("heads", ["kv", "query"])
def test_pruned_model_equals_masked_model(family, heads):
    masked, pruned = TINY_FACTORIES[family](0), TINY_FACTORIES[family](0)
    groups = adapter_for(masked).structure_groups(masked, heads)
    keep = _random_keep(groups)
    mask_units_(masked, groups, keep)
    remove_units_(pruned, adapter_for(pruned).structure_groups(pruned, heads), keep)
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(_out(masked, x), _out(pruned, x), atol=1e-5)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in masked.parameters())
    # the masked model really differs from the dense one (the test is not vacuous)
    assert not torch.allclose(_out(TINY_FACTORIES[family](0), x), _out(pruned, x), atol=1e-3)


def test_gqa_group_is_a_kv_head_with_the_query_heads_that_read_it():
    model = tiny_llama(0)  # 4 query heads, 2 key/value heads, head_dim 16
    attn = adapter_for(model).structure_groups(model, "kv")[0]
    assert attn.units == 2 and attn.unit_label == "key/value head"
    q = next(m for m in attn.members if m.module.endswith("q_proj"))
    k = next(m for m in attn.members if m.module.endswith("k_proj"))
    # HF repeat_kv: query head h reads key/value head h // 2 -> kv head 1 owns q heads 2, 3
    assert q.index[1].tolist() == list(range(32, 64))
    assert k.index[1].tolist() == list(range(16, 32))
    query = adapter_for(model).structure_groups(model, "query")[0]
    assert (query.units, query.bucket) == (4, 2)


def test_uniform_llama_loads_with_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama(0)
    groups = adapter_for(model).structure_groups(model, "query")
    keep = {gs.name: (torch.tensor([1, 2]) if gs.kind == "attn" else torch.arange(0, 128, 2))
            for gs in groups}  # one query head per kv head, half the channels, every layer
    remove_units_(model, groups, keep)
    assert loads_plainly(model.config)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads,
            model.config.intermediate_size, model.config.head_dim) == (2, 2, 64, 16)
    save_pruned(model, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    x = torch.randint(0, 256, (2, 16))
    assert torch.equal(_out(model, x), _out(loaded, x))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_non_uniform_model_round_trips_through_load_pruned(tmp_path, family):
    from transformers import AutoModelForCausalLM

    model = TINY_FACTORIES[family](0)
    groups = adapter_for(model).structure_groups(model, "kv")
    keep = {gs.name: torch.arange(gs.units - 1 - gs.block * (gs.kind == "mlp") * 7)
            for gs in groups}  # layer 1 keeps fewer channels than layer 0
    remove_units_(model, groups, keep)
    assert not loads_plainly(model.config)
    save_pruned(model, tmp_path)
    with pytest.raises((RuntimeError, ValueError)):  # stock config: no per-layer shapes
        AutoModelForCausalLM.from_pretrained(tmp_path)
    loaded = load_pruned(tmp_path)
    x = torch.randint(0, 256, (2, 16))
    assert torch.equal(_out(model, x), _out(loaded, x))
    assert [s["intermediate"] for s in loaded.config.fedprune_layers] == [127, 120]


def test_surgery_refuses_bad_keeps_before_touching_weights():
    model = tiny_llama(0)
    groups = adapter_for(model).structure_groups(model, "query")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attn = groups[0].name
    with pytest.raises(ValueError, match="every query head of a key/value group"):
        removal_count(groups[0], 0.8, "attn ratio")
    with pytest.raises(ValueError, match=f"{attn}.*same count"):
        remove_units_(model, groups, {groups[2].name: torch.arange(64),
                                      attn: torch.tensor([0, 1, 2])})
    with pytest.raises(ValueError, match="every .* would be removed"):
        remove_units_(model, groups, {attn: torch.tensor([], dtype=torch.long)})
    with pytest.raises(ValueError, match="unknown group sets"):
        remove_units_(model, groups, {"model.layers.9.mlp:channels": torch.arange(3)})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unknown_structures_are_refused_or_left_whole():
    from fedprune.prune.adapters.base import Block
    from fedprune.prune.adapters.hf_structure import layout_of

    with pytest.raises(ValueError, match="no pruning adapter"):
        adapter_for(nn.Sequential(nn.ReLU()))
    odd = Block(3, "model.layers.3", nn.ModuleDict({"mixer": nn.Linear(4, 4)}))
    with pytest.raises(ValueError, match="block 'model.layers.3'.*no known attention/MLP"):
        layout_of(odd)

    class Cat(nn.Module):  # concatenated channels: the tracer cannot couple them
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)
            self.c, self.head = nn.Conv2d(8, 6, 1), nn.Linear(6, 2)

        def forward(self, x):
            y = self.c(torch.cat([self.a(x), self.b(x)], 1))
            return self.head(torch.relu(y).mean((2, 3)))

    groups = adapter_for(Cat()).structure_groups(Cat())
    assert [gs.name for gs in groups] == []  # c's output is reduced by an unknown mean too


# ---- criteria on hand-built layers ------------------------------------------------------

def _two_layer_group() -> tuple[GroupSet, dict[str, nn.Module]]:
    """Two channels: rows of ``up`` (2x2) and columns of ``down`` (2x2, the stats member)."""
    up, down = nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False)
    up.weight.data = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    down.weight.data = torch.tensor([[1.0, 4.0], [-1.0, 0.0]])
    gs = GroupSet("mlp", "mlp", 0, 2, (Member("up", "out", contiguous_index(2, 1)),
                                       Member("down", "in", contiguous_index(2, 1), stats=True)))
    return gs, {"up": up, "down": down}


def test_magnitude_criteria_golden():
    gs, mods = _two_layer_group()
    # channel 0: |1|+|-2| (up row 0) + |1|+|-1| (down col 0) = 5; channel 1: 3.5 + 4 = 7.5
    assert get_criterion("l1").scores(gs, mods, Evidence()).tolist() == [5.0, 7.5]
    # squares: 1+4+1+1 = 7; 9+0.25+16+0 = 25.25
    assert get_criterion("l2").scores(gs, mods, Evidence()).tolist() == [7.0, 25.25]


def test_taylor_variants_golden():
    gs, mods = _two_layer_group()
    g_up = torch.tensor([[1.0, 1.0], [-1.0, 2.0]], dtype=torch.float64)
    g_down = torch.tensor([[0.5, 0.0], [2.0, 1.0]], dtype=torch.float64)
    f_up = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    f_down = torch.zeros(2, 2, dtype=torch.float64)
    ev = Evidence(grads=GradEvidence({"up": g_up * 4, "down": g_down * 4},
                                     {"up": f_up * 2, "down": f_down}, tokens=4, samples=2))
    # W*g: up [[1,-2],[-3,1]], down [[0.5,0],[-2,0]]
    # first: ch0 = |1|+|-2| + |0.5|+|-2| = 5.5; ch1 = |-3|+|1| + 0 + 0 = 4
    assert get_criterion("taylor").scores(gs, mods, ev).tolist() == [5.5, 4.0]
    # vector: ch0 = |1-2| + |0.5-2| = 2.5; ch1 = |-3+1| + |0+0| = 2
    assert get_criterion("taylor-vector").scores(gs, mods, ev).tolist() == [2.5, 2.0]
    # second: W*F*W: up [[1,0],[0,0.5]] -> ch0 1, ch1 0.5; down 0
    assert get_criterion("taylor-second").scores(gs, mods, ev).tolist() == [1.0, 0.5]
    # mix: |W g - W F W / 2|: up [[0.5,-2],[-3,0.75]] -> ch0 2.5+2.5 = 5, ch1 3.75
    assert get_criterion("taylor-mix").scores(gs, mods, ev).tolist() == [5.0, 3.75]


def test_activation_criteria_golden():
    gs, mods = _two_layer_group()
    x = torch.tensor([[1.0, 2.0], [3.0, 2.0]], dtype=torch.float64)  # rows into ``down``
    stats = LayerStats.empty(2, False, with_sum=True)
    stats.add_batch_(x)
    ev = Evidence(stats={"down": stats})
    # wanda-sp: mean_i |W_ij| * sqrt(mean x_j^2): col0 1 * sqrt(5) ; col1 2 * sqrt(4) = 4
    got = get_criterion("wanda-sp").scores(gs, mods, ev)
    assert torch.allclose(got, torch.tensor([5 ** 0.5, 4.0], dtype=torch.float64))
    # flap: Var(x_j) * sum_i W_ij^2: var col0 = 1, col1 = 0 -> [1*2, 0*16]
    assert get_criterion("flap").scores(gs, mods, ev).tolist() == [2.0, 0.0]


def test_taylor_matches_autograd_reference_on_tiny_llama():
    model = tiny_llama(0)
    batch = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(3))
    groups = adapter_for(model).structure_groups(model, "kv")
    mlp = groups[1]
    ev = Evidence(grads=collect_gradients(model, [batch], [m.module for m in mlp.members],
                                          second_order=False))
    ours = get_criterion("taylor").scores(mlp, dict(model.named_modules()), ev)
    # independent: autograd of the HF loss, |W * g| of gate/up row c and down column c
    model.zero_grad()
    model(input_ids=batch, labels=batch).loss.backward()
    layer = model.model.layers[0].mlp
    s = lambda lin: (lin.weight * lin.weight.grad).abs().double()
    ref = s(layer.gate_proj).sum(1) + s(layer.up_proj).sum(1) + s(layer.down_proj).sum(0)
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-9)


def test_federated_evidence_adds_up_to_central():
    model = tiny_llama(0)
    gen = torch.Generator().manual_seed(5)
    a, b = torch.randint(0, 256, (2, 16), generator=gen), torch.randint(0, 256, (3, 16),
                                                                        generator=gen)
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    both = collect_gradients(model, [torch.cat([a, b])], names, second_order=True)
    split = (collect_gradients(model, [a], names, second_order=True)
             + collect_gradients(model, [b], names, second_order=True))
    assert (split.tokens, split.samples) == (both.tokens, both.samples) == (75, 5)
    for n in names:
        assert torch.allclose(split.grad(n), both.grad(n), rtol=1e-6, atol=1e-12)
        assert torch.allclose(split.fisher(n), both.fisher(n), rtol=1e-6, atol=1e-14)
    # and the scores and the kept structure follow: shrink with summed evidence = central
    cfg = StructuredConfig("flap", "adaptive", 0.3)
    central, fed = tiny_llama(0), tiny_llama(0)
    shrink(central, cfg, [torch.cat([a, b])])
    half = [gather_evidence(fed, [], cfg, [x]) for x in (a, b)]
    summed = Evidence(stats={k: half[0].stats[k] + half[1].stats[k] for k in half[0].stats})
    shrink(fed, cfg, evidence=summed)
    assert adapter_for(fed).layer_shapes(fed) == adapter_for(central).layer_shapes(central)
    x = torch.randint(0, 256, (1, 12))
    assert torch.allclose(_out(fed, x), _out(central, x), atol=1e-5)


# ---- allocation ---------------------------------------------------------------------------

def _flat_set(name: str, units: int, bucket: int = 0) -> GroupSet:
    return GroupSet(name, "mlp", 0, units, (Member(name, "out", contiguous_index(units, 1)),),
                    bucket)


def test_uniform_keep_removes_the_lowest_per_set_and_per_bucket():
    a, b = _flat_set("a", 4), _flat_set("b", 4, bucket=2)
    scores = {"a": torch.tensor([3.0, 1.0, 2.0, 0.5]), "b": torch.tensor([1.0, 2.0, 9.0, 0.0])}
    keep = uniform_keep([a, b], scores, {"mlp": 0.5})
    assert keep["a"].tolist() == [0, 2]
    assert keep["b"].tolist() == [1, 2]  # the best of each bucket


def test_adaptive_keep_ranks_standardized_scores_weighted_by_parameters():
    mods = {"a": nn.Linear(1, 4, bias=False), "b": nn.Linear(1, 4, bias=False)}
    a, b = _flat_set("a", 4), _flat_set("b", 4)
    # raw scales differ by 1000x (raw ranking would take b's two worst); standardized,
    # b's worst (z=-1.49) and a's worst (z=-1.16) go
    scores = {"a": torch.tensor([1000.0, 2000.0, 3000.0, 0.0]),
              "b": torch.tensor([1.0, 2.0, 2.5, 2.4])}
    keep = adaptive_keep([a, b], scores, mods, target=2)  # 2 of 8 params
    assert keep["a"].tolist() == [0, 1, 2] and keep["b"].tolist() == [1, 2, 3]


def test_fraction_is_of_decoder_parameters_and_kinds_are_respected():
    model = tiny_llama(0)
    report = shrink(model, StructuredConfig("l2", "uniform", 0.2, prune="mlp"),
                    [torch.randint(0, 256, (1, 8))])
    assert abs(report.decoder_removed - 0.2) < 0.01
    assert all(s["heads"] == 4 and s["kv_heads"] == 2 for s in report.layers)
    with pytest.raises(ValueError, match="can remove at most"):
        shrink(tiny_llama(0), StructuredConfig("l2", "uniform", 0.9, prune="heads"), None)


def test_bias_compensation_keeps_the_mean_output():
    lin = nn.Linear(3, 2, bias=False)
    lin.weight.data = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 1.0]])
    gs = GroupSet("g", "mlp", 0, 3, (Member("lin", "in", contiguous_index(3, 1), stats=True),))
    model = nn.Sequential()
    model.add_module("lin", lin)
    lin.bias = nn.Parameter(torch.zeros(2))
    x = torch.tensor([[1.0, 2.0, -1.0], [3.0, 4.0, 0.0]])
    before = lin(x).mean(0)
    compensate_bias_(model, [gs], {"g": torch.tensor([0, 2])}, {"lin": x.double().mean(0)})
    lin.weight.data[:, 1] = 0.0  # the removed column
    assert torch.allclose(lin(x).mean(0), before)
    assert torch.allclose(lin.bias.data, torch.tensor([6.0, -3.0]))


# ---- depth -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def planted_llama():
    """A 4-block tiny Llama trained a little, whose block 2 computes the identity."""
    return _llama_with_identity_block(2)


def _llama_with_identity_block(planted: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=4, num_attention_heads=4,
                                         num_key_value_heads=2, tie_word_embeddings=False)).eval()
    layer = model.model.layers[planted]
    with torch.no_grad():  # no residual branch output: the block computes the identity
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    frozen = {id(layer.self_attn.o_proj.weight), id(layer.mlp.down_proj.weight)}
    opt = torch.optim.Adam([p for p in model.parameters() if id(p) not in frozen], lr=3e-3)
    batch = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))
    for _ in range(40):  # the other blocks learn the text: removing one of them hurts
        opt.zero_grad()
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("criterion", ["ppl", "taylor", "block-influence"])
def test_depth_removes_exactly_the_planted_block(tmp_path, criterion, planted_llama):
    import copy

    from transformers import AutoModelForCausalLM

    from fedprune.prune.structured.depth import DepthConfig, prune_depth

    model, reference = copy.deepcopy(planted_llama), planted_llama
    calib = [torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))]
    done = prune_depth(model, DepthConfig(criterion, 1), calib)
    assert done["removed"] == [2]
    assert model.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    x = torch.randint(0, 256, (2, 16))
    assert torch.allclose(_out(model, x), _out(reference, x), atol=1e-5)
    save_pruned(model, tmp_path)
    assert torch.equal(_out(AutoModelForCausalLM.from_pretrained(tmp_path), x), _out(model, x))


def test_depth_plus_heuristic_protects_first_and_last_blocks():
    from fedprune.config import ConfigError
    from fedprune.prune.structured.depth import blocks_to_remove

    scores = torch.tensor([0.0, 5.0, 1.0, 4.0, 3.0, 2.0, 0.5, 0.1])
    assert blocks_to_remove(scores, 2) == [0, 7]
    assert blocks_to_remove(scores, 1, protect_first=4, protect_last=2) == [5]
    with pytest.raises(ConfigError, match="only 2 of 8 blocks"):
        blocks_to_remove(scores, 3, protect_first=4, protect_last=2)


@pytest.mark.slow
def test_shrink_cli_end_to_end(tmp_path, data_root):
    import json

    from fedprune.cli import main

    out = tmp_path / "run"
    assert main(["shrink", "--model", "tiny-llama", "--criterion", "flap", "--bias-compensation",
                 "--fraction", "0.3", "--calib", "ptb:4x64", "--eval", "wikitext2:4x64,ptb:4x64",
                 "--out", str(out), "--heads", "query", "--recover-steps", "3",
                 "--recover-text", "ptb:8x32"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "done" and report["loads_with_transformers"] is True
    assert set(report["recovered_ppl"]) == {"wikitext2", "ptb"}
    assert report["recovery"]["config"]["steps"] == 3
    assert abs(report["decoder_removed"] - 0.3) < 0.05
    assert set(report["pruned_ppl"]) == {"wikitext2", "ptb"}
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out / "model")
    assert loaded.config.attention_bias and loaded.config.intermediate_size < 128
    assert main(["shrink", "--model", "tiny-llama", "--fraction", "0.9", "--prune", "heads",
                 "--calib", "ptb:2x32", "--eval", "", "--out", str(tmp_path / "bad")]) == 2


# ---- CNNs ----------------------------------------------------------------------------------

def _cnn(name: str, dataset: str = "cifar10"):
    from fedprune.config import ModelConfig
    from fedprune.models.registry import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, width=8), dataset).eval()
    for m in model.modules():  # non-trivial BN statistics, so a wrong slice shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    return model


@pytest.mark.parametrize("name,dataset,residual", [
    ("resnet8", "cifar10", "group"), ("resnet8", "cifar10", "skip"),
    ("resnet20", "cifar10", "group"), ("vgg11_bn", "cifar10", "group"),
    ("convnet", "mnist", "group")])
def test_cnn_pruned_equals_masked_and_reloads_without_masks(tmp_path, name, dataset, residual):
    import copy

    from fedprune.prune.structured.io import load_cnn, save_cnn

    masked = _cnn(name, dataset)
    pruned = copy.deepcopy(masked)
    groups = adapter_for(masked).structure_groups(masked, residual=residual)
    keep = _random_keep(groups)
    mask_units_(masked, groups, keep)
    remove_units_(pruned, adapter_for(pruned).structure_groups(pruned, residual=residual), keep)
    x = torch.randn(2, *(3, 32, 32) if dataset == "cifar10" else (1, 28, 28))
    with torch.no_grad():
        assert torch.allclose(masked(x), pruned(x), atol=1e-5)
        assert not torch.allclose(_cnn(name, dataset)(x), pruned(x), atol=1e-3)
    save_cnn(pruned, tmp_path, {"name": name, "width": 8, "dataset": dataset})
    loaded = load_cnn(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
    assert sum(p.numel() for p in loaded.parameters()) < sum(
        p.numel() for p in _cnn(name, dataset).parameters())


def test_resnet_residual_channels_form_one_group():
    model = _cnn("resnet8")
    groups = {gs.name: gs for gs in adapter_for(model).structure_groups(model)}
    stage0 = next(gs for gs in groups.values() if "conv1" in {m.module for m in gs.members})
    members = {(m.module, m.axis) for m in stage0.members}
    # the stem conv and block 0's conv2 are both added into the stage-0 residual stream;
    # their BNs, block 0's conv1 and stage 1's conv1 and 1x1 shortcut read it
    assert members == {("conv1", "out"), ("layers.0.0.conv2", "out"), ("bn1", "out"),
                       ("layers.0.0.bn2", "out"), ("layers.0.0.conv1", "in"),
                       ("layers.1.0.conv1", "in"), ("layers.1.0.shortcut.0", "in")}
    assert stage0.unit_label == "residual-tied channel"
    skip = adapter_for(model).structure_groups(model, residual="skip")
    assert all(gs.unit_label == "channel" for gs in skip) and len(skip) == 3
    # the classifier's output space reaches the logits: never offered
    assert not any(m.module == "fc" and m.axis == "out" for gs in groups.values()
                   for m in gs.members)


def test_beta_rank_golden():
    from fedprune.prune.structured.evidence import collect_beta_stats

    conv = nn.Conv2d(1, 3, (1, 2), bias=False)
    conv.weight.data = torch.tensor([[[[1.0, 1.0]]], [[[1.0, -1.0]]], [[[3.0, 1.0]]]])
    model = nn.Sequential()
    model.add_module("conv", conv)
    x = torch.tensor([[[[1.0, 3.0]]], [[[3.0, 1.0]]]])  # two images of 1x2 pixels
    ev = Evidence(beta=collect_beta_stats(model, [x], ["conv"]))
    gs = GroupSet("conv:channels", "channels", 0, 3, (Member("conv", "out",
                                                             contiguous_index(3, 1)),))
    # patch spread over samples: {1,3,3,1} -> 1. Outputs: f0 -> 4, 4 (no spread: skipped),
    # f1 -> -2, 2 (spread 2), f2 -> 6, 10 (spread 2). Score = L1 * sigma_in / sigma_out:
    # f0: 2 * 0 = 0, f1: 2 * 1/2 = 1, f2: 4 * 1/2 = 2 (the public code's sigma_out / sigma_in
    # would give f1 4, f2 8)
    got = get_criterion("beta-rank").scores(gs, {"conv": conv}, ev)
    assert torch.allclose(got, torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64))


def test_cnn_criteria_shrink_to_the_fraction_and_taylor_uses_labels():
    import copy

    base = _cnn("resnet8")
    gen = torch.Generator().manual_seed(0)
    calib = [(torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 10, (8,), generator=gen))]
    before = sum(p.numel() for p in base.parameters())
    for crit in ("l1", "taylor", "wanda-sp", "beta-rank"):
        for alloc in ("uniform", "adaptive"):
            model = copy.deepcopy(base)
            report = shrink(model, StructuredConfig(crit, alloc, 0.4), calib)
            assert abs(report.decoder_removed - 0.4) < 0.02, (crit, alloc)
            assert sum(p.numel() for p in model.parameters()) == report.params_after < before
            assert model(calib[0][0]).shape == (8, 10)


# ---- recovery ------------------------------------------------------------------------------

def test_lora_recovery_lowers_loss_and_keeps_unstructured_sparsity():
    from fedprune.prune.structured.recovery import LoraRecoveryConfig, lora_recover

    model = tiny_llama(0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # 50% unstructured sparsity in every block layer
        for name, p in model.named_parameters():
            if ".layers." in name and p.dim() == 2:
                p.mul_((torch.rand(p.shape, generator=gen) > 0.5).float())
    zeros = {n: (p == 0) for n, p in model.named_parameters() if ".layers." in n and p.dim() == 2}
    train = torch.randint(0, 256, (8, 32), generator=gen)
    merged, report = lora_recover(model, train, LoraRecoveryConfig(steps=25, lr=3e-3,
                                                                    keep_masks=True))
    assert type(merged).__name__ == "LlamaForCausalLM"  # merged: no peft wrapper left
    assert report["train_loss_after"] < report["train_loss_before"] - 0.05
    params = dict(merged.named_parameters())
    assert all(torch.equal(params[n] == 0, z) for n, z in zeros.items())


def test_lora_recovery_merges_into_a_structurally_pruned_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from fedprune.prune.structured.recovery import LoraRecoveryConfig, lora_recover

    model = tiny_llama(0)
    shrink(model, StructuredConfig("l2", "uniform", 0.3), None)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    train = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    merged, report = lora_recover(model, train, LoraRecoveryConfig(steps=10, lr=3e-3))
    assert {n: p.shape for n, p in merged.named_parameters()} == shapes
    assert report["train_loss_after"] < report["train_loss_before"]
    save_pruned(merged, tmp_path)
    x = torch.randint(0, 256, (1, 12))
    assert torch.equal(_out(AutoModelForCausalLM.from_pretrained(tmp_path), x), _out(merged, x))


def test_round_to_keeps_multiples_of_the_granule():
    from fedprune.prune.structured.select import round_kept

    assert [round_kept(k, 1536, 32) for k in (1279, 1264, 1263, 10, 1536)] == \
        [1280, 1280, 1248, 32, 1536]
    assert round_kept(7, 8, 32) == 7  # a set smaller than the granule is left alone
    for alloc in ("uniform", "adaptive"):
        model = tiny_llama(0)
        report = shrink(model, StructuredConfig("l2", alloc, 0.25, prune="mlp", round_to=32),
                        None)
        assert all(s["intermediate"] % 32 == 0 for s in report.layers), report.layers


def test_channel_pruned_run_state_survives_a_checkpoint_and_reaches_the_clients(data_root):
    """The server removes channels mid-run; a resumed server rebuilds the shapes from the
    method's state before loading the checkpoint; a client builds its model from the
    payload's channel counts and decodes the global weights strictly."""
    from fedprune.fl.client_core import prepare_model
    from fedprune.fl.server_core import SparseServer
    from fedprune.methods import method_class

    cfg = load_config("default", ["method.name=channel-prune", "model.width=4",
                                  "mask.density=0.5", "data.num_clients=2"])
    core = SparseServer(cfg)
    method = method_class("channel-prune")(cfg, core)
    groups = adapter_for(core.model).structure_groups(core.model)
    keep = {gs.name: torch.randperm(gs.units, generator=torch.Generator().manual_seed(0))
            [:max(1, gs.units // 2)] for gs in groups}
    before = {n: m.copy() for n, m in core.masks.items()}
    core.restructure_({n: int(k.numel()) for n, k in keep.items()}, keep)
    # each mask is the old one sliced by the kept output and input channels of its layer
    kept = {(m.module, m.axis): keep[gs.name].sort().values for gs in groups
            for m in gs.members}
    for name, old in before.items():
        layer = name.removesuffix(".weight")
        rows = kept.get((layer, "out"), torch.arange(old.shape[0])).numpy()
        expected = old[rows]
        if old.ndim > 1:
            expected = expected[:, kept.get((layer, "in"), torch.arange(old.shape[1])).numpy()]
        assert np.array_equal(core.masks[name], expected), name
    saved = method.state_dict()
    assert set(saved) == {f"channels/{gs.name}" for gs in groups}

    resumed = SparseServer(cfg)
    method_class("channel-prune")(cfg, resumed).load_state_dict(saved)
    resumed.set_masks({n: torch.from_numpy(m) for n, m in core.masks.items()}, core.state)
    assert all(np.array_equal(resumed.state[k], v) for k, v in core.state.items())
    model, masks = prepare_model(cfg, resumed.encode_down(resumed.state))
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    assert all(np.array_equal(state[k], v) for k, v in core.state.items())
    assert all(np.array_equal(masks[k], v) for k, v in core.masks.items())


def test_a_layer_in_two_roles_counts_once_per_role():
    conv = nn.Conv2d(2, 2, 1, bias=False)  # y = x + conv(x): its input and output tied
    conv.weight.data = torch.tensor([[[[1.0]], [[2.0]]], [[[3.0]], [[-4.0]]]])
    idx = contiguous_index(2, 1)
    gs = GroupSet("conv:channels", "channels", 0, 2,
                  (Member("conv", "out", idx), Member("conv", "in", idx)))
    # channel 0: row 0 (1 + 2) + column 0 (1 + 3) = 7; channel 1: row 1 (3 + 4) + col 1 (2 + 4)
    assert get_criterion("l1").scores(gs, {"conv": conv}, Evidence()).tolist() == [7.0, 13.0]


def test_channels_behind_an_unfollowed_flatten_are_left_whole():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 5, 1)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            y = self.b(torch.relu(self.a(x)))  # a's channels: a plain, prunable space
            return self.head(y.flatten(2).mean(-1)[:, :4])  # b's: flatten(2), then unknown

    names = [gs.name for gs in adapter_for(Odd()).structure_groups(Odd())]
    assert names == ["a:channels"]


def test_bias_compensation_on_a_family_that_hard_codes_no_bias_loads_exactly(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2,
                                         tie_word_embeddings=False)).eval()
    calib = [torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))]
    shrink(model, StructuredConfig("flap", "uniform", 0.3, bias_compensation=True), calib)
    assert model.model.layers[0].self_attn.o_proj.bias.abs().sum() > 0  # compensated
    assert not loads_plainly(model.config)  # Qwen2 builds o_proj and the MLP without bias
    save_pruned(model, tmp_path)
    x = torch.randint(0, 256, (1, 12))
    assert torch.equal(_out(load_pruned(tmp_path), x), _out(model, x))


def test_clients_channel_evidence_adds_up_to_the_union(data_root):
    from fedprune.methods.channels import ChannelPrune, _EvidenceHooks
    from fedprune.prune.structured.evidence import (classification_loss, collect_beta_stats,
                                                    collect_gradients)

    for criterion in ("taylor-second", "beta-rank"):
        cfg = load_config("default", ["method.name=channel-prune", "model.width=4",
                                      f"method.criterion={criterion}",
                                      "method.evidence_batches=2"])
        model = _cnn("resnet8")
        gen = torch.Generator().manual_seed(2)
        data = [[(torch.randn(4, 3, 32, 32, generator=gen),
                  torch.randint(0, 10, (4,), generator=gen)) for _ in range(2)]
                for _ in range(2)]  # two clients, two batches each
        parts = [_EvidenceHooks(cfg, model, "cpu").finish(d)[1]["evidence"] for d in data]
        fed = ChannelPrune._evidence(parts)
        union = [b for d in data for b in d]
        if criterion == "beta-rank":
            central = collect_beta_stats(model, union, list(fed.beta))
            for name, b in central.items():
                assert torch.allclose(fed.beta[name].sigma_out(), b.sigma_out(), rtol=1e-6)
                assert torch.allclose(fed.beta[name].sigma_in(), b.sigma_in(), rtol=1e-6)
            continue
        central = collect_gradients(model, union, list(fed.grads.grad_sum), True,
                                    classification_loss)
        for name in central.grad_sum:  # float32 on the wire
            assert torch.allclose(fed.grads.grad(name), central.grad(name), rtol=1e-5,
                                  atol=1e-9)
            assert torch.allclose(fed.grads.fisher(name), central.fisher(name), rtol=1e-5,
                                  atol=1e-12)
