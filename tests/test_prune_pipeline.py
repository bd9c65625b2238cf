"""Adapters, the calibration engine and the block-by-block pruning pipeline.

Tiny random models (seeded) of every supported family: Llama, GPT-2, OPT, BERT, and the
project's convnet / resnet8 plus a CNN whose dims allow 2:4. The contract test runs every
registered method on every family; the others compare against independent computations.
"""

from __future__ import annotations

import copy
import logging
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fedprune.prune.methods  # noqa: F401  (registers the methods)
from fedprune.config import ModelConfig
from fedprune.models import build_model
from fedprune.prune.adapters import adapter_for
from fedprune.prune.base import (LayerStats, Pruner, PruneResult, SparsityTarget, get_pruner,
                                 pruner_names)
from fedprune.prune.calibrate import collect_stats, propagate
from fedprune.prune.pipeline import collect_model_stats, prune_model

transformers = pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)

HF_FAMILIES = ("llama", "gpt2", "opt", "bert")
CNN_FAMILIES = ("convnet", "resnet8", "cnn4")
FAMILIES = HF_FAMILIES + CNN_FAMILIES
# Prunable layers per family: every Linear/Conv1D inside the transformer blocks (never
# embeddings, pooler or lm_head); every conv/linear of a CNN (resnet8: stem, 3x2 convs,
# 2 shortcut convs, fc).
N_LAYERS = {"llama": 14, "gpt2": 8, "opt": 12, "bert": 12, "convnet": 4, "resnet8": 10,
            "cnn4": 3}


# ---- tiny models --------------------------------------------------------------------------

def _hf_model(family: str, layers: int = 2) -> nn.Module:
    t = transformers
    if family == "llama":
        cfg = t.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=layers, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=64)
        return t.LlamaForCausalLM(cfg)
    if family == "gpt2":
        cfg = t.GPT2Config(vocab_size=128, n_embd=64, n_layer=layers, n_head=4, n_positions=64,
                           bos_token_id=0, eos_token_id=0)
        return t.GPT2LMHeadModel(cfg)
    if family == "opt":
        cfg = t.OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=layers,
                          num_attention_heads=4, max_position_embeddings=64,
                          word_embed_proj_dim=64)
        return t.OPTForCausalLM(cfg)
    cfg = t.BertConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=64)
    return t.BertModel(cfg)


def _cnn4() -> nn.Module:
    """A CNN whose every layer's input dim is a multiple of 4 (so 2:4 applies)."""
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 8))


def _build(family: str, layers: int = 2) -> tuple[nn.Module, list[torch.Tensor]]:
    """(model in eval mode, two calibration batches), seeded."""
    torch.manual_seed(0)
    if family in HF_FAMILIES:
        model = _hf_model(family, layers)
        calib = [torch.randint(3, 128, (2, 16)) for _ in range(2)]
    elif family == "cnn4":
        model, calib = _cnn4(), [torch.randn(4, 4, 8, 8) for _ in range(2)]
    else:
        dataset = "mnist" if family == "convnet" else "cifar10"
        model = build_model(ModelConfig(name=family, width=4), dataset)
        shape = (1, 28, 28) if family == "convnet" else (3, 32, 32)
        calib = [torch.randn(4, *shape) for _ in range(2)]
    return model.eval(), calib


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy CPU the thread pool
    makes this file ~10x slower; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny() -> dict[str, tuple[nn.Module, list[torch.Tensor]]]:
    return {family: _build(family) for family in FAMILIES}


def _fresh(tiny: dict, family: str) -> tuple[nn.Module, list[torch.Tensor]]:
    model, calib = tiny[family]
    return copy.deepcopy(model), calib


