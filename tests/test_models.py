"""Model registry: every CNN builds for its input, has BN, and counts as expected; the ViT
counts its parameters and FLOPs as a hand count says."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedprune.config import ModelConfig
from fedprune.masks import count_params, prunable_names
from fedprune.models import build_model, register_model, registered_models

CASES = {"resnet8": "cifar10", "resnet20": "cifar10", "resnet18": "cifar10",
         "vgg11_bn": "cifar10", "convnet": "mnist"}


def test_every_registered_model_is_covered():
    assert set(registered_models()) == set(CASES) | {"vit"}


def test_vit_shapes_parameters_and_flops_by_hand():
    model = build_model(ModelConfig(name="vit", width=8, num_classes=7), "cifar10")
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    d, hidden, n = 32, 64, 65  # width 8 -> 32 channels, MLP ratio 2, 64 patches + class
    per_block = (3 * d * d + 3 * d) + (d * d + d) + (d * hidden + hidden) + \
        (hidden * d + d) + 4 * d  # qkv, proj, fc1, fc2, two LayerNorms
    total = (3 * 16 * d + d) + d + n * d + 6 * per_block + 2 * d + (d * 7 + 7)
    assert sum(p.numel() for p in model.parameters()) == total
    macs = 64 * d * 3 * 16 + 6 * (n * d * 3 * d + 2 * n * n * d + n * d * d + 2 * n * d * hidden)
    assert model.flops() == 2 * (macs + d * 7)
    assert all(n.endswith("weight") for n in prunable_names(model))


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_shape_and_batchnorm(name):
    dataset = CASES[name]
    model = build_model(ModelConfig(name=name, width=4, num_classes=7), dataset)
    x = torch.randn(3, 1 if dataset == "mnist" else 3, 28 if dataset == "mnist" else 32,
                    28 if dataset == "mnist" else 32)
    assert model(x).shape == (3, 7)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    # conv/linear weights only: no BN parameter and no bias is prunable
    assert all(n.endswith("weight") for n in prunable_names(model))
    assert not any("bn" in n for n in prunable_names(model))


def test_resnet_depths_match_the_paper():
    # He et al. 2016: 6n+2 layers with n blocks per stage; ResNet-20 -> n=3, ResNet-8 -> n=1
    def convs(name):
        return sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
                   for m in build_model(ModelConfig(name=name, width=16)).modules())
    assert convs("resnet20") == 19 and convs("resnet8") == 7  # + the final linear layer
    # the standard CIFAR ResNet-20 (option-B shortcuts) has ~0.27M parameters at width 16
    params = count_params(build_model(ModelConfig(name="resnet20", width=16)))["total"]
    assert 0.26e6 < params < 0.28e6


def test_duplicate_model_name_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_model("resnet8")(lambda cfg, c: nn.Linear(1, 1))


def test_init_file_starts_the_server_from_a_file_and_names_a_mismatch(tmp_path):
    from safetensors.torch import save_file

    from fedprune.config import ConfigError, load_config
    from fedprune.deploy.node import for_clients
    from fedprune.fl.server_core import SparseServer
    from fedprune.models.weights import load_weights_file

    torch.manual_seed(1)
    trained = build_model(ModelConfig(name="vit", width=4))
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(path))
    cfg = load_config("default", ["model.name=vit", "model.width=4", "mask.density=1.0",
                                  f"model.init_file={path}", "data.train_subset=200"])
    server = SparseServer(cfg)
    for name, tensor in trained.state_dict().items():
        torch.testing.assert_close(server.model.state_dict()[name], tensor)
    assert for_clients(cfg).model.init_file == ""  # a server file never reaches a client
    with pytest.raises(ConfigError, match=r"tensor blocks.0.attn.proj.bias has shape \(16,\), "
                                          r"the model's is \(32,\)"):
        load_weights_file(build_model(ModelConfig(name="vit", width=8)), str(path))
    with pytest.raises(ConfigError, match="does not fit model ResNet.*missing"):
        load_weights_file(build_model(ModelConfig(name="resnet8", width=4)), str(path))
    with pytest.raises(FileNotFoundError, match="model.init_file='nope.safetensors'"):
        load_weights_file(trained, "nope.safetensors")


def test_init_file_takes_a_runs_own_model_file(tmp_path):
    """A run writes scalars (BN's num_batches_tracked) as shape (1,): they still load."""
    from safetensors.torch import save_file

    from fedprune.models.weights import load_weights_file

    torch.manual_seed(2)
    run_model = build_model(ModelConfig(name="resnet8", width=4))
    state = {k: (v.reshape(1) if v.dim() == 0 else v).contiguous()
             for k, v in run_model.state_dict().items()}
    state["bn1.num_batches_tracked"] = torch.tensor([7])
    save_file(state, str(tmp_path / "model.safetensors"))
    fresh = build_model(ModelConfig(name="resnet8", width=4))
    load_weights_file(fresh, str(tmp_path / "model.safetensors"))
    assert fresh.state_dict()["bn1.num_batches_tracked"].shape == ()
    assert int(fresh.state_dict()["bn1.num_batches_tracked"]) == 7
    torch.testing.assert_close(fresh.state_dict()["conv1.weight"], state["conv1.weight"])
