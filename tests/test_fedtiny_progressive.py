"""Progressive pruning pieces: schedule, bounded top-K buffer, sparse growth scores and the
shared prune-and-grow, and FedTiny's server step on hand-built top-K replies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedprune.fedtiny.progressive import Schedule, TopKBuffer
from fedprune.masks.regrow import prune_and_grow, sparse_scores


def test_schedule_golden_and_bad_input():
    s = Schedule(rounds=40, delta_r=5, r_end=20, alpha=0.4)
    assert [r for r in range(41) if s.adjusts(r)] == [0, 5, 10, 15]
    assert s.fraction(0) == pytest.approx(0.4) and s.fraction(10) == pytest.approx(0.2)
    assert s.k(10, active=1000, pruned=9000) == 200
    assert s.k(0, active=1000, pruned=50) == 50  # never more than can grow
    with pytest.raises(ValueError, match="delta_r"):
        Schedule(rounds=10, delta_r=0)
    with pytest.raises(ValueError, match="r_end"):
        Schedule(rounds=10, r_end=11)


def test_topk_buffer_keeps_the_largest_pruned_gradients_and_never_exceeds_k():
    torch.manual_seed(0)
    mask = torch.ones(20, 30, dtype=torch.bool)
    mask.view(-1)[::3] = False  # every third position pruned
    planted = [0, 3, 597]  # pruned positions with consistently large gradients
    buf = TopKBuffer(k=3, mask=mask)
    for _ in range(25):
        grad = torch.randn(20, 30) * 0.1
        grad.view(-1)[1] = 100.0  # a KEPT position: must never enter the buffer
        grad.view(-1)[planted] = torch.tensor([5.0, -6.0, 4.0])
        before = grad.clone()
        buf.add_(grad)
        assert torch.equal(grad, before)  # the optimizer step sees the gradient unchanged
        assert len(buf) <= 3
    assert sorted(buf.index.tolist()) == planted
    torch.testing.assert_close(buf.value[buf.index.argsort()],
                               torch.tensor([125.0, -150.0, 100.0]), rtol=0, atol=5.0)


def test_topk_buffer_allocates_nothing_of_the_layer_size():
    from torch.profiler import ProfilerActivity, profile

    mask = torch.rand(1000, 1000) < 0.1  # 10% density, as a FedTiny layer
    grad = torch.randn(1000, 1000)
    buf = TopKBuffer(k=100, mask=mask)
    buf.add_(grad.clone())  # warm-up
    step_grad = grad.clone()  # what backpropagation hands over
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        buf.add_(step_grad)
    dense = grad.numel() * grad.element_size()
    active = int(mask.sum())
    biggest = max((e.cpu_memory_usage for e in prof.events()), default=0)
    # the kept positions' saved gradient (active floats) is the largest temporary
    assert biggest <= active * grad.element_size() + 4096, (biggest, active)
    assert biggest < dense / 5


def test_sparse_scores_mark_only_the_reported_positions():
    score = sparse_scores(6, torch.tensor([1, 4]), torch.tensor([-2.0, 0.5]))
    assert score[[1, 4]].tolist() == [2.0, 0.5]
    assert torch.isnan(score[[0, 2, 3, 5]]).all()


def test_prune_and_grow_keeps_density_and_moves_the_planted_weights():
    weight = torch.tensor([[0.9, 0.0, 0.05, 0.0], [0.0, 0.7, 0.0, -0.02]])
    mask = weight != 0  # 4 active
    grad_index = torch.tensor([1, 3, 4, 6, 0])  # 0 is active: ignored for growth
    grad_value = torch.tensor([0.1, -3.0, 2.0, 0.5, 9.0])
    new_w, new_m = prune_and_grow(weight, mask, sparse_scores(8, grad_index, grad_value), k=2)
    assert int(new_m.sum()) == int(mask.sum())  # density exact
    # grown: flat 3 and 4 (largest |g| among pruned); pruned: -0.02 (7) and 0.05 (2)
    assert new_m.view(-1).tolist() == [True, False, False, True, True, True, False, False]
    assert new_w.view(-1)[[3, 4]].tolist() == [0.0, 0.0]  # grown weights start at zero
    assert new_w.view(-1)[[0, 5]].tolist() == pytest.approx([0.9, 0.7])


def test_prune_and_grow_moves_fewer_when_fewer_candidates_were_reported():
    weight = torch.tensor([0.9, 0.0, 0.05, 0.0, 0.7, 0.0])
    mask = weight != 0  # 3 active, 3 pruned; only position 3 reported
    new_w, new_m = prune_and_grow(weight, mask, sparse_scores(6, torch.tensor([3]),
                                                              torch.tensor([1.0])), k=2)
    assert new_m.tolist() == [True, False, False, True, True, False]  # one moved each way
    assert new_w.tolist() == pytest.approx([0.9, 0, 0, 0, 0.7, 0])


def test_fedtiny_server_grows_the_example_weighted_largest_gradient():
    """Two clients' sparse top-K through the strategy: the position with the largest
    example-weighted sum grows, not the one with the single largest entry."""
    from fedprune.config import load_config
    from fedprune.fl.server_core import SparseServer
    from fedprune.masks import wire
    from fedprune.methods import method_class
    from server.experiment import make_strategy
    from flower_helpers import server_message, train_reply
    from flwr.app import Array, ArrayRecord

    base = ["model.width=2", "mask.density=0.3", "data.num_clients=2", "fed.rounds=4",
            "method.name=fedtiny", "method.delta_r=1", "method.order=fc.weight"]
    active = int(SparseServer(load_config("default", base)).masks["fc.weight"].sum())
    # K = int(alpha/2 (1 + cos(pi/3)) * active) = int(0.75 alpha * active) = 1
    cfg = load_config("default", [*base, f"method.alpha={1.2 / (0.75 * active)}"])
    core = SparseServer(cfg)
    method = method_class("fedtiny")(cfg, core)
    strategy = make_strategy(cfg, core, method)
    plan = strategy.plans[1] = method.plan(1)
    assert plan.config["layers"] == ["fc.weight"] and plan.config["ks"] == [1]
    off = np.flatnonzero(~core.masks["fc.weight"].reshape(-1))
    a, b = off[0], off[1]
    # client 0 (1 example): a=10; client 1 (9 examples): b=2 -> weighted a=1.0, b=1.8
    tops = [{"fc.weight": (np.array([a]), np.array([10.0], np.float32))},
            {"fc.weight": (np.array([b]), np.array([2.0], np.float32))}]
    replies = []
    for pid, (top, n) in enumerate(zip(tops, (1, 9))):
        msg = train_reply(server_message(pid + 1, {}, {}),
                          wire.encode_up(core.state, core.masks), n, pid)
        msg.content["fedtiny"] = ArrayRecord({k: Array(v) for k, v in
                                              wire.encode_sparse(top).items()})
        replies.append(msg)
    strategy.aggregate_train(1, replies)
    new = core.masks["fc.weight"].reshape(-1)
    assert new[b] and not new[a]
    assert strategy.stats[1]["adjusted_layer"] == "fc.weight"
    assert strategy.stats[1]["adjusted_k"] == 1


def test_adjustment_plan_layers_blocks_and_order():
    from fedprune.config import ModelConfig
    from fedprune.fedtiny.progressive import adjustment_plan, tensor_blocks
    from fedprune.masks import prunable_names
    from fedprune.models import build_model

    model = build_model(ModelConfig(name="resnet8", width=4), "cifar10")
    names = prunable_names(model)
    blocks = tensor_blocks(model, names)
    assert adjustment_plan(names) == [[n] for n in names]
    assert adjustment_plan(names, order="reverse") == [[n] for n in names[::-1]]
    plan = adjustment_plan(names, "block", blocks=blocks)
    # stem and classifier alone; a residual block's convs travel with its shortcut conv
    assert plan[0] == ["conv1.weight"] and plan[-1] == ["fc.weight"]
    assert plan[2] == ["layers.1.0.conv1.weight", "layers.1.0.conv2.weight",
                       "layers.1.0.shortcut.0.weight"]
    assert sum(plan, []) == names  # every tensor exactly once
    assert adjustment_plan(names, "block", "layers.2.0, conv1", blocks) == [plan[3], plan[0]]
    with pytest.raises(ValueError, match="layers.9.0"):
        adjustment_plan(names, "block", "layers.9.0", blocks)
    with pytest.raises(ValueError, match="granularity"):
        adjustment_plan(names, "channel")


def test_chunked_topk_matches_one_call():
    from fedprune.fedtiny import progressive

    gen = torch.Generator().manual_seed(3)
    flat = torch.randn(3 * progressive.CHUNK + 123, generator=gen)
    for k, largest in ((1, True), (500, False), (5000, True)):
        got = progressive.topk_indices(flat, k, largest)
        want = torch.topk(flat, k, largest=largest).indices
        assert sorted(got.tolist()) == sorted(want.tolist())