def _output(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(batch)
    return out if isinstance(out, torch.Tensor) else out[0]


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    adapter = adapter_for(model)
    return {n: m for b in adapter.blocks(model) for n, m in adapter.prunable(b).items()}


# ---- a recording pruner (needs statistics, keeps what it was given) -------------------------

class _Recorder(Pruner):
    """Layer-scope magnitude that needs (and records) full statistics."""

    name = "recorder"
    needs = frozenset({"sq_norm", "gram"})

    def __init__(self) -> None:
        super().__init__(None)
        self.seen: list[LayerStats] = []

    def prune(self, weight, stats, target):
        self.seen.append(stats)
        k = weight.numel() - round(target.sparsity * weight.numel())
        keep = torch.zeros(weight.numel(), dtype=torch.bool)
        keep[torch.sort(weight.abs().reshape(-1), descending=True, stable=True).indices[:k]] = True
        return PruneResult(keep.view(weight.shape))


# ---- (a) contract: every method x every family ---------------------------------------------

def _nm_divides(model: nn.Module, m: int) -> bool:
    adapter = adapter_for(model)
    return all(adapter.get_matrix(mod).shape[1] % m == 0 for mod in _layers(model).values())


def _row_scope(pruner: Pruner, target: SparsityTarget) -> bool:
    """Whether the method compares weights per output row (Wanda's default does, whatever
    the target's scope)."""
    return target.scope == "row" or getattr(pruner.cfg, "scope", "layer") == "row"


def _check_pruned_layer(adapter, name, module, mask, target, per_row) -> None:
    weight = module.weight.detach()
    assert mask.shape == weight.shape and mask.dtype == torch.bool, name
    assert torch.equal(weight == 0, ~mask), f"{name}: zeros differ from the mask"
    matrix = adapter.get_matrix(module)  # (out, in); orientation checked in (b)
    if target.m:
        groups = matrix.reshape(matrix.shape[0], -1, target.m)  # (out, in/m, m)
        assert ((groups == 0).sum(-1) >= target.n).all(), f"{name}: a group misses {target.pattern}"
    elif per_row:
        expected = round(target.sparsity * matrix.shape[1])
        assert ((matrix == 0).sum(1) == expected).all(), f"{name}: a row misses {expected} zeros"
    else:
        assert int((weight == 0).sum()) == round(target.sparsity * weight.numel()), name


TARGETS = {"50%-layer": SparsityTarget(0.5), "50%-row": SparsityTarget(0.5, scope="row"),
           "2:4": SparsityTarget.parse(0.5, "2:4")}


@pytest.mark.parametrize("target", list(TARGETS.values()), ids=list(TARGETS))
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", pruner_names())
def test_contract_every_method_every_family(tiny, method, family, target):
    model, calib = _fresh(tiny, family)
    layers = _layers(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = get_pruner(method)
    if target.m and not _nm_divides(model, target.m):
        with pytest.raises(ValueError, match=r"layer '.+'.*2:4"):
            prune_model(model, pruner, target, calib, progress=False)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        return
    report = prune_model(model, pruner, target, calib, progress=False)
    assert set(report.masks) == set(layers) and len(layers) == N_LAYERS[family]
    adapter = adapter_for(model)
    for name, module in layers.items():
        _check_pruned_layer(adapter, name, module, report.masks[name], target,
                            _row_scope(pruner, target))
        assert report.sparsity[name] == pytest.approx(float((~report.masks[name]).float().mean()))
    pruned = {f"{n}.weight" for n in layers}
    for key, value in model.state_dict().items():
        if key not in pruned:  # embeddings, norms, BN stats, biases, lm_head
            assert torch.equal(value, before[key]), f"{key} changed"
    assert not model.training
    assert torch.isfinite(_output(model, calib[0])).all()


# ---- (b) GPT-2 Conv1D orientation ----------------------------------------------------------

def test_gpt2_conv1d_masks_match_weight_zeros_in_native_layout(tiny):
    model, calib = _fresh(tiny, "gpt2")
    report = prune_model(model, get_pruner("magnitude"), SparsityTarget.parse(0.5, "2:4"), calib,
                         progress=False)
    conv1d = transformers.pytorch_utils.Conv1D
    layers = {n: m for n, m in _layers(model).items() if isinstance(m, conv1d)}
    assert len(layers) == 8
    for name, module in layers.items():
        weight = module.weight.detach()  # (in, out): y = x @ weight
        mask = report.masks[name]
        assert mask.shape == weight.shape
        assert torch.equal(weight == 0, ~mask)
        # 2:4 groups run along the input dim, i.e. down the columns of the stored weight.
        groups = weight.T.reshape(weight.shape[1], -1, 4)  # (out, in/4, 4)
        assert ((groups == 0).sum(-1) == 2).all(), name
        wrong = weight.reshape(weight.shape[0], -1, 4)  # groups along the output dim
        assert not ((wrong == 0).sum(-1) == 2).all(), name
        # set via param names too: apply_masks_-style keys and the module's own mul_.
        assert f"{name}.weight" in report.param_masks()
        assert torch.equal(weight.clone().mul_(mask), weight)


# ---- (c) statistics combine by summation ---------------------------------------------------

def _stats_close(a: LayerStats, b: LayerStats) -> bool:
    # squared norms are float64 sums; one batch's Gram is a float32 product (batch_terms)
    scale = float(b.gram.abs().max())
    return (a.rows == b.rows and torch.allclose(a.sq_norm, b.sq_norm, rtol=1e-10)
            and torch.allclose(a.gram, b.gram, rtol=1e-5, atol=1e-6 * scale))


@pytest.mark.parametrize("family", ["llama", "gpt2", "cnn4"])
def test_collect_model_stats_halves_sum_to_whole(family):
    model, _ = _build(family)
    batch = torch.randint(3, 128, (4, 16)) if family in HF_FAMILIES else torch.randn(8, 4, 8, 8)
    needs = {"sq_norm", "gram"}
    whole = collect_model_stats(model, None, batch, needs)
    first = collect_model_stats(model, None, batch[: len(batch) // 2], needs)
    second = collect_model_stats(model, None, batch[len(batch) // 2:], needs)
    assert set(whole) == set(_layers(model))
    for name in whole:
        assert _stats_close(first[name] + second[name], whole[name]), name
        assert whole[name].rows > 0 and whole[name].gram.abs().sum() > 0


def _stats_methods() -> list[str]:
    return [n for n in pruner_names() if get_pruner(n).needs]


@pytest.mark.parametrize("method", _stats_methods())
def test_pruning_with_summed_stats_equals_full_stats(method):
    model, _ = _build("llama")
    batch = torch.randint(3, 128, (4, 16))
    needs = set(get_pruner(method).needs)
    halves = [collect_model_stats(model, None, part, needs) for part in (batch[:2], batch[2:])]
    summed = {name: halves[0][name] + halves[1][name] for name in halves[0]}
    full = collect_model_stats(model, None, batch, needs)
    target = SparsityTarget(0.5)
    runs = {}
    for label, kwargs in {"summed": dict(stats_override=summed),
                          "full": dict(stats_override=full.get),  # callable form
                          "dense_pass": dict(calib_inputs=[batch], sequential=False)}.items():
        pruned = copy.deepcopy(model)
        report = prune_model(pruned, get_pruner(method), target, progress=False, **kwargs)
        runs[label] = (report.masks, _layers(pruned))
    masks, layers = runs["full"]
    for label in ("summed", "dense_pass"):
        for name in masks:
            assert torch.equal(runs[label][0][name], masks[name]), f"{label}: {name}"
            assert torch.allclose(runs[label][1][name].weight, layers[name].weight,
                                  atol=1e-6), f"{label}: {name}"


# ---- sequential semantics ------------------------------------------------------------------

@pytest.mark.parametrize("sequential", [True, False])
def test_sequential_calibrates_later_blocks_on_pruned_outputs(sequential):
    model, calib = _build("llama")
    dense = collect_model_stats(model, None, calib, {"sq_norm", "gram"})
    recorder = _Recorder()
    prune_model(model, recorder, SparsityTarget(0.5), calib, sequential=sequential,
                progress=False)
    after = collect_model_stats(model, None, calib, {"sq_norm", "gram"})
    names = list(_layers(model))
    seen = dict(zip(names, recorder.seen))
    # Block 0 always sees the dense embeddings.
    q0 = "model.layers.0.self_attn.q_proj"
    assert _stats_close(seen[q0], dense[q0])
    # Block 1's q_proj input depends only on block 0 (pruned) -> equals the pruned model's.
    q1 = "model.layers.1.self_attn.q_proj"
    expected = after[q1] if sequential else dense[q1]
    other = dense[q1] if sequential else after[q1]
    assert _stats_close(seen[q1], expected)
    assert not torch.allclose(seen[q1].gram, other.gram, rtol=1e-3)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_only_some_blocks_pruned_the_rest_dense_and_fed_dense_outputs(family):
    """``only={1}``: block 0 stays exactly dense, so block 1 is calibrated on dense outputs:
    its result equals block 1 of a non-sequential run (which calibrates every block on the
    dense model's outputs)."""
    model, calib = _build(family)
    blocks = adapter_for(model).blocks(model)
    dense = copy.deepcopy(model)
    partial, full = copy.deepcopy(model), copy.deepcopy(model)
    report = prune_model(partial, get_pruner("sparsegpt"), SparsityTarget(0.5), calib,
                         sequential=True, progress=False, only={1})
    prune_model(full, get_pruner("sparsegpt"), SparsityTarget(0.5), calib, sequential=False,
                progress=False)
    adapter = adapter_for(model)
    first = set(adapter.prunable(blocks[0]))
    assert set(report.masks) == set(adapter.prunable(blocks[1]))
    for (name, a), b, c in zip(partial.named_parameters(), dense.parameters(),
                               full.parameters()):
        if name.rsplit(".", 1)[0] in first:
            assert torch.equal(a, b), name
        elif name.rsplit(".", 1)[0] in report.masks:
            torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-5)
            assert name.endswith("bias") or not torch.equal(a, b), name


# ---- (d) adapters and block input capture --------------------------------------------------

def test_unknown_model_has_no_adapter():
    class Bag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))
            self.norm = nn.LayerNorm(3)

    with pytest.raises(ValueError, match=r"Bag.*hf_decoder.*hf_encoder.*cnn"):
        adapter_for(Bag())
    with pytest.raises(ValueError, match="Bag"):
        prune_model(Bag(), get_pruner("magnitude"), SparsityTarget(0.5), progress=False)


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_block_capture_matches_model_hidden_states(family):
    model, _ = _build(family, layers=3)
    ids = torch.randint(3, 128, (2, 12))
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :3] = 0  # left padding: the mask must reach every block
    batch = {"input_ids": ids, "attention_mask": attention_mask}
    adapter = adapter_for(model)
    with torch.no_grad():
        ref = model(**batch, output_hidden_states=True, use_cache=False).hidden_states
        inputs = adapter.capture_inputs(model, batch, "cpu")
        assert len(inputs) == 1
        hidden = [inputs[0].hidden]
        for block in adapter.blocks(model):
            inputs = propagate(adapter, block, inputs)
            hidden.append(inputs[0].hidden)
    # Decoders' last entry is after the final norm: compare the blocks' inputs 0..L-1.
    upto = len(hidden) if family == "bert" else len(hidden) - 1
    for i in range(upto):
        assert torch.allclose(hidden[i], ref[i], atol=1e-6), f"block {i} input"
    if family == "llama":
        assert "position_embeddings" in inputs[0].kwargs
        assert inputs[0].kwargs["use_cache"] is False
        assert torch.allclose(model.model.norm(hidden[-1]), ref[-1], atol=1e-6)


# ---- (e) only one block's activations alive -------------------------------------------------

def test_only_one_blocks_activations_alive():
    model, _ = _build("llama", layers=4)
    calib = [torch.randint(3, 128, (2, 16)) for _ in range(3)]
    adapter = adapter_for(model)
    outputs: list[tuple[int, weakref.ref]] = []
    worst = []

    def before(index):
        def hook(_module, _args):
            alive = [i for i, ref in outputs if ref() is not None]
            assert all(i >= index - 1 for i in alive), f"block {index}: outputs of {alive} alive"
            worst.append(len(alive))
        return hook

    def after(index):
        def hook(_module, _args, out):
            outputs.append((index, weakref.ref(out if isinstance(out, torch.Tensor) else out[0])))
        return hook

    for block in adapter.blocks(model):
        block.module.register_forward_pre_hook(before(block.index))
        block.module.register_forward_hook(after(block.index))
    prune_model(model, _Recorder(), SparsityTarget(0.5), calib, progress=False)
    # 4 blocks x 3 batches x (calibration pass + propagation) minus the last propagation.
    assert len(outputs) == 4 * 3 * 2 - 3
    # At most: this block's inputs (3) + its outputs so far in the current pass (<= 2);
    # the calibration pass's outputs are dropped at once.
    assert max(worst) <= 2 * 3 - 1


# ---- (f) CNN layer rows --------------------------------------------------------------------

def _patches_by_loop(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """im2col by explicit loops (independent of F.unfold): (B*L, in*kh*kw)."""
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    pads = conv._reversed_padding_repeated_twice
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(x, pads, mode=mode) if any(pads) else x
    out_h = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    out_w = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for b in range(x.shape[0]):
        for i in range(out_h):
            for j in range(out_w):
                patch = xp[b, :, i * sh: i * sh + dh * (kh - 1) + 1: dh,
                           j * sw: j * sw + dw * (kw - 1) + 1: dw]  # (in, kh, kw)
                rows.append(patch.reshape(-1))
    return torch.stack(rows)


@pytest.mark.parametrize("conv_kwargs", [
    dict(kernel_size=3, stride=2, padding=1, dilation=2),
    dict(kernel_size=(3, 2), stride=1, padding="same", padding_mode="reflect"),
], ids=["strided-dilated", "same-reflect"])
def test_cnn_rows_gram_matches_loop_im2col(conv_kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, bias=False, **conv_kwargs)
    x = torch.randn(2, 2, 7, 7, dtype=torch.float64)
    model = nn.Sequential(conv, nn.Flatten()).double()
    flat_dim = model(x).shape[1]
    model.append(nn.Linear(flat_dim, 5).double())
    stats = collect_model_stats(model, None, x, {"sq_norm", "gram"})
    rows = _patches_by_loop(conv, x)  # (B*L, in*kh*kw)
    matrix = adapter_for(model).get_matrix(conv)  # (out, in*kh*kw)
    # The rows and the matrix reproduce the convolution at every output position.
    y = conv(x).permute(0, 2, 3, 1).reshape(-1, 3)  # (B*L, out)
    assert torch.allclose(rows @ matrix.T, y)
    assert stats["0"].rows == rows.shape[0]
    assert torch.allclose(stats["0"].gram, rows.T @ rows)
    assert torch.allclose(stats["0"].sq_norm, (rows ** 2).sum(0))
    feats = model[1](conv(x))  # the Linear's rows: (B, in)
    assert torch.allclose(stats["2"].gram, feats.T @ feats)


@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
def test_conv1d_rows_reproduce_the_convolution(padding_mode):
    torch.manual_seed(0)
    conv = nn.Conv1d(3, 4, 3, stride=2, padding=2, dilation=2, padding_mode=padding_mode,
                     bias=False).double()
    x = torch.randn(2, 3, 11, dtype=torch.float64)
    adapter = adapter_for(nn.Sequential(conv))
    rows = adapter.layer_rows(conv, x)  # (B*L, in*k)
    y = conv(x).permute(0, 2, 1).reshape(-1, 4)  # (B*L, out)
    assert torch.allclose(rows @ adapter.get_matrix(conv).T, y)


def test_grouped_conv_refused_for_statistics_but_not_magnitude():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten())
    with pytest.raises(ValueError, match=r"layer '0'.*groups=2"):
        prune_model(model, _Recorder(), SparsityTarget(0.5), torch.randn(1, 4, 5, 5),
                    progress=False)
    assert (model[0].weight != 0).all()  # nothing pruned
    prune_model(model, get_pruner("magnitude"), SparsityTarget(0.5), progress=False)
    assert int((model[0].weight == 0).sum()) == model[0].weight.numel() // 2


# ---- pipeline behaviour ----------------------------------------------------------------------

def test_global_magnitude_exact_count_and_threshold(tiny):
    model, _ = _fresh(tiny, "llama")
    layers = _layers(model)
    with torch.no_grad():
        layers["model.layers.0.mlp.up_proj"].weight.mul_(4)  # this layer should keep more
    weights = torch.cat([m.weight.detach().abs().reshape(-1) for m in layers.values()])
    report = prune_model(model, get_pruner("magnitude"), SparsityTarget(0.5, scope="global"),
                         progress=False)
    masks = torch.cat([report.masks[n].reshape(-1) for n in layers])
    assert int((~masks).sum()) == round(0.5 * weights.numel())
    assert weights[masks].min() >= weights[~masks].max()  # kept = globally largest |w|
    assert report.sparsity["model.layers.0.mlp.up_proj"] < 0.25  # not a per-layer 50%
    assert max(report.sparsity.values()) > 0.5


@pytest.mark.parametrize("method", pruner_names())
def test_global_scope_every_method(tiny, method):
    model, calib = _fresh(tiny, "gpt2")
    pruner, target = get_pruner(method), SparsityTarget(0.3, scope="global")
    if pruner.scores(torch.ones(2, 2), LayerStats.empty(2, True)) is None:
        with pytest.raises(ValueError, match="does not score"):
            prune_model(model, pruner, target, calib, progress=False)
        assert all((m.weight != 0).all() for m in _layers(model).values())  # nothing pruned
        return
    report = prune_model(model, pruner, target, calib, progress=False)
    numel = sum(m.numel() for m in report.masks.values())
    zeros = sum(int((m.weight == 0).sum()) for m in _layers(model).values())
    assert zeros == round(0.3 * numel) == numel - sum(int(m.sum()) for m in report.masks.values())


def test_on_block_done_reports_each_block_in_order(tiny):
    model, calib = _fresh(tiny, "opt")
    calls = []
    report = prune_model(model, _Recorder(), SparsityTarget(0.25), calib, progress=False,
                         on_block_done=lambda i, info: calls.append((i, sorted(info))))
    assert [i for i, _ in calls] == [0, 1]
    assert all(name.startswith(f"model.decoder.layers.{i}.") for i, names in calls
               for name in names)
    assert sum(len(names) for _, names in calls) == len(report.masks) == 12
    assert set(report.timings) >= {"calibrate", "prune", "apply", "propagate", "total"}
    assert report.timings["calibrate"] > 0 and report.timings["propagate"] > 0


def test_magnitude_runs_no_forward_pass(tiny):
    model, _ = _fresh(tiny, "llama")
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    report = prune_model(model, get_pruner("magnitude"), SparsityTarget(0.5), progress=False)
    assert not calls and report.timings["calibrate"] == 0.0
    assert report.overall_sparsity == pytest.approx(0.5)


def test_batch_gram_float32_product_float64_sum():
    """One batch's Gram is a float32 product (half the time of float64) added into float64:
    within float32 rounding of the exact Gram, and float64 rows stay exact."""
    from fedprune.prune.base import batch_terms

    x = torch.randn(512, 96) * torch.linspace(0.1, 10.0, 96)
    exact = x.double().T @ x.double()
    terms = batch_terms(x, 96, with_gram=True)
    assert terms.gram.dtype == torch.float64 and terms.rows == 512
    rel = ((terms.gram - exact).abs().max() / exact.abs().max()).item()
    assert 0 < rel < 1e-5  # float32 rounding, not float64 (0) and not a wrong product
    assert torch.equal(terms.sq_norm, (x.double() ** 2).sum(0))
    exact64 = batch_terms(x.double(), 96, with_gram=True).gram
    assert torch.equal(exact64, exact)


def test_layers_reading_one_input_share_its_sums():
    """q/k/v read one normalized hidden state: their statistics are computed once and are
    bitwise equal, so SparseGPT factorizes their Hessian once; k's own stats still match
    a direct computation from its inputs."""
    model, _ = _build("llama")
    adapter = adapter_for(model)
    block = adapter.blocks(model)[0]
    names = list(adapter.prunable(block))
    inputs = adapter.capture_inputs(model, torch.randint(3, 128, (2, 16)), "cpu")
    stats = collect_stats(adapter, block, inputs, names, {"sq_norm", "gram"}, "cpu")
    q, k, v = (next(n for n in names if n.endswith(f"{p}_proj")) for p in "qkv")
    assert torch.equal(stats[q].gram, stats[k].gram) and torch.equal(stats[k].gram,
                                                                     stats[v].gram)
    o = next(n for n in names if n.endswith("o_proj"))
    assert not torch.equal(stats[o].gram, stats[q].gram)  # another input: not shared
    seen = []
    module = adapter.prunable(block)[k]
    handle = module.register_forward_hook(lambda m, a, out: seen.append(a[0].reshape(
        -1, a[0].shape[-1]).double()))
    for inp in inputs:
        adapter.run_block(block, inp)
    handle.remove()
    rows = torch.cat(seen)
    assert torch.allclose(stats[k].gram, rows.T @ rows, rtol=1e-5, atol=1e-5)
    assert torch.allclose(stats[k].sq_norm, (rows ** 2).sum(0), rtol=1e-10)
