"""Masks: prunable tensors, exact allocation (uniform, ERK), selection, init, counts, FLOPs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedprune.config import ConfigError, load_config
from fedprune.masks import (
    MASK_INITS,
    apply_masks_,
    check_masks,
    count_flops,
    count_params,
    erk_counts,
    erk_densities,
    full_masks,
    get_mask_init,
    global_density,
    init_masks,
    kept_counts,
    largest_remainder,
    layer_densities,
    mask_grads_,
    prunable_names,
    register_mask_init,
    select_global,
    topk_mask,
    uniform_counts,
)
from torch_helpers import linear


def tiny_cnn() -> nn.Module:
    """Conv(3->8, bias) - BN - ReLU - [Conv(8->16) - BN - ReLU] - pool - Linear(64->10)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10),
    )


CNN_PRUNABLE = {"0.weight": 216, "3.0.weight": 1152, "6.weight": 640}


def two_linear(a: list[list[float]], b: list[list[float]]) -> nn.Module:
    return nn.ModuleDict({"a": linear(a), "b": linear(b)})


def kept_positions(mask: torch.Tensor) -> set[tuple[int, ...]]:
    return {tuple(i) for i in torch.nonzero(mask).tolist()}


# ----------------------------------------------------------------------------- prunable names


def test_prunable_names_are_conv_linear_weights_in_module_order():
    model = tiny_cnn()
    assert prunable_names(model) == list(CNN_PRUNABLE)
    names = set(prunable_names(model))
    for bad in ("0.bias", "1.weight", "1.bias", "3.1.weight", "3.1.bias", "6.bias"):
        assert bad not in names


def test_exclude_patterns_keep_tensors_dense_and_typos_fail():
    model = tiny_cnn()
    assert prunable_names(model, exclude=["6.*"]) == ["0.weight", "3.0.weight"]
    assert set(full_masks(model, exclude=["0.weight"])) == {"3.0.weight", "6.weight"}
    with pytest.raises(ValueError, match="no_such"):
        prunable_names(model, exclude=["no_such.weight"])


def test_tied_weight_is_listed_once():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    assert prunable_names(model) == ["0.weight"]


# ----------------------------------------------------------------------------- selection


def test_topk_mask_is_exact_with_ties_and_breaks_them_by_position():
    scores = torch.tensor([[1.0, 2.0, 2.0], [2.0, 0.0, 2.0]])
    mask = topk_mask(scores, 2)
    assert int(mask.sum()) == 2
    assert kept_positions(mask) == {(0, 1), (0, 2)}  # earliest of the tied 2.0s
    assert int(topk_mask(torch.ones(5), 3).sum()) == 3
    many = torch.zeros(5000)
    many[::3] = 1.0  # 1667 tied maxima: the first 10 in C order win
    assert torch.nonzero(topk_mask(many, 10)).squeeze(1).tolist() == list(range(0, 30, 3))
    with pytest.raises(ValueError):
        topk_mask(scores, 7)


def test_largest_remainder_rounds_exactly_within_bounds():
    # floors 21, 115, 64 = 200; the one extra goes to the largest remainder (21.6).
    assert largest_remainder([21.6, 115.2, 64.0], [216, 1152, 640], 201) == [22, 115, 64]
    # floors raised to 1 overshoot; the excess comes out of the only layer above 1.
    assert largest_remainder([0.2, 0.3, 9.5], [10, 10, 10], 10) == [1, 1, 8]
    # floors 1, 2, 3 = 6; two extras: to 2.7 (remainder .7), then 1.2 (.2) before 3.1 (.1).
    assert largest_remainder([1.2, 2.7, 3.1], [9, 9, 9], 8, floor=0) == [2, 3, 3]
    assert uniform_counts(CNN_PRUNABLE, 0.1) == {"0.weight": 22, "3.0.weight": 115,
                                                 "6.weight": 64}


# ----------------------------------------------------------------------------- golden inits


def test_uniform_golden_2x2_keeps_minus4_and_3():
    model = linear([[1.0, -4.0], [3.0, 2.0]])
    masks = init_masks(model, 0.5, "uniform")
    assert kept_positions(masks["weight"]) == {(0, 1), (1, 0)}


def test_global_magnitude_golden_two_layers():
    # |w| over both layers: 6 (b01), 5 (b00), 4 (a01), 3.5 (b10), 3 (a10), ... ; K = 4.
    model = two_linear([[1.0, -4.0], [3.0, 2.0]], [[-5.0, 6.0], [3.5, 0.1]])
    masks = init_masks(model, 0.5, "global_magnitude")
    assert kept_positions(masks["a.weight"]) == {(0, 1)}
    assert kept_positions(masks["b.weight"]) == {(0, 0), (0, 1), (1, 0)}
    uniform = init_masks(model, 0.5, "uniform")  # 2 + 2: a different mask
    assert kept_positions(uniform["a.weight"]) == {(0, 1), (1, 0)}


