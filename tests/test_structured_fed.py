"""Federated structured pruning of a language model (method ``structured``): the clients'
evidence, summed by the server, gives the structure centralized pruning gives on the union
of their windows; bad evidence is rejected by the validation layer."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from test_fedllm import LLM, _run_pooled

from fedprune.config import ConfigError, load_config

STRUCTURED = [*LLM, "method.name=structured", "method.fraction=0.3", "method.round_to=0"]


def test_structured_method_config_is_checked():
    with pytest.raises(ConfigError, match="method.criterion='bogus'|criterion='bogus'"):
        load_config("default", [*STRUCTURED, "method.criterion=bogus"])
    with pytest.raises(ConfigError, match="fraction"):
        load_config("default", [*STRUCTURED, "method.fraction=1.5"])


def _central(cfg, criterion_overrides, with_report: bool = False):
    """``shrink`` on the union of the clients' windows (what federation must equal)."""
    from fedprune.lm.clients import partition_text
    from fedprune.lm.loading import load_causal_lm
    from fedprune.prune.structured.job import shrink

    model, tokenizer = load_causal_lm("tiny-llama")
    windows = [c.windows for c in partition_text(cfg.text, cfg.data.num_clients, tokenizer)]
    central = copy.deepcopy(model)
    report = shrink(central, cfg.method.structured(), list(torch.cat(windows).split(1)))
    return (central, report) if with_report else central


@pytest.mark.slow
@pytest.mark.parametrize("criterion, extra", [
    ("flap", ["method.bias_compensation=true", "method.allocation=adaptive"]),
    ("wanda-sp", []), ("taylor", []), ("taylor-mix", ["method.heads=query"])])
def test_federated_structure_equals_centralized_on_the_union(criterion, extra, tmp_path,
                                                             data_root):
    core, record = _run_pooled(tmp_path, ["method.name=structured", "method.fraction=0.3",
                                          "method.round_to=0", f"method.criterion={criterion}",
                                          *extra], lambda *a: None)
    assert record["contributors"] == [0, 1, 2, 3] and record["rejected"] == 0
    cfg = load_config("default", [*STRUCTURED, "data.num_clients=4",
                                  f"method.criterion={criterion}", *extra])
    central = _central(cfg, extra)
    fed = core.model
    assert core.adapter.layer_shapes(fed) == core.adapter.layer_shapes(central)
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fed(input_ids=x).logits, central(input_ids=x).logits,
                                   atol=1e-4, rtol=1e-4)
    assert abs(record["decoder_removed"] - 0.3) < 0.05


@pytest.mark.parametrize("spoil, reason", [
    ("negative_sq", "below the minimum 0.0"), ("nan_sum", "non-finite"),
    ("rows", "rows"), ("grad_shape", "shape"), ("tokens", "tokens")])
def test_bad_evidence_is_rejected_and_the_rest_decide(spoil, reason, tmp_path, data_root,
                                                      caplog):
    import logging

    def tamper(block, pid, metrics, arrays):
        if pid != 3:
            return
        sq = next(k for k in arrays if k.startswith("sq/"))
        if spoil == "negative_sq":
            arrays[sq] = -arrays[sq] - 1
        elif spoil == "nan_sum":
            key = next(k for k in arrays if k.startswith("sum/"))
            arrays[key] = arrays[key].copy()
            arrays[key][0] = np.nan
        elif spoil == "rows":
            key = next(k for k in arrays if k.startswith("rows/"))
            arrays[key] = np.array(int(arrays[key]) * 2, np.int64)
        elif spoil == "grad_shape":
            key = next(k for k in arrays if k.startswith("grad/"))
            arrays[key] = arrays[key][:-1]
        elif spoil == "tokens":
            arrays["tokens"] = np.array(int(arrays["tokens"]) + 5, np.int64)

    # taylor + bias compensation: the replies carry both statistics and gradients
    with caplog.at_level(logging.WARNING):
        _, record = _run_pooled(tmp_path, ["method.name=structured", "method.fraction=0.3",
                                           "method.criterion=taylor",
                                           "method.bias_compensation=true",
                                           "method.round_to=0"], tamper)
    assert record["contributors"] == [0, 1, 2] and record["rejected"] == 1
    assert reason in caplog.text


