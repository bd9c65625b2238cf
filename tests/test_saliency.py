"""Saliency scores at init: SNIP and SynFlow against hand-computed and closed-form cases."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedprune.config import ModelConfig
from fedprune.methods import method_names

CLIENT_SCORED = ("snip", "synflow")  # the methods whose clients score the model
from fedprune.masks import prunable_names, select_global
from fedprune.masks.saliency import (
    SCORERS,
    get_scorer,
    masks_from_scores,
    register_scorer,
    snip_scores,
    synflow_scores,
)
from fedprune.models import build_model
from torch_helpers import linear


def tiny_bn_cnn() -> nn.Module:
    """Conv(3->4) - BN - ReLU - pool - Linear(16->3): BN makes train/eval mode matter."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3),
    )


def random_batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


# ----------------------------------------------------------------------------- SNIP


def test_snip_golden_hand_computed():
    # Equal logits on both examples, so softmax p = [.5, .5]:
    #   x1 = [1, 1, 0], y=0: logits (3, 3), p - onehot = [-.5, .5]
    #   x2 = [0, 0, 1], y=1: logits (4, 4), p - onehot = [.5, -.5]
    # dL/dW = (p - onehot)^T x / B = [[-.25, -.25, .25], [.25, .25, -.25]]
    # |dL/dW * W| with W = [[1, 2, 4], [2, 1, 4]]:
    model = linear([[1, 2, 4], [2, 1, 4]])
    x = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    y = torch.tensor([0, 1])
    scores = snip_scores(model, [(x, y)], ["weight"])
    expected = torch.tensor([[0.25, 0.5, 1.0], [0.5, 0.25, 1.0]])
    assert scores["weight"].dtype == torch.float32 and scores["weight"].device.type == "cpu"
    assert torch.allclose(scores["weight"], expected, atol=1e-7)


def test_snip_matches_softmax_closed_form():
    torch.manual_seed(1)
    model = nn.Linear(3, 2, bias=False)
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    w = model.weight.detach().clone()  # (2, 3)
    p = torch.softmax(x @ w.T, dim=1)  # (B, 2)
    grad = (p - nn.functional.one_hot(y, 2).float()).T @ x / len(x)  # (2, 3)
    scores = snip_scores(model, [(x, y)], ["weight"])
    assert torch.allclose(scores["weight"], (grad * w).abs(), atol=1e-6)


def test_snip_is_the_mean_over_batches_and_leaves_model_untouched():
    model = tiny_bn_cnn().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}  # weights and BN stats
    names = prunable_names(model)
    b1, b2 = random_batch(4, 1), random_batch(6, 2)
    both = snip_scores(model, [b1, b2], names)
    one, two = snip_scores(model, [b1], names), snip_scores(model, [b2], names)
    for n in names:
        assert torch.allclose(both[n], (one[n] + two[n]) / 2, atol=1e-6)
        assert not torch.allclose(one[n], two[n])  # the batches really differ
    assert not model.training  # eval flag kept although SNIP scores in train mode
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert snip_scores(model.train(), [b1], names) and model.training


def test_snip_scores_in_train_mode():
    # Eval-mode BN (running stats 0/1) gives other gradients than batch statistics.
    model = tiny_bn_cnn()
    names = prunable_names(model)
    batch = random_batch(8, 3)
    model.eval()
    scores = snip_scores(model, [batch], names)
    model.train()
    x, y = batch
    nn.functional.cross_entropy(model(x), y).backward()
    for n in names:
        p = model.get_parameter(n)
        assert torch.allclose(scores[n], (p.grad * p).abs().detach(), atol=1e-6)


def test_snip_refuses_no_batches_and_unknown_names():
    model = linear([[1.0, 2.0]])
    with pytest.raises(ValueError, match="no batches"):
        snip_scores(model, [], ["weight"])
    with pytest.raises(ValueError, match="nope"):
        snip_scores(model, [(torch.ones(1, 2), torch.tensor([0]))], ["nope"])


# ----------------------------------------------------------------------------- SynFlow


