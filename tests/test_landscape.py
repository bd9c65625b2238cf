"""Loss-landscape probes: CKA, linear-path barriers, BN recomputation, regime names."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from fedprune.study.landscape import (barrier, bezier_state, fit_bend, interpolate_state,
                                      linear_cka, outputs, path_losses, regime, reset_bn_)


def test_linear_cka_by_hand():
    # X = [-1, 0, 1]; Y = [[-1, 1], [0, -2], [1, 1]] (centred, orthogonal columns):
    # ||Y^T X||^2 = 4, ||X^T X|| = 2, ||Y^T Y|| = ||diag(2, 6)|| = sqrt(40)
    x = torch.tensor([[-1.0], [0.0], [1.0]])
    y = torch.tensor([[-1.0, 1.0], [0.0, -2.0], [1.0, 1.0]])
    assert linear_cka(x, y) == pytest.approx(4 / (2 * math.sqrt(40)))
    assert linear_cka(x + 5, y - 3) == pytest.approx(4 / (2 * math.sqrt(40)))  # centred


def _hsic(k: torch.Tensor, l: torch.Tensor) -> float:
    n = len(k)
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    return float(torch.trace(k @ h @ l @ h))


def test_linear_cka_equals_the_kernel_form_and_its_invariances():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(6, 4, generator=gen, dtype=torch.float64) + 0.5 * torch.randn(
        40, 4, generator=gen, dtype=torch.float64)
    k, l = x @ x.T, y @ y.T  # independent reference: HSIC with linear kernels
    want = _hsic(k, l) / math.sqrt(_hsic(k, k) * _hsic(l, l))
    assert linear_cka(x, y) == pytest.approx(want, rel=1e-9)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))
    assert linear_cka(x, 3.0 * x @ q) == pytest.approx(1.0)  # rotation and scale
    unrelated = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    assert linear_cka(x, unrelated) < 0.5 < linear_cka(x, y)
    with pytest.raises(ValueError, match="same n"):
        linear_cka(x, y[:10])
    with pytest.raises(ValueError, match="constant"):
        linear_cka(x, torch.ones(40, 2))


class _Scalar(nn.Module):
    def __init__(self, w: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))


def _double_well(model: _Scalar) -> dict[str, float]:
    return {"loss": float((model.w.detach() ** 2 - 1) ** 2)}


def test_barrier_of_a_double_well_by_hand():
    # w from -1 to 1: losses 0, 0.5625, 1, 0.5625, 0 at t = 0, 1/4, 1/2, 3/4, 1
    rows = path_losses(_Scalar(-1.0), _Scalar(1.0), _double_well, points=5)
    assert [r["t"] for r in rows] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert [r["loss"] for r in rows] == pytest.approx([0, 0.5625, 1, 0.5625, 0])
    assert barrier(rows) == pytest.approx(1.0)
    # w from 0 (loss 1) to 1 (loss 0): excess at t=1/2 is (1 - 1/4)^2 - 1/2 = 0.0625
    assert barrier(path_losses(_Scalar(0.0), _Scalar(1.0), _double_well, points=3)) == (
        pytest.approx(0.0625))
    same = path_losses(_Scalar(0.3), _Scalar(0.3), _double_well, points=4)
    assert barrier(same) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="both ends"):
        path_losses(_Scalar(0.0), _Scalar(1.0), _double_well, points=1)


def test_interpolation_keeps_integer_buffers_and_names_a_mismatch():
    a, b = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    with torch.no_grad():
        a.weight.fill_(1.0)
        b.weight.fill_(3.0)
    a.num_batches_tracked.fill_(7)
    mid = interpolate_state(a.state_dict(), b.state_dict(), 0.25)
    assert torch.equal(mid["weight"], torch.full((2,), 1.5))
    assert int(mid["num_batches_tracked"]) == 7
    other = dict(b.state_dict())
    other["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="extra.weight"):
        interpolate_state(a.state_dict(), other, 0.5)


def test_reset_bn_recomputes_statistics_as_the_average_over_batches():
    # batch 1 [[0, 0], [2, 4]]: mean [1, 2], unbiased var [2, 8];
    # batch 2 [[4, 0], [6, 0]]: mean [5, 0], var [2, 0] -> running mean [3, 1], var [2, 4]
    model = nn.Sequential(nn.BatchNorm1d(2))
    bn = model[0]
    bn.running_mean.fill_(100.0)
    batches = [(torch.tensor([[0.0, 0.0], [2.0, 4.0]]), None),
               (torch.tensor([[4.0, 0.0], [6.0, 0.0]]), None)]
    model.eval()
    assert reset_bn_(model, batches) == 1
    assert torch.allclose(bn.running_mean, torch.tensor([3.0, 1.0]))
    assert torch.allclose(bn.running_var, torch.tensor([2.0, 4.0]))
    assert bn.momentum == 0.1 and not model.training  # settings restored
    assert reset_bn_(nn.Linear(2, 2), batches) == 0


def test_path_points_get_their_own_bn_statistics():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    b = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    data = [(torch.randn(16, 3), None) for _ in range(3)]

    def mean_out(model: nn.Module) -> dict[str, float]:
        # with statistics recomputed on the same data, BN outputs are centred there
        out = outputs(model, [(x, y) for x, y in data])
        return {"loss": float(out.mean().abs())}

    rows = path_losses(a, b, mean_out, points=3, bn_batches=lambda: data)
    assert all(r["loss"] < 1e-5 for r in rows)
    stale = path_losses(a, b, mean_out, points=3)  # default running stats: not centred
    assert max(r["loss"] for r in stale) > 1e-2


@pytest.mark.parametrize("value, cka, want", [(0.5, 0.99, "I"), (0.01, 0.5, "II-A"),
                                              (0.01, 0.95, "II-B"), (0.05, 0.9, "II-B")])
def test_regime_names(value, cka, want):
    assert regime(value, cka, barrier_tol=0.05, cka_split=0.9) == want


def test_bezier_state_by_hand():
    a, b = {"w": torch.tensor(0.0), "n": torch.tensor(3)}, {"w": torch.tensor(4.0),
                                                           "n": torch.tensor(9)}
    # t = 1/2: 1/4 * 0 + 1/2 * 1 + 1/4 * 4 = 1.5; t = 1/4: 9/16 * 0 + 3/8 * 1 + 1/16 * 4
    assert float(bezier_state(a, {"w": torch.tensor(1.0)}, b, 0.5)["w"]) == 1.5
    assert float(bezier_state(a, {"w": torch.tensor(1.0)}, b, 0.25)["w"]) == 0.625
    assert int(bezier_state(a, {"w": torch.tensor(1.0)}, b, 0.5)["n"]) == 3  # counter: a's
    for t in (0.0, 0.3, 1.0):  # a bend at the midpoint is the linear path
        assert float(bezier_state(a, {"w": torch.tensor(2.0)}, b, t)["w"]) == (
            pytest.approx(4 * t))
    with pytest.raises(ValueError, match="'v'"):
        bezier_state(a, {"v": torch.tensor(1.0)}, b, 0.5)


class _Point(nn.Module):
    """A point w in the plane whose loss is the ring (|w|^2 - 1)^2, whatever the input."""

    def __init__(self, w: tuple[float, float]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (((self.w ** 2).sum() - 1) ** 2).expand(len(x))


def _ring(model: nn.Module) -> dict[str, float]:
    return {"loss": float(model(torch.zeros(1))[0].detach())}


def _mean(out: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
    return out.mean()


def test_one_bend_step_by_hand():
    # ends (-1, 0) and (0.6, 0.8), both on the ring; the bend starts at the midpoint
    # m = (-0.2, 0.4); one batch at t drawn from the seeded generator:
    # phi = (1-t)^2 a + 2t(1-t) m + t^2 b, dL/dphi = 4 (|phi|^2 - 1) phi + wd phi,
    # and one SGD step moves the bend by -lr 2t(1-t) dL/dphi
    a, b = torch.tensor([-1.0, 0.0]), torch.tensor([0.6, 0.8])
    t = float(torch.rand((), generator=torch.Generator().manual_seed(4)))  # 0.56
    mid = (a + b) / 2
    phi = (1 - t) ** 2 * a + 2 * t * (1 - t) * mid + t ** 2 * b
    grad = 4 * ((phi ** 2).sum() - 1) * phi + 0.1 * phi
    want = mid - 0.5 * 2 * t * (1 - t) * grad
    bend = fit_bend(_Point((-1.0, 0.0)), _Point((0.6, 0.8)),
                    lambda epoch: [(torch.zeros(1, 1), torch.zeros(1))], epochs=1, lr=0.5,
                    weight_decay=0.1, seed=4, loss_fn=_mean)
    assert torch.allclose(bend["w"], want, atol=1e-6)


def test_fitted_curve_goes_around_a_barrier_the_line_cannot():
    ends = _Point((-1.0, 0.0)), _Point((0.6, 0.8))
    line = path_losses(*ends, _ring, points=21)
    assert barrier(line) > 0.5  # the chord cuts through the ring's centre: loss 0.64
    bend = fit_bend(*ends, lambda epoch: [(torch.zeros(1, 1), torch.zeros(1))] * 50,
                    epochs=8, lr=0.1, weight_decay=0.0, loss_fn=_mean)
    curve = path_losses(*ends, _ring, points=21, bend=bend)
    assert barrier(curve) < 0.1 * barrier(line)
    assert curve[0]["loss"] == pytest.approx(0.0) and curve[-1]["loss"] == pytest.approx(0.0)


def test_fit_bend_keeps_pruned_weights_zero():
    torch.manual_seed(0)
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    with torch.no_grad():
        for m in (a, b):
            m.weight[:, :2] = 0.0  # pruned at both ends
    data = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(4)]
    bend = fit_bend(a, b, lambda epoch: data, epochs=2, lr=0.5)
    assert torch.equal(bend["weight"][:, :2], torch.zeros(3, 2))
    mid = (a.weight[:, 2:] + b.weight[:, 2:]).detach() / 2
    assert not torch.allclose(bend["weight"][:, 2:], mid)  # the live weights trained
    with pytest.raises(ValueError, match="at least one epoch"):
        fit_bend(a, b, lambda epoch: data, epochs=0, lr=0.5)
    tied = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    tied[1].weight = tied[0].weight
    with pytest.raises(ValueError, match="ties weights"):
        fit_bend(tied, copy.deepcopy(tied), lambda epoch: data, epochs=1, lr=0.5)