def test_global_magnitude_keeps_each_layers_best_weight():
    # Pure global top-3 would be 4, 3, 2 (all in a); b keeps its largest |w| = 0.5 instead.
    model = two_linear([[1.0, -4.0], [3.0, 2.0]], [[0.5, -0.25]])
    masks = init_masks(model, 0.5, "global_magnitude")
    assert kept_positions(masks["a.weight"]) == {(0, 1), (1, 0)}
    assert kept_positions(masks["b.weight"]) == {(0, 0)}


def test_select_global_ties_are_deterministic():
    scores = {"x": torch.ones(2, 2), "y": torch.ones(3)}
    masks = select_global(scores, 3, min_per_layer=0)
    assert kept_positions(masks["x"]) == {(0, 0), (0, 1), (1, 0)}
    assert int(masks["y"].sum()) == 0


def test_erk_densities_match_hand_computed_eps():
    # A: (4, 6) raw (4+6)/24, n 24; B: (2, 4) raw 6/8, n 8. Target 0.5 * 32 = 16 weights.
    # eps = 16 / (10 + 6) = 1  ->  A 10/24 (10 weights), B 6/8 (6 weights).
    shapes = {"a": (4, 6), "b": (2, 4)}
    eps = 16 / (10 + 6)
    dens = erk_densities(shapes, 0.5)
    assert dens["a"] == pytest.approx(eps * 10 / 24)
    assert dens["b"] == pytest.approx(eps * 6 / 8)
    model = two_linear(torch.randn(4, 6).tolist(), torch.randn(2, 4).tolist())
    assert kept_counts(init_masks(model, 0.5, "erk")) == {"a.weight": 10, "b.weight": 6}


def test_erk_conv_formula():
    # conv (8, 3, 3, 3): raw 17/216; linear (4, 8): raw 12/32. Target 0.25 * 248 = 62.
    eps = 62 / (17 + 12)
    dens = erk_densities({"conv": (8, 3, 3, 3), "fc": (4, 8)}, 0.25)
    assert dens["conv"] == pytest.approx(eps * 17 / 216)
    assert dens["fc"] == pytest.approx(eps * 12 / 32)


def test_erk_caps_tiny_layer_dense_and_resolves_eps():
    # big (10, 20): raw 30/200; tiny (2, 2): raw 1. Target 0.5 * 204 = 102.
    # eps = 102 / (30 + 4) = 3 -> tiny at 3 > 1: dense (4), re-solve eps = 98 / 30.
    shapes = {"big": (10, 20), "tiny": (2, 2)}
    dens = erk_densities(shapes, 0.5)
    assert dens["tiny"] == 1.0
    assert dens["big"] == pytest.approx(98 / 30 * 30 / 200)
    assert erk_counts(shapes, 0.5) == {"big": 98, "tiny": 4}


# ----------------------------------------------------------------------------- init contract


@pytest.mark.parametrize("method", ["uniform", "erk", "global_magnitude", "random"])
@pytest.mark.parametrize("density", [0.01, 0.05, 0.1, 0.5, 1.0])
def test_init_exact_global_count(method, density):
    model = tiny_cnn()
    masks = init_masks(model, density, method, seed=1)
    counts = kept_counts(masks)
    assert set(masks) == set(CNN_PRUNABLE)
    assert sum(counts.values()) == round(density * sum(CNN_PRUNABLE.values()))
    assert all(c >= 1 for c in counts.values())
    for name, mask in masks.items():
        assert mask.dtype == torch.bool and mask.shape == dict(model.named_parameters())[name].shape
    check_masks(model, masks)


def test_uniform_and_random_share_the_uniform_allocation():
    model = tiny_cnn()
    expected = uniform_counts(CNN_PRUNABLE, 0.1)
    assert kept_counts(init_masks(model, 0.1, "uniform")) == expected
    assert kept_counts(init_masks(model, 0.1, "random", seed=3)) == expected


def test_dense_init_and_density_validation():
    model = tiny_cnn()
    assert global_density(init_masks(model, 0.3, "dense")) == 1.0
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="mask.density"):
            init_masks(model, bad, "uniform")
    with pytest.raises(ValueError, match="uniform"):  # the message lists the valid names
        init_masks(model, 0.5, "nope")


def test_random_init_is_seeded():
    model = tiny_cnn()
    a = init_masks(model, 0.2, "random", seed=5)
    b = init_masks(model, 0.2, "random", seed=5)
    c = init_masks(model, 0.2, "random", seed=6)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_registry_is_what_the_fixed_method_accepts_and_refuses_duplicates():
    for name in MASK_INITS:
        assert load_config(None, [f"method.init={name}"]).method.init == name
    with pytest.raises(ConfigError, match="global_magnitude"):
        load_config(None, ["method.init=magnitude"])
    with pytest.raises(ValueError, match="already registered"):
        register_mask_init("erk")(lambda w, d, g: {})
    with pytest.raises(ValueError, match="global_magnitude"):
        get_mask_init("magnitude")


