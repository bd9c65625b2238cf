"""Token pruning on Hugging Face ViT image classifiers (the family of the DeiT-S checkpoint
the Zero-TPrune and ToMe papers report on): token sites in pre-norm layers, the wrapper that
feeds them fedprune's CIFAR-10 batches, FLOPs against torch's own counter, and the prune
command end to end. A tiny randomly initialised ViT saved to a folder stands in for a
checkpoint (nothing is downloaded)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from fedprune.data.readers import CIFAR10_CLASSES
from fedprune.models.hf_image import HFImageClassifier, class_order, load_image_classifier
from fedprune.prune.adapters import adapter_for
from fedprune.prune.tokens import token_pruner

# the checkpoint's classes in another order than CIFAR-10's: logits must be reordered
SHUFFLED = [CIFAR10_CLASSES[i] for i in (3, 0, 9, 1, 8, 2, 7, 4, 6, 5)]


def _tiny_vit(attn: str = "eager"):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3,
                       num_attention_heads=2, intermediate_size=64, num_labels=10,
                       id2label=dict(enumerate(SHUFFLED)),
                       label2id={c: i for i, c in enumerate(SHUFFLED)},
                       attn_implementation=attn)
    return ViTForImageClassification(config).eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-vit")
    _tiny_vit().save_pretrained(path)
    return path


@pytest.fixture()
def wrapped(folder):
    return load_image_classifier(str(folder), "cifar10")


def test_wrapper_feeds_the_model_resized_renormalised_images_in_cifar_class_order():
    hf = _tiny_vit()
    model = HFImageClassifier(hf, "cifar10", [0.5] * 3, [0.25] * 3).eval()
    images = torch.randn(2, 3, 16, 16)  # a size other than the model's 32: resized
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
    pixels = F.interpolate(images * std + mean, size=(32, 32), mode="bilinear")
    logits = hf(pixel_values=(pixels - 0.5) / 0.25).logits
    expected = logits[:, [SHUFFLED.index(c) for c in CIFAR10_CLASSES]]
    torch.testing.assert_close(model(images), expected)


def test_class_order_refuses_labels_that_are_not_the_datasets():
    config = _tiny_vit().config
    config.id2label = {i: f"n{i:08d}" for i in range(10)}  # ImageNet-style synsets
    with pytest.raises(ValueError, match=r"do not name the cifar10 classes.*missing.*airplane"):
        class_order(config, "cifar10")
    config.id2label = {i: f"LABEL_{i}" for i in range(10)}  # generic: the dataset's order
    assert class_order(config, "cifar10").tolist() == list(range(10))


def test_adapter_finds_the_pre_norm_layers_and_sites_change_nothing_until_a_reducer(wrapped):
    adapter = adapter_for(wrapped)
    assert adapter.family == "hf_vit"
    assert adapter.stack_path(wrapped) == "hf.vit.layers"
    assert adapter_for(wrapped.hf).family == "hf_vit"  # the bare checkpoint too
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        dense = wrapped(images)
        pruner = token_pruner("zero-tprune", keep=[1.0, 1.0, 1.0])
        pruner.attach(wrapped)
        torch.testing.assert_close(wrapped(images), dense)
        assert adapter.token_counts(wrapped) == [17, 17, 17, 17]
        pruner.detach(wrapped)


@pytest.mark.parametrize("name,options,tokens", [
    ("zero-tprune", {"keep": [0.5, 1.0, 0.5]}, [17, 9, 9, 5]),
    ("random", {"keep": [0.5, 1.0, 0.5]}, [17, 9, 9, 5]),
    ("cls-attn", {"keep": [0.5, 1.0, 0.5]}, [17, 9, 9, 5]),
    ("tome", {"r": 4}, [17, 13, 9, 5])])
def test_token_counts_and_flops_match_torchs_counter(wrapped, name, options, tokens):
    from torch.utils.flop_counter import FlopCounterMode

    adapter = adapter_for(wrapped)
    image = torch.randn(1, 3, 32, 32)
    pruner = token_pruner(name, **options)
    pruner.attach(wrapped)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            out = wrapped(image)
        assert adapter.token_counts(wrapped) == tokens
        ours = adapter.token_flops(wrapped, tokens)
    finally:
        pruner.detach(wrapped)
    head = 2 * 32 * 10  # the classifier, which token_flops leaves out
    if name in ("random", "cls-attn"):  # reducers that multiply nothing: exact
        assert counter.get_total_flops() == ours + head
    else:  # the reducers' own similarity products come on top
        assert ours + head < counter.get_total_flops() < 1.15 * (ours + head)
    assert out.shape == (1, 10)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        wrapped(image)
    assert counter.get_total_flops() == adapter.token_flops(wrapped, [17] * 4) + head


def test_a_fused_attention_kernel_is_refused_with_the_setting_named(folder):
    model = load_image_classifier(str(folder), "cifar10", attn_implementation="sdpa")
    pruner = token_pruner("zero-tprune", keep=[0.5, 1.0, 1.0])
    pruner.attach(model)
    try:
        with pytest.raises(ValueError, match=r"\('sdpa'\) returns none.*attn_implementation="
                                             r"'eager'"):
            model(torch.randn(1, 3, 32, 32))
    finally:
        pruner.detach(model)


def test_prune_command_on_a_hugging_face_vit_folder(folder, tmp_path, data_root, monkeypatch):
    from fedprune.cli import main

    monkeypatch.setenv("FEDPRUNE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert main(["prune", "--model", f"cifar10:hf:{folder}", "--method", "tome",
                 "--merge-r", "4", "--eval-images", "100", "--skip-speed",
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["dense"]["tokens_per_block"] == [17, 17, 17, 17]
    assert report["pruned"]["tokens_per_block"] == [17, 13, 9, 5]
    assert 0 < report["flops_reduction"] < 1
    assert 0 <= report["dense"]["accuracy"] <= 1


# ---- weight pruning: the same adapter serves the one-shot pruner ---------------------------

def test_block_capture_matches_the_vits_hidden_states():
    """The pruner calibrates block by block from captured inputs: on a ViT (whose patch
    embedding has no ``weight``) they must be the model's own hidden states."""
    from fedprune.prune.calibrate import propagate

    model = _tiny_vit()
    adapter = adapter_for(model)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(pixel_values=pixels, output_hidden_states=True).hidden_states
        inputs = adapter.capture_inputs(model, {"pixel_values": pixels}, "cpu")
        hidden = [inputs[0].hidden]
        for block in adapter.blocks(model):
            inputs = propagate(adapter, block, inputs)
            hidden.append(inputs[0].hidden)
    assert len(hidden) == len(ref) == 4
    for i, (ours, theirs) in enumerate(zip(hidden, ref)):
        torch.testing.assert_close(ours, theirs, msg=f"block {i} input")


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_weight_pruning_of_the_wrapped_vit_prunes_every_block_projection(method):
    import fedprune.prune.methods  # noqa: F401  (registers the methods)
    from fedprune.prune.base import SparsityTarget, get_pruner
    from fedprune.prune.pipeline import prune_model

    model = HFImageClassifier(_tiny_vit(), "cifar10", [0.5] * 3, [0.25] * 3).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = [torch.randn(4, 3, 32, 32)]
    report = prune_model(model, get_pruner(method), SparsityTarget(0.5), images, progress=False)
    expected = {f"hf.vit.layers.{i}.{name}" for i in range(3) for name in (
        "attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj",
        "mlp.fc1", "mlp.fc2")}
    assert set(report.masks) == expected
    modules = dict(model.named_modules())
    for name, mask in report.masks.items():
        weight = modules[name].weight.detach()
        assert torch.equal(weight == 0, ~mask), name
        assert int((~mask).sum()) == weight.numel() // 2, name  # Wanda / SparseGPT per row
    pruned = {f"{n}.weight" for n in expected}
    for key, value in model.state_dict().items():  # patch embedding, norms, head untouched
        if key not in pruned:
            assert torch.equal(value, before[key]), key
    assert torch.isfinite(model(images[0])).all()


def test_prune_command_prunes_the_weights_of_a_hugging_face_vit(folder, tmp_path, data_root,
                                                                 monkeypatch):
    from fedprune.cli import main

    monkeypatch.setenv("FEDPRUNE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert main(["prune", "--model", f"cifar10:hf:{folder}", "--method", "wanda",
                 "--sparsity", "0.5", "--calib", "cifar10:16", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["protocol"]["reference_training_epochs"] is None
    assert report["sparsity"]["overall"] == pytest.approx(0.5)
    assert len(report["layers"]) == 18 and report["blocks_done"] == 3
    assert 0 <= report["pruned"]["accuracy"] <= 1
    assert "pruned_bn_recalibrated" not in report  # a ViT has no BN to re-estimate