@pytest.mark.slow
def test_structured_runs_as_a_flower_simulation_and_saves_a_plain_model(tmp_path, data_root):
    from transformers import AutoModelForCausalLM

    from server.simulate import simulate

    cfg = load_config("default", [*STRUCTURED, "method.criterion=wanda-sp",
                                  f"run.out_dir={tmp_path}", "run.name=llm"])
    summary = simulate(cfg, tmp_path / "llm")
    record = summary["record"]
    assert record["contributors"] == [0, 1, 2]
    assert set(summary["perplexity_pruned"]) == {"ptb", "wikitext2", "shakespeare"}
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "llm" / "model")  # plain
    assert sum(p.numel() for p in saved.parameters()) == record["params_after"]
    central = _central(cfg, [])
    assert [s["intermediate"] for s in record["layers"]] == [
        m.mlp.down_proj.in_features for m in central.model.layers]
    assert summary["bytes_up"] > 0


@pytest.mark.slow
def test_federated_lora_recovery_averages_the_clients_adapters(tmp_path, data_root):
    """Two recovery rounds after a FLAP cut with bias compensation: the clients rebuild the
    server's smaller model from the kept units and biases, and the server's merged model
    equals FedAvg of the adapters each client trains on its own windows, recomputed here."""
    from fedprune.lm.clients import partition_text
    from fedprune.lm.loading import load_causal_lm
    from fedprune.methods.structured import pruned_copy
    from fedprune.prune.structured.recovery import (
        adapter_state,
        load_adapter_state_,
        merge_lora,
        train_lora_,
        wrap_lora,
    )

    extra = ["method.criterion=flap", "method.bias_compensation=true",
             "method.recover_rounds=2", "method.recover_steps=2", "method.recover_lr=0.01"]
    core, record = _run_pooled(tmp_path, ["method.name=structured", "method.fraction=0.3",
                                          "method.round_to=0", *extra], lambda *a: None)
    assert record["recovery"]["contributors"] == [[0, 1, 2, 3], [0, 1, 2, 3]]
    cfg = load_config("default", [*STRUCTURED, "data.num_clients=4", *extra])
    central, report = _central(cfg, extra, with_report=True)  # the same cut, on the union
    dense, tokenizer = load_causal_lm("tiny-llama")
    modules = dict(central.named_modules())
    payload = {**{f"keep/{n}": k.numpy() for n, k in report.keep.items()},
               **{f"bias/{n}": modules[n].bias.detach().numpy() for n in modules
                  if n.endswith(("o_proj", "down_proj"))}}
    rebuilt = pruned_copy(dense, cfg.method.structured(), payload)  # what a client trains
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(rebuilt(input_ids=x).logits, central(input_ids=x).logits)
    rcfg = cfg.method.recovery()
    server = wrap_lora(copy.deepcopy(central), rcfg, cfg.run.seed)
    state = adapter_state(server)
    windows = [c.windows for c in partition_text(cfg.text, 4, tokenizer)]
    for _ in range(2):  # every client holds the same number of windows: a plain mean
        outs = []
        for w in windows:
            local = wrap_lora(copy.deepcopy(central), rcfg, cfg.run.seed)
            load_adapter_state_(local, state)
            train_lora_(local, w, rcfg)
            outs.append(adapter_state(local))
        state = {k: sum(o[k].double() for o in outs).float() / len(outs) for k in state}
    load_adapter_state_(server, state)
    expected = merge_lora(server)
    with torch.no_grad():
        moved = (expected(input_ids=x).logits - central(input_ids=x).logits).abs().max()
        assert moved > 1e-3  # recovery changed the model
        torch.testing.assert_close(core.model(input_ids=x).logits,
                                   expected(input_ids=x).logits, atol=1e-4, rtol=1e-4)