# ----------------------------------------------------------------------------- apply, grads


def test_apply_masks_zeroes_exactly_the_pruned_entries():
    model = tiny_cnn()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = init_masks(model, 0.3, "random", seed=0)
    apply_masks_(model, masks)
    params = dict(model.named_parameters())
    for name, p in params.items():
        if name in masks:
            assert torch.all(p[~masks[name]] == 0)
            assert torch.equal(p[masks[name]], before[name][masks[name]])
        else:
            assert torch.equal(p, before[name])  # biases and BN untouched


def test_mask_grads_zeroes_pruned_grads_and_skips_missing_grads():
    model = tiny_cnn()
    model[6].weight.requires_grad_(False)
    masks = init_masks(model, 0.3, "uniform")
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    mask_grads_(model, masks)
    assert model[6].weight.grad is None
    for name in ("0.weight", "3.0.weight"):
        g = dict(model.named_parameters())[name].grad
        assert torch.all(g[~masks[name]] == 0)
        assert torch.equal(g[masks[name]], grads[name][masks[name]])
        assert bool((grads[name][~masks[name]] != 0).any())  # there was something to zero
    assert torch.equal(model[0].bias.grad, grads["0.bias"])


def test_check_masks_names_the_tensor():
    model = tiny_cnn()
    masks = full_masks(model)
    cases = {
        "ghost.weight": torch.ones(2, dtype=torch.bool),
        "1.weight": torch.ones(8, dtype=torch.bool),  # BN weight
        "0.weight": torch.ones(8, 3, 3, 3),  # float, not bool
        "6.weight": torch.ones(10, 63, dtype=torch.bool),
    }
    for name, bad in cases.items():
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            check_masks(model, {**masks, name: bad})


def test_densities():
    masks = {"a": torch.tensor([True, False, False, False]), "b": torch.tensor([True, True])}
    assert kept_counts(masks) == {"a": 1, "b": 2}
    assert layer_densities(masks) == {"a": 0.25, "b": 1.0}
    assert global_density(masks) == 0.5


# ----------------------------------------------------------------------------- counts, FLOPs


def test_count_params_respects_masks():
    model = tiny_cnn()
    total = 216 + 8 + 16 + 1152 + 32 + 640 + 10
    dense = count_params(model)
    assert dense == {"total": total, "prunable": 2008, "prunable_kept": 2008,
                     "effective": total, "prunable_density": 1.0}
    masks = init_masks(model, 0.1, "erk")
    sparse = count_params(model, masks)
    assert sparse["prunable_kept"] == round(0.1 * 2008)
    assert sparse["effective"] == total - 2008 + round(0.1 * 2008)


def test_flops_conv_golden_and_masked_quarter():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    out = count_flops(conv, (1, 3, 8, 8))
    assert out["inference_dense"] == 2 * 8 * 3 * 3 * 3 * 8 * 8
    assert out["inference"] == out["inference_dense"]
    masks = init_masks(conv, 0.25, "uniform")  # 54 of 216 kept
    sparse = count_flops(conv, (4, 3, 8, 8), masks)  # per example: batch size cancels
    assert sparse["inference_dense"] == 2 * 8 * 3 * 3 * 3 * 8 * 8
    assert sparse["inference"] == 2 * 8 * 3 * 3 * 3 * 8 * 8 / 4
    assert sparse["training"] == 3 * sparse["inference"]
    assert sparse["training_dense"] == 3 * sparse["inference_dense"]
    assert sparse["layers"]["weight"]["density"] == 0.25


def test_flops_linear_grouped_conv_and_bn_not_counted():
    assert count_flops(nn.Linear(10, 5), (2, 10))["inference_dense"] == 2 * 10 * 5
    assert count_flops(nn.Linear(10, 5), (2, 7, 10))["inference_dense"] == 2 * 10 * 5 * 7
    grouped = nn.Conv2d(4, 8, 3, padding=1, groups=2)
    assert count_flops(grouped, (1, 4, 6, 6))["inference_dense"] == 2 * 8 * 2 * 3 * 3 * 6 * 6
    model = tiny_cnn()
    out = count_flops(model, (1, 3, 8, 8))
    expected = {"0.weight": 2 * 216 * 64, "3.0.weight": 2 * 1152 * 64, "6.weight": 2 * 640}
    assert {n: v["dense"] for n, v in out["layers"].items()} == expected
    assert out["inference_dense"] == sum(expected.values())


def test_flops_restore_modes_and_leave_bn_stats():
    model = tiny_cnn()
    model.train()
    model[3].eval()
    stats = model[1].running_mean.clone()
    count_flops(model, (2, 3, 8, 8))
    assert model.training and model[0].training and not model[3].training
    assert not model[3][1].training
    assert torch.equal(model[1].running_mean, stats)