def two_layer(w1: torch.Tensor, w2: torch.Tensor) -> nn.Module:
    """Linear(3, 4) - ReLU - Linear(4, 2), bias-free, with signed weights."""
    return nn.Sequential(linear(w1.tolist()), nn.ReLU(), linear(w2.tolist()))


def closed_form_synflow(w1: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """SynFlow scores for input ones, by hand.

    s(W1[i, j]) = |W1 ij| sum_k |W2 ki|,   s(W2[k, i]) = |W2 ki| sum_j |W1 ij|.
    """
    a1, a2 = w1.abs().double(), w2.abs().double()  # (4, 3), (2, 4)
    s1 = a1 * a2.sum(0)[:, None]  # (4, 3)
    s2 = a2 * a1.sum(1)[None, :]  # (2, 4)
    return s1, s2


W1 = torch.tensor([[0.5, -1.0, 2.0], [-0.3, 0.2, 0.1], [1.5, -0.7, 0.4], [0.05, 0.9, -1.2]])
W2 = torch.tensor([[1.0, -0.2, 0.3, -2.0], [-0.6, 0.8, 0.1, 0.7]])


def test_synflow_one_iteration_closed_form():
    s1, s2 = closed_form_synflow(W1, W2)
    scores = synflow_scores(two_layer(W1, W2), (3,), ["0.weight", "2.weight"], 1.0, iterations=1)
    assert scores["0.weight"].dtype == torch.float32
    assert torch.allclose(scores["0.weight"].double(), s1, rtol=1e-6)
    assert torch.allclose(scores["2.weight"].double(), s2, rtol=1e-6)
    # Conservation (Tanaka et al. Thm 2): each layer's total score is R = 1^T |W2||W1| 1.
    r = (W2.abs() @ W1.abs()).sum()
    for name in ("0.weight", "2.weight"):
        assert torch.allclose(scores[name].sum(), r)


def test_synflow_two_iterations_follow_exponential_schedule():
    # Reference: step 1 keeps round(0.25 ** (1/2) * 20) = 10, step 2 rescores the masked
    # net and keeps round(0.25 * 20) = 5; the returned scores are step 2's, pruned set to 0.
    density, total = 0.25, W1.numel() + W2.numel()
    s1, s2 = closed_form_synflow(W1, W2)
    keep = torch.zeros(total, dtype=torch.bool)
    first = torch.cat([s1.flatten(), s2.flatten()])  # (20,)
    keep[first.topk(round(density ** 0.5 * total)).indices] = True
    m1, m2 = keep[:12].view(4, 3), keep[12:].view(2, 4)
    t1, t2 = closed_form_synflow(W1 * m1, W2 * m2)
    flat = torch.cat([t1.flatten(), t2.flatten()])
    final = torch.zeros(total, dtype=torch.bool)
    final[flat.topk(round(density * total)).indices] = True
    expected = torch.where(final, flat, 0.0)

    scores = synflow_scores(two_layer(W1, W2), (3,), ["0.weight", "2.weight"], density,
                            iterations=2)
    got = torch.cat([scores["0.weight"].flatten(), scores["2.weight"].flatten()]).double()
    assert torch.allclose(got, expected, rtol=1e-6)
    assert int((got > 0).sum()) == 5
    masks = masks_from_scores(scores, density)
    assert torch.equal(torch.cat([masks["0.weight"].flatten(), masks["2.weight"].flatten()]), final)


def collapse_net() -> nn.Module:
    """Linear(8, 64) - Linear(64, 64) - Linear(64, 4): the later layers have smaller |w|."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 64, bias=False), nn.ReLU(), nn.Linear(64, 64, bias=False),
                        nn.ReLU(), nn.Linear(64, 4, bias=False))
    with torch.no_grad():
        net[4].weight.mul_(0.01)
    return net


def test_iterative_synflow_avoids_layer_collapse():
    net, names, density = collapse_net(), ["0.weight", "2.weight", "4.weight"], 0.02
    n = sum(net.get_parameter(k).numel() for k in names)  # 4864
    k = round(density * n)  # 97
    # Without the one-per-layer guard, global magnitude cuts two layers off entirely ...
    magnitude = {name: net.get_parameter(name).detach().abs() for name in names}
    kept = select_global(magnitude, k, min_per_layer=0)
    assert sorted(int(m.sum()) for m in kept.values())[:2] == [0, 0]
    # ... single-shot SynFlow leaves two layers only their guaranteed one weight ...
    single = masks_from_scores(synflow_scores(net, (8,), names, density, iterations=1), density)
    assert sorted(int(m.sum()) for m in single.values())[:2] == [1, 1]
    # ... iterative SynFlow keeps a real share of every layer, even without the guard.
    scores = synflow_scores(net, (8,), names, density, iterations=100)
    unguarded = select_global(scores, k, min_per_layer=0)
    assert all(int(m.sum()) >= 20 for m in unguarded.values())
    masks = masks_from_scores(scores, density)
    assert sum(int(m.sum()) for m in masks.values()) == k
    for name in names:  # pruned positions score exactly 0: the top-k is the iterative mask
        assert torch.equal(masks[name], scores[name] > 0)


def test_synflow_leaves_model_untouched():
    model = tiny_bn_cnn().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    synflow_scores(model, (3, 6, 6), prunable_names(model), 0.5, iterations=3)
    assert model.training and next(model.parameters()).dtype == torch.float32
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_synflow_refuses_overflow_naming_the_tensor():
    # Twelve layers of finite float32 weights 1e30: the flow 2^12 * 1e360 overflows float64.
    deep = nn.Sequential(*[linear([[1e30, 1e30], [1e30, 1e30]]) for _ in range(12)])
    assert all(torch.isfinite(p).all() for p in deep.parameters())
    with pytest.raises(ValueError, match="synflow: scores of tensor '0.weight'"):
        synflow_scores(deep, (2,), prunable_names(deep), 1.0, iterations=1)
    # Two layers: flow 4e50 fits float64 but not the float32 result, refused as well.
    wide = nn.Sequential(linear([[1e25, 1e25], [1e25, 1e25]]), linear([[1e25, 1e25]]))
    with pytest.raises(ValueError, match="not finite"):
        synflow_scores(wide, (2,), prunable_names(wide), 1.0, iterations=1)


# ----------------------------------------------------------------------------- real model


def test_resnet8_scores_and_masks():
    model = build_model(ModelConfig(name="resnet8", width=8))
    names = prunable_names(model)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g))
    params = dict(model.named_parameters())
    for method in CLIENT_SCORED:
        scores = get_scorer(method)(model, names, batches=[batch], input_shape=(3, 32, 32),
                                    density=0.1, device="cpu")
        assert list(scores) == names, method
        for n in names:
            s = scores[n]
            assert s.shape == params[n].shape and s.dtype == torch.float32, (method, n)
            assert torch.isfinite(s).all() and (s >= 0).all(), (method, n)
        masks = masks_from_scores(scores, 0.1)
        total = sum(p.numel() for n, p in params.items() if n in names)
        assert sum(int(m.sum()) for m in masks.values()) == round(0.1 * total), method
        assert all(m.any() for m in masks.values()), method


# ----------------------------------------------------------------------------- registry


def test_registry_refuses_duplicates_and_lists_names():
    assert set(CLIENT_SCORED) <= set(SCORERS) and set(CLIENT_SCORED) <= set(method_names())
    with pytest.raises(ValueError, match="already registered"):
        register_scorer("snip")(lambda *a, **k: {})
    with pytest.raises(ValueError, match=r"\['snip', 'synflow'\]"):
        get_scorer("grasp")
    with pytest.raises(TypeError):
        SCORERS["grasp"] = None  # read-only view


def test_registered_scorer_equals_direct_call():
    model = linear([[1, 2, 4], [2, 1, 4]])
    batch = (torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([0]))
    via = get_scorer("snip")(model, ["weight"], batches=[batch])
    assert torch.equal(via["weight"], snip_scores(model, [batch], ["weight"])["weight"])
