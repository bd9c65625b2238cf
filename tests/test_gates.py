"""Polarization-regularized binary channel gates (fedprune.fl.gates): golden cases."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedprune.config import ModelConfig, TrainConfig
from fedprune.fl.gates import (
    attach_gates,
    gate_masks,
    gate_shapes,
    gate_sites,
    polarization,
    polarization_t,
)
from fedprune.masks.core import global_density, prunable_names
from fedprune.models import build_model
from fedprune.train import train_local


class Tiny(nn.Module):
    """conv1 (1->c1, 1x1) -> BN -> conv2 (c1->c2, 1x1) -> BN -> mean pool -> fc (head)."""

    def __init__(self, c1: int = 3, c2: int = 2, c_in: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.fc = nn.Linear(c2, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return self.fc(out.mean((2, 3)))


def _gates(conv1: list[float], conv2: list[float]) -> dict[str, np.ndarray]:
    return {"conv1.weight": np.array(conv1, np.float32),
            "conv2.weight": np.array(conv2, np.float32)}


def _rows(mask: torch.Tensor) -> list[bool]:
    rows = mask.reshape(mask.shape[0], -1)
    assert bool((rows.all(1) | ~rows.any(1)).all()), "mask is not whole rows"
    return rows.all(1).tolist()


# ----------------------------------------------------------------------------- polarization


@pytest.mark.parametrize("t, expected", [(1.0, 1.7), (0.5, -0.05)])
def test_regularizer_hand_computed_with_global_mean(t, expected):
    # g = [0, .5, 1 | 1, 1]: ||g||_1 = 3.5, mean .7, ||g - .7||_1 = .7+.2+.3+.3+.3 = 1.8.
    # A per-layer mean would give ||.||_1 = 1.0 (R = 2.5 at t=1): the mean must be global.
    gates = attach_gates(Tiny())
    gates.load_(_gates([0.0, 0.5, 1.0], [1.0, 1.0]))
    assert gates.regularizer(0.1, t).item() == pytest.approx(0.1 * expected, abs=1e-6)
    assert polarization([torch.tensor([0.0, 0.5, 1.0]), torch.tensor([1.0, 1.0])],
                        t).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("keep, open_count", [(0.25, 2), (0.5, 4), (0.75, 6)])
def test_polarizer_alone_keeps_fraction_2_minus_t_over_4(keep, open_count):
    # R is concave on [0,1]^n, so its minimum is a vertex; among all 2^8 binary vectors the
    # minimisers have exactly n(2 - t)/4 ones, and no interior point does better.
    t = polarization_t(keep)
    assert t == pytest.approx(2 - 4 * keep)
    n = 8
    vertices = torch.tensor(list(itertools.product([0.0, 1.0], repeat=n)))  # (256, n)
    values = torch.stack([polarization([v], t) for v in vertices])
    best = values.min()
    assert set(vertices[values <= best + 1e-6].sum(1).int().tolist()) == {open_count}
    interior = torch.rand(500, n, generator=torch.Generator().manual_seed(0))
    assert min(polarization([g], t).item() for g in interior) >= best.item() - 1e-6


def test_polarization_t_rejects_out_of_range():
    for keep in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="keep"):
            polarization_t(keep)


# ----------------------------------------------------------------------------- STE gate


def test_ste_forward_exact_and_gradient_hand_computed():
    # conv (1->2) -> BN -> avg pool -> linear (head, weights [2, 3]). Loss = sum of outputs.
    # In train mode the BN output of channel c sums over batch and positions to N * beta_c
    # (the normalised part sums to zero), so dL/db_c = w_c / (H W) * N beta_c = w_c B beta_c.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.BatchNorm2d(2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[1].bias.copy_(torch.tensor([0.5, -1.0]))
        model[4].weight.copy_(torch.tensor([[2.0, 3.0]]))
    x = torch.randn(4, 1, 3, 3)  # B = 4
    reference = model[1](model[0](x)).detach()  # ungated BN output (B, 2, 3, 3)
    gates = attach_gates(model)
    assert [(s.weight, s.module) for s in gate_sites(model)] == [("0.weight", "1")]
    gates.load_({"0.weight": np.array([0.7, 0.2], np.float32)})  # channel 0 open, 1 closed
    seen = {}
    model[1].register_forward_hook(lambda m, i, o: seen.update(bn=o.detach()))  # returns None
    model(x).sum().backward()
    assert torch.equal(seen["bn"][:, 0], reference[:, 0])  # open: unchanged
    assert torch.equal(seen["bn"][:, 1], torch.zeros_like(reference[:, 1]))  # closed: exact 0
    grad = gates.gates[0].grad
    assert grad is not None and torch.allclose(grad, torch.tensor([4 * 2 * 0.5, 4 * 3 * -1.0]),
                                               atol=1e-4)


def test_hooks_removed_restore_ungated_model():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="resnet8", width=2), "cifar10").eval()
    keys = list(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    dense = model(x)
    gates = attach_gates(model)
    assert list(model.state_dict()) == keys  # weights still travel by name
    assert torch.equal(model(x), dense)  # all gates open at init
    values = gates.values()
    values["layers.1.0.conv1.weight"][:] = 0.0
    gates.load_(values)
    assert not torch.allclose(model(x), dense)
    gates.remove()
    assert torch.equal(model(x), dense)


def test_values_clamped_and_projected_on_forward():
    model = Tiny()
    gates = attach_gates(model)
    gates.load_(_gates([1.5, -0.2, 0.3], [0.6, 1.0]))
    assert gates.values()["conv1.weight"].tolist() == pytest.approx([1.0, 0.0, 0.3])
    assert gates.values()["conv1.weight"].dtype == np.float32
    model(torch.randn(2, 1, 2, 2))
    assert gates.gates[0].detach().tolist() == pytest.approx([1.0, 0.0, 0.3])


# ----------------------------------------------------------------------------- gate sites


@pytest.mark.parametrize("name, dataset, sites", [
    ("resnet8", "cifar10", {"conv1.weight": "bn1", "layers.0.0.conv2.weight": "layers.0.0.bn2",
                            "layers.1.0.shortcut.0.weight": "layers.1.0.shortcut.1"}),
    ("vgg11_bn", "cifar10", {"0.weight": "1", "25.weight": "26"}),
    ("convnet", "mnist", {"0.weight": "1", "4.weight": "5", "9.weight": "9"}),
    ("resnet18", "cifar10", {"layers.3.1.conv2.weight": "layers.3.1.bn2"}),
])
def test_gate_sites_on_repo_models(name, dataset, sites):
    model = build_model(ModelConfig(name=name, width=2), dataset)
    found = {s.weight: s for s in gate_sites(model)}
    head = prunable_names(model)[-1]
    assert set(found) == set(prunable_names(model)) - {head}  # every layer but the classifier
    for weight, module in sites.items():
        assert found[weight].module == module
    modules = dict(model.named_modules())
    for s in found.values():
        is_bn = isinstance(modules[s.module], nn.BatchNorm2d)
        assert is_bn or isinstance(modules[s.module], nn.Linear)
        assert s.axis == (1 if is_bn else -1)
    shapes = gate_shapes(model)
    assert shapes == {w: (dict(model.named_parameters())[w].shape[0],) for w in found}


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize("density, conv1, conv2, kept", [
    # N = 3 (conv1 rows of 1) + 6 (conv2 rows of 3) + 4 (fc, dense) = 13.
    # 0.7 -> 9: fc 4, best per layer c1.0 + c2.1 (4), 1 left: c2.0 (gate .6, 3) does not
    # fit, c1.2 (gate .5, 1) does.
    (0.7, [True, False, True], [False, True], 9),
    # 0.95 -> 12: 4 left after the reserved: c2.0 (3), c1.2 (1); c1.1 (gate .1) no room.
    (0.95, [True, False, True], [True, True], 12),
])
def test_gate_masks_golden_first_fit(density, conv1, conv2, kept):
    model = Tiny()
    masks = gate_masks(model, _gates([0.9, 0.1, 0.5], [0.6, 0.8]), density)
    assert set(masks) == {"conv1.weight", "conv2.weight", "fc.weight"}
    assert _rows(masks["conv1.weight"]) == conv1
    assert _rows(masks["conv2.weight"]) == conv2
    assert bool(masks["fc.weight"].all())
    assert global_density(masks) == pytest.approx(kept / 13)
    assert global_density(masks) <= density


def test_gate_masks_ties_shared_across_layers():
    # All gates 1: ties go by relative position c / width, so after the reserved c1.0, c2.0
    # (4 of the 8 left at 0.95) come c1.1 (1/3) then c2.1 (1/2); layer order would have
    # filled conv1 first (c1.1, c1.2) and left no room for c2.1.
    masks = gate_masks(Tiny(), _gates([1.0, 1.0, 1.0], [1.0, 1.0]), 0.95)
    assert _rows(masks["conv1.weight"]) == [True, True, False]
    assert _rows(masks["conv2.weight"]) == [True, True]


@pytest.mark.parametrize("density, what", [(0.2, "ungated"), (0.5, "one channel per")])
def test_gate_masks_density_below_minimum(density, what):
    # 0.2 -> 2 < the dense fc's 4; 0.5 -> 6, but fc 4 + one channel per layer (1 + 3) = 8.
    with pytest.raises(ValueError, match=f"mask.density={density}.*{what}"):
        gate_masks(Tiny(), _gates([0.9, 0.1, 0.5], [0.6, 0.8]), density)


def test_gate_masks_on_resnet_structured_and_maximal():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="resnet8", width=4), "cifar10")
    rng = np.random.default_rng(0)
    values = {n: rng.random(s).astype(np.float32) for n, s in gate_shapes(model).items()}
    masks = gate_masks(model, values, 0.3)
    params = dict(model.named_parameters())
    total = sum(m.numel() for m in masks.values())
    slack = 0.3 * total - sum(int(m.sum()) for m in masks.values())
    assert 0 <= slack and global_density(masks) <= 0.3
    assert bool(masks["fc.weight"].all())
    for name in values:
        rows = _rows(masks[name])
        assert any(rows)
        row_size = params[name][0].numel()
        assert all(kept or row_size > slack for kept in rows)  # no dropped row would fit


def test_load_and_masks_are_strict():
    model = Tiny()
    gates = attach_gates(model)
    good = _gates([0.9, 0.1, 0.5], [0.6, 0.8])
    with pytest.raises(ValueError, match=re.escape("'conv2.weight' is missing")):
        gates.load_({"conv1.weight": good["conv1.weight"]})
    with pytest.raises(ValueError, match=re.escape("'fc.weight' is not a gated layer")):
        gates.load_({**good, "fc.weight": np.ones(2, np.float32)})
    with pytest.raises(ValueError, match=re.escape("'conv1.weight' has shape (2,), expected (3,)")):
        gates.load_({**good, "conv1.weight": np.ones(2, np.float32)})
    with pytest.raises(ValueError, match=re.escape("'conv2.weight' is not finite")):
        gates.load_({**good, "conv2.weight": np.array([np.nan, 1.0], np.float32)})
    with pytest.raises(ValueError, match=re.escape("'conv2.weight' is missing")):
        gate_masks(model, {"conv1.weight": good["conv1.weight"]}, 0.9)


# ----------------------------------------------------------------------------- training


def test_local_training_polarizes_gates():
    # Gates start in [0.3, 0.7]; with a large lam, t = 0.5 pushes those below the mean to 0
    # (gradient lam * 1.5) and those above it to 1 (lam * -0.5), projected onto [0, 1].
    torch.manual_seed(0)
    model = Tiny(c1=8, c2=8, c_in=3)
    gates = attach_gates(model)
    rng = np.random.default_rng(0)
    gates.load_({n: rng.uniform(0.3, 0.7, s).astype(np.float32)
                 for n, s in gate_shapes(model).items()})

    def polarized() -> float:
        g = np.concatenate(list(gates.values().values()))
        return float(np.mean((g < 0.05) | (g > 0.95)))

    assert polarized() == 0.0
    batches = [(torch.randn(8, 3, 4, 4), torch.randint(0, 2, (8,))) for _ in range(12)]
    stats = train_local(model, batches, TrainConfig(lr=0.01),
                        regularizer=lambda: gates.regularizer(5.0, 0.5),
                        extra_params=[{"params": gates.parameters(), "lr": 0.05,
                                       "weight_decay": 0.0, "momentum": 0.0}])
    assert stats["steps"] == 12
    g = np.concatenate(list(gates.values().values()))
    assert ((g >= 0) & (g <= 1)).all()
    assert polarized() >= 0.9
    masks = gate_masks(model, gates.values(), 0.5)  # hooks still attached: fx ignores them
    assert global_density(masks) <= 0.5
    for name, values in gates.values().items():
        rows = np.array(_rows(masks[name]))
        assert values[rows].min() >= values[~rows].max(initial=-1.0)  # in gate order
