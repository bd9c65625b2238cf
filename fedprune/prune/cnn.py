"""One-shot pruning of a CIFAR-10 / MNIST CNN with the same pruner core as for LLMs.

No pretrained CIFAR weights exist offline, so a reference CNN is first trained briefly
with the foundation's training code (``fedprune.train.train_local``, centralized) and
cached by (model, width, epochs, seed); calibration inputs are a seeded sample of training
images; the metric is test accuracy.

After pruning, BatchNorm running statistics no longer match the pruned convolutions'
outputs; we report accuracy both as pruned and after re-estimating BN statistics on the
calibration images (a forward pass in train mode, cumulative averages), since the two
differ a lot at high sparsity and users of CNN pruning expect both.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import ModelConfig, TrainConfig
from ..data import ArraySplit, load_split, make_loader, resolve_cache_dir
from ..models import build_model
from ..train import evaluate, train_local


def reference_recipe(model_cfg: ModelConfig, epochs: int, lr: float) -> tuple[TrainConfig, str]:
    """The centralized training of a reference model and its cache tag. CNNs: SGD at
    ``lr`` (the foundation's local training). ViT: AdamW (lr 1e-3, weight decay 0.05),
    one epoch of linear warm-up, then cosine, as vision transformers are trained (at a
    CNN's SGD learning rate a ViT barely learns); ``lr`` is ignored for it."""
    if model_cfg.name == "vit":
        warm = -(-50_000 // 128)  # one CIFAR epoch of batches
        return (TrainConfig(local_epochs=epochs, lr=1e-3, weight_decay=0.05, batch_size=128,
                            optimizer="adamw", lr_schedule="cosine", warmup_steps=warm),
                "adamw1e-3-cos")
    return TrainConfig(local_epochs=epochs, lr=lr, batch_size=128), f"lr{lr}"


def reference_cnn(model_cfg: ModelConfig, dataset: str = "cifar10", epochs: int = 3,
                  seed: int = 0, lr: float = 0.05, root: str = "", cache_dir: str = "",
                  device: torch.device | str = "cpu") -> nn.Module:
    """A briefly trained dense model (CNN or ViT), cached under the fedprune cache dir."""
    recipe, tag = reference_recipe(model_cfg, max(epochs, 1), lr)  # epochs 0: not trained
    key = f"{dataset}-{model_cfg.name}-w{model_cfg.width}-e{epochs}-{tag}-s{seed}"
    path = resolve_cache_dir(cache_dir) / "cnn-reference" / f"{key}.safetensors"
    torch.manual_seed(seed)
    model = build_model(model_cfg, dataset)
    if path.exists():
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(path)))
        return model.to(device)
    if epochs == 0:  # the initial weights (tests of the machinery)
        return model.to(device)
    train = load_split(dataset, "train", root, cache_dir)
    loader = make_loader(train, dataset, 128, shuffle=True, augment=True, seed=seed)
    train_local(model, loader, recipe, None, device)
    _save_atomic(model, path)
    return model


def _save_atomic(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    save_file(state, tmp)
    os.replace(tmp, path)


def calibration_images(dataset: str, count: int, seed: int = 0, root: str = "",
                       cache_dir: str = "") -> torch.Tensor:
    """``count`` normalized training images (count, C, H, W), a seeded sample."""
    train = load_split(dataset, "train", root, cache_dir)
    if not 0 < count <= len(train):
        raise ValueError(f"calibration count {count} must be in [1, {len(train)}]")
    idx = np.sort(np.random.default_rng(seed).choice(len(train), count, replace=False))
    sample = ArraySplit(np.asarray(train.images[idx]), np.asarray(train.labels[idx]))
    return torch.cat([x for x, _ in make_loader(sample, dataset, 256, shuffle=False)])


def accuracy_on_test(model: nn.Module, dataset: str, root: str = "", cache_dir: str = "",
                  device: torch.device | str = "cpu", subset: int = 0) -> float:
    """Top-1 accuracy on the test split (first ``subset`` images when > 0)."""
    test = load_split(dataset, "test", root, cache_dir)
    if subset:
        test = ArraySplit(np.asarray(test.images[:subset]), np.asarray(test.labels[:subset]))
    return evaluate(model, make_loader(test, dataset, 500, shuffle=False), device)["accuracy"]


@torch.no_grad()
def recalibrate_bn_(model: nn.Module, images: torch.Tensor, batch_size: int = 256,
                    device: torch.device | str = "cpu") -> bool:
    """Re-estimate every BatchNorm's running mean/var on ``images`` (cumulative average);
    False when the model has no BatchNorm (nothing done)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return False
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over all batches
    model.to(device).train()
    for start in range(0, len(images), batch_size):
        model(images[start:start + batch_size].to(device))
    model.eval()
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    return True
